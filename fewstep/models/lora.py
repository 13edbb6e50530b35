"""LoRA helpers shared by every family: add an adapter, extract its layers, save/load them the stock way.

Stock path (SD, SDXL, SD3, FLUX): layers are `get_peft_model_state_dict(net)` as is (peft's `lora_A`/`lora_B` keys,
as diffusers' newer scripts such as `train_dreambooth_lora_sd3.py` pass them), written with
`Pipeline.save_lora_weights(dir, <prefix>_lora_layers=...)` and loaded back with `pipe.load_lora_weights(dir)`.
They are not passed through `convert_state_dict_to_diffusers`: it renames only the attention projections
(to_q/to_k/to_v/to_out.0 -> `lora.down`/`lora.up`), and `load_lora_weights` converts a file by its first key only,
so a file mixing both formats silently loses one part (94 of 158 tensors with the LCM-LoRA conv+linear targets).

Fallback (PixArt): diffusers 0.42 has no LoRA loader mixin for `PixArtAlphaPipeline` / `PixArtSigmaPipeline` and
`PixArtTransformer2DModel` has no `add_adapter`. The adapter is then injected with peft directly and saved in
peft's own adapter format under `<dir>/<net_attr>/` (`adapter_config.json` + `adapter_model.safetensors`, the files
`PeftModel.save_pretrained` writes, keys prefixed `base_model.model.`), so the stock way to use it is
`PeftModel.from_pretrained(pipe.transformer, f"{dir}/transformer")`; `load_lora` does the same in place.

`load_lora` reads safetensors only and checks afterwards that every tensor of the file is in the network with its
value (`verify_loaded`); a file that would load only in part raises `FewstepError` instead of a peft warning.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"
STOCK_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
REEXPORT = "re-export it with `fewstep export <checkpoint>`"


def lora_config(targets: tuple[str, ...] | list[str], rank: int = 4, alpha: float | None = None,
                init: str | bool = "gaussian") -> Any:
    """A peft `LoraConfig` on the family's `lora_targets`; alpha defaults to the rank (scale 1), the value
    `load_lora_weights` assumes when a file carries no adapter metadata."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=init,
                      target_modules=list(targets))


def add_lora(net: nn.Module, config: Any, adapter_name: str = ADAPTER) -> nn.Module:
    """Inject a LoRA adapter in place: `net.add_adapter` where diffusers provides it (PeftAdapterMixin), else
    peft's `inject_adapter_in_model` (which is what `add_adapter` calls; it also sets `net.peft_config`)."""
    if hasattr(net, "add_adapter"):
        net.add_adapter(config, adapter_name=adapter_name)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, net, adapter_name)
    return net


