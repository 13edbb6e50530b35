"""LoRA helpers shared by every family: add an adapter, extract its layers, save/load them the stock way.

Stock path (SD, SDXL, SD3, FLUX): layers come from `get_peft_model_state_dict` + `convert_state_dict_to_diffusers`
exactly as diffusers' training scripts (`train_text_to_image_lora*.py`, `train_dreambooth_lora_*.py`) build them,
are written with `Pipeline.save_lora_weights(dir, <prefix>_lora_layers=...)` and load back with
`pipe.load_lora_weights(dir)`.

Fallback (PixArt): diffusers 0.42 has no LoRA loader mixin for `PixArtAlphaPipeline` / `PixArtSigmaPipeline` and
`PixArtTransformer2DModel` has no `add_adapter`. The adapter is then injected with peft directly and saved in
peft's own adapter format under `<dir>/<net_attr>/` (`adapter_config.json` + `adapter_model.safetensors`, the files
`PeftModel.save_pretrained` writes, keys prefixed `base_model.model.`), so the stock way to use it is
`PeftModel.from_pretrained(pipe.transformer, f"{dir}/transformer")`; `load_lora` does the same in place.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fewstep.errors import FewstepError

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"


def lora_config(targets: tuple[str, ...] | list[str], rank: int = 4, alpha: float | None = None,
                init: str | bool = "gaussian") -> Any:
    """A peft `LoraConfig` on the family's `lora_targets`; alpha defaults to the rank (scale 1), the value
    `load_lora_weights` assumes when a file carries no adapter metadata."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=init,
                      target_modules=list(targets))


def add_lora(net: nn.Module, config: Any) -> nn.Module:
    """Inject a LoRA adapter in place: `net.add_adapter` where diffusers provides it (PeftAdapterMixin), else
    peft's `inject_adapter_in_model` (which is what `add_adapter` calls; it also sets `net.peft_config`)."""
    if hasattr(net, "add_adapter"):
        net.add_adapter(config)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, net, ADAPTER)
    return net


def lora_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The adapter's layers in diffusers' key format, as diffusers' LoRA training scripts pass them to
    `save_lora_weights`: `convert_state_dict_to_diffusers(get_peft_model_state_dict(net))`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(net))


def supports_stock_lora(pipeline_cls: type) -> bool:
    """Whether the diffusers pipeline class has a LoRA loader mixin (`save_lora_weights` / `load_lora_weights`)."""
    return hasattr(pipeline_cls, "save_lora_weights") and hasattr(pipeline_cls, "load_lora_weights")


def save_lora(family: Any, net: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapter of `net` so a fresh stock pipeline can load it (stock path or the peft fallback)."""
    out = Path(out_dir)
    config = net.peft_config[ADAPTER]
    if supports_stock_lora(family.pipeline_cls):
        kwargs: dict[str, Any] = {f"{family.lora_prefix}_lora_layers": lora_state_dict(net)}
        meta = f"{family.lora_prefix}_lora_adapter_metadata"
        if meta in inspect.signature(family.pipeline_cls.save_lora_weights).parameters:
            kwargs[meta] = config.to_dict()
        family.pipeline_cls.save_lora_weights(str(out), **kwargs)
        return out
    return _save_peft(net, config, out / family.net_attr)


def load_lora(family: Any, pipe: Any, lora_dir: str | Path) -> Any:
    """Load an adapter written by `save_lora` into `pipe` (in place) and return the pipeline."""
    if supports_stock_lora(type(pipe)):
        pipe.load_lora_weights(str(lora_dir))
        return pipe
    _load_peft(getattr(pipe, family.net_attr), Path(lora_dir) / family.net_attr)
    return pipe


def _save_peft(net: nn.Module, config: Any, folder: Path) -> Path:
    """peft's adapter format (what `PeftModel.save_pretrained` writes) for a model with an injected adapter."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(net).items()}
    save_file(state, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    return folder


def _load_peft(net: nn.Module, folder: Path) -> nn.Module:
    """Inject the adapter described by `folder/adapter_config.json` into `net` and set its weights."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(folder))
    add_lora(net, config)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / PEFT_WEIGHTS)).items()}
    result = set_peft_model_state_dict(net, state, ADAPTER)
    unmatched = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unmatched:
        raise FewstepError(f"LoRA file {folder} does not match this network (e.g. {unmatched[:3]}); "
                           "load it into the pipeline it was trained on")
    return net