def lora_state_dict(net: nn.Module, adapter_name: str = ADAPTER) -> dict[str, Tensor]:
    """One adapter's layers in peft's key format (`<module>.lora_A.weight` / `.lora_B.weight`), the one format
    `load_lora_weights` loads whatever the targets (no `convert_state_dict_to_diffusers`; see the module doc)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(net, adapter_name=adapter_name)


def supports_stock_lora(pipeline_cls: type) -> bool:
    """Whether the diffusers pipeline class has a LoRA loader mixin (`save_lora_weights` / `load_lora_weights`)."""
    return hasattr(pipeline_cls, "save_lora_weights") and hasattr(pipeline_cls, "load_lora_weights")


def save_stock_adapter(family: Any, net: nn.Module, out_dir: str | Path, adapter_name: str = ADAPTER) -> Path:
    """One adapter of `net` as a stock diffusers LoRA file (`<out_dir>/pytorch_lora_weights.safetensors`, keys
    `<prefix>.<module>.lora_A/B.weight`) with its config as adapter metadata, so `load_lora_weights` restores alpha."""
    out = Path(out_dir)
    kwargs: dict[str, Any] = {f"{family.lora_prefix}_lora_layers": lora_state_dict(net, adapter_name)}
    meta = f"{family.lora_prefix}_lora_adapter_metadata"
    if meta in inspect.signature(family.pipeline_cls.save_lora_weights).parameters:
        kwargs[meta] = net.peft_config[adapter_name].to_dict()
    family.pipeline_cls.save_lora_weights(str(out), **kwargs)
    return out


def save_lora(family: Any, net: nn.Module, out_dir: str | Path, adapter_name: str = ADAPTER) -> Path:
    """Write one adapter of `net` so a fresh stock pipeline can load it (stock path or the peft fallback)."""
    out = Path(out_dir)
    if supports_stock_lora(family.pipeline_cls):
        return save_stock_adapter(family, net, out, adapter_name=adapter_name)
    return _save_peft(net, net.peft_config[adapter_name], out / family.net_attr, adapter_name)


def load_lora(family: Any, pipe: Any, lora_dir: str | Path, adapter_name: str | None = None) -> Any:
    """Load an adapter written by `save_lora` / `save_stock_adapter` into `pipe` (in place) and return the pipeline.
    Reads only safetensors files; raises FewstepError unless every tensor of the file is now in the network."""
    if not supports_stock_lora(type(pipe)):
        _load_peft(getattr(pipe, family.net_attr), Path(lora_dir) / family.net_attr, adapter_name or ADAPTER)
        return pipe
    file = safetensors_file(Path(lora_dir), STOCK_WEIGHTS)
    net = getattr(pipe, family.net_attr)
    before = set(getattr(net, "peft_config", {}) or {})
    try:
        with quiet_text_encoder_warnings():
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, use_safetensors=True,
                                   adapter_name=adapter_name)
    except (RuntimeError, ValueError) as exc:  # shape or key mismatch inside diffusers / peft
        raise FewstepError(f"LoRA file {file} does not fit this {type(net).__name__} ({str(exc).splitlines()[0][:160]}); "
                           "load it into the teacher it was trained on (fewstep.json names it)") from exc
    added = [a for a in (getattr(net, "peft_config", {}) or {}) if a not in before]
    try:
        verify_loaded(file, _file_tensors(file, f"{family.lora_prefix}."),
                      lora_state_dict(net, added[0]) if added else {}, type(net).__name__)
    except FewstepError:
        if added:
            pipe.delete_adapters(added)
        raise
    return pipe


def safetensors_file(folder: Path, name: str) -> Path:
    """`folder/name` (or the folder's only *.safetensors file); a folder holding only pickle files is refused."""
    if folder.is_file() and folder.suffix == ".safetensors":
        return folder
    if (folder / name).is_file():
        return folder / name
    found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if folder.is_dir() and any(folder.glob("*.bin")):
        raise FewstepError(f"{folder} holds a pickle .bin LoRA file but no {name}; only safetensors LoRA files are "
                           f"loaded (convert it with safetensors, or {REEXPORT})")
    raise FewstepError(f"{folder} holds no LoRA file {name}; pass a fewstep export folder, or {REEXPORT}")


def verify_loaded(file: Path, expected: dict[str, Tensor], loaded: dict[str, Tensor], where: str) -> None:
    """Raise unless the adapter now in the network (`loaded`, peft keys) holds exactly the file's tensors
    (`expected`, keys after diffusers' own peft conversion), with equal shapes and values."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if not expected:
        raise FewstepError(f"LoRA file {file} holds no tensors for {where}; pass the export of a student of this "
                           "teacher's family")
    expected = convert_unet_state_dict_to_peft(expected)
    arrived = sum(1 for k, v in expected.items() if k in loaded and _same(v, loaded[k]))
    if arrived == len(expected) == len(loaded):
        return
    if arrived < len(expected):
        raise FewstepError(f"LoRA file {file}: only {arrived} of {len(expected)} tensors loaded into {where} (it mixes "
                           f"key formats or does not match this network); {REEXPORT}, which writes one key format")
    raise FewstepError(f"LoRA file {file}: {arrived} of {len(expected)} tensors loaded, but the adapter they make in "
                       f"{where} has {len(loaded)} (the file lacks some); {REEXPORT}")


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether a file tensor equals the network's copy (cast to the network's dtype, as loading does)."""
    return a.shape == b.shape and torch.equal(a.to(b.dtype), b.detach().to("cpu"))


def _file_tensors(file: Path, prefix: str, only_prefixed: bool = True) -> dict[str, Tensor]:
    """The file's tensors (those whose key starts with `prefix`, unless `only_prefixed=False`), prefix removed."""
    from safetensors.torch import load_file

    return {k.removeprefix(prefix): v for k, v in load_file(str(file)).items()
            if k.startswith(prefix) or not only_prefixed}


class _DropTextEncoderNotice(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'" notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("No LoRA keys associated to") and "prefix='text_encoder" in msg)


@contextlib.contextmanager
def quiet_text_encoder_warnings() -> Iterator[None]:
    """Silence only the text-encoder notice above (fewstep never trains text-encoder LoRA); other records pass."""
    logger = logging.getLogger("diffusers.loaders.lora_base")
    drop = _DropTextEncoderNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _save_peft(net: nn.Module, config: Any, folder: Path, adapter_name: str = ADAPTER) -> Path:
    """peft's adapter format (what `PeftModel.save_pretrained` writes) for a model with an injected adapter."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in lora_state_dict(net, adapter_name).items()}
    save_file(state, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    return folder


def _load_peft(net: nn.Module, folder: Path, adapter_name: str = ADAPTER) -> nn.Module:
    """Inject the adapter described by `folder/adapter_config.json` into `net`, set its weights and verify them."""
    from peft import LoraConfig, set_peft_model_state_dict

    file = safetensors_file(folder, PEFT_WEIGHTS)
    config = LoraConfig.from_pretrained(str(folder))
    add_lora(net, config, adapter_name)
    state = _file_tensors(file, PEFT_PREFIX, only_prefixed=False)
    set_peft_model_state_dict(net, state, adapter_name)
    verify_loaded(file, state, lora_state_dict(net, adapter_name), type(net).__name__)
    return net
