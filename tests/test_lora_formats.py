"""LoRA exports load whole (issue item 6): every target set round-trips every tensor through stock
`load_lora_weights`, and fewstep's loader refuses a file it would load only in part, or a pickle-only folder.

Before the fix, `convert_state_dict_to_diffusers` renamed only the attention projections to `lora.down/up`, so a
conv+linear target list (diffusers' LCM-LoRA script) wrote mixed key formats and stock loading kept 94 of 158.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from fewstep.errors import FewstepError  # noqa: E402
from fewstep.models.families import FAMILIES  # noqa: E402
from fewstep.models.lora import (STOCK_WEIGHTS, add_lora, load_lora, lora_config, lora_state_dict,  # noqa: E402
                                 quiet_text_encoder_warnings, save_lora)
from tiny_pipelines import FACTORIES, PROMPTS  # noqa: E402

LCM_LORA = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
            "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ALL_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
SIZES = {"sd": 16, "sdxl": 64, "sd3": 16, "flux": 16, "pixart": 16}
UNETS = ("sd", "sdxl")
STOCK = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture
def diffusers_warnings() -> Any:
    """diffusers' warnings on for one test (tests/conftest.py sets DIFFUSERS_VERBOSITY=error)."""
    from diffusers.utils import logging as dlogging

    before = dlogging.get_verbosity()
    dlogging.set_verbosity_warning()
    yield
    dlogging.set_verbosity(before)


def _targets(name: str, kind: str) -> tuple[str, ...]:
    """The family default, or the widest list a user picks: LCM-LoRA's conv+linear (UNets), all linear (DiTs)."""
    if kind == "default":
        return tuple(FAMILIES[name].lora_targets)
    return LCM_LORA if name in UNETS else ALL_LINEAR


def _trained(name: str, targets: tuple[str, ...], adapters: tuple[str, ...] = ("default",)) -> tuple[Any, Any]:
    """A tiny pipeline whose network carries `adapters` with random non-zero lora_B (B starts at zero)."""
    pipe = FACTORIES[name]()
    net = getattr(pipe, FAMILIES[name].net_attr)
    gen = torch.Generator().manual_seed(4)
    for adapter in adapters:
        add_lora(net, lora_config(targets), adapter)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return pipe, net


def _output(name: str, pipe: Any) -> torch.Tensor:
    family = FAMILIES[name]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((len(PROMPTS), *family.latent_shape(pipe, SIZES[name], SIZES[name])), generator=gen)
    timestep = family.schedule(pipe).model_timestep(torch.tensor([0.7, 0.3]))
    with torch.no_grad():
        return family.call(getattr(pipe, family.net_attr), x, timestep, family.encode_prompts(pipe, PROMPTS))


def _assert_same_adapter(net: Any, fresh_net: Any, adapter: str, fresh_adapter: str) -> None:
    ours, theirs = lora_state_dict(net, adapter), lora_state_dict(fresh_net, fresh_adapter)
    assert len(theirs) == len(ours) > 0
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("kind", ["default", "wide"])
@pytest.mark.parametrize("name", STOCK)
def test_stock_loader_gets_every_tensor(name: str, kind: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    pipe, net = _trained(name, _targets(name, kind))
    trained = _output(name, pipe)
    save_lora(family, net, tmp_path)
    fresh = FACTORIES[name]()
    fresh.load_lora_weights(str(tmp_path))
    fresh_net = getattr(fresh, family.net_attr)
    _assert_same_adapter(net, fresh_net, "default", next(iter(fresh_net.peft_config)))
    assert (_output(name, fresh) - trained).abs().max().item() < 1e-5
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(str(tmp_path / STOCK_WEIGHTS)))  # one format


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_fewstep_loader_wide_targets(name: str, tmp_path: Path, capfd: Any, diffusers_warnings: Any) -> None:
    family = FAMILIES[name]
    pipe, net = _trained(name, _targets(name, "wide"))
    save_lora(family, net, tmp_path)
    fresh = load_lora(family, FACTORIES[name](), tmp_path)
    fresh_adapter = "default" if name == "pixart" else "default_0"
    _assert_same_adapter(net, getattr(fresh, family.net_attr), "default", fresh_adapter)
    assert (_output(name, fresh) - _output(name, pipe)).abs().max().item() < 1e-5
    assert "No LoRA keys associated" not in capfd.readouterr().err  # the text-encoder notice is silenced


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_phased_experts_load_whole(name: str, tmp_path: Path) -> None:
    """Each named expert adapter saves alone (stock file, or peft's folder for PixArt) and loads back whole."""
    family = FAMILIES[name]
    _, net = _trained(name, LCM_LORA if name == "sd" else _targets(name, "wide"), ("phase0", "phase1"))
    fresh = FACTORIES[name]()
    for adapter in ("phase0", "phase1"):
        save_lora(family, net, tmp_path / adapter, adapter_name=adapter)
        load_lora(family, fresh, tmp_path / adapter, adapter_name=adapter)
        _assert_same_adapter(net, getattr(fresh, family.net_attr), adapter, adapter)


def _mixed_format_file(folder: Path) -> Path:
    """Today's (pre-fix) export of LCM-LoRA targets: attention keys `lora.down/up`, the rest `lora_A/B`."""
    from diffusers.utils import convert_state_dict_to_diffusers

    _, net = _trained("sd", LCM_LORA)
    layers = convert_state_dict_to_diffusers(lora_state_dict(net))
    FAMILIES["sd"].pipeline_cls.save_lora_weights(str(folder), unet_lora_layers=layers)
    return folder


def _edited_file(folder: Path, edit: str) -> Path:
    """A whole default export, then one lora_B tensor dropped or one key renamed to a module that does not exist."""
    _, net = _trained("sd", FAMILIES["sd"].lora_targets)
    save_lora(FAMILIES["sd"], net, folder)
    state = load_file(str(folder / STOCK_WEIGHTS))
    key = next(k for k in sorted(state) if "lora_B" in k)
    value = state.pop(key)
    if edit == "rename":
        state[key.replace(".attn1.", ".attn9.")] = value
    save_file(state, str(folder / STOCK_WEIGHTS))
    return folder


@pytest.mark.parametrize("case", ["mixed", "drop", "rename"])
def test_partial_load_raises(case: str, tmp_path: Path) -> None:
    folder = _mixed_format_file(tmp_path) if case == "mixed" else _edited_file(tmp_path, case)
    pipe = FACTORIES["sd"]()
    with pytest.raises(FewstepError, match=r"\d+ of \d+ tensors.*fewstep export") as err:
        load_lora(FAMILIES["sd"], pipe, folder)
    assert str(folder / STOCK_WEIGHTS) in str(err.value) and "\n" not in str(err.value)
    if case == "mixed":
        assert "only 94 of 158" in str(err.value)
    assert not getattr(pipe.unet, "peft_config", None)  # the partial adapter was removed again


def test_old_attention_only_export_still_loads(tmp_path: Path) -> None:
    """A pre-fix default export (all keys `lora.down/up`, one format) loaded whole then and still passes the check."""
    from diffusers.utils import convert_state_dict_to_diffusers

    _, net = _trained("sd", FAMILIES["sd"].lora_targets)
    layers = convert_state_dict_to_diffusers(lora_state_dict(net))
    FAMILIES["sd"].pipeline_cls.save_lora_weights(str(tmp_path), unet_lora_layers=layers)
    fresh = load_lora(FAMILIES["sd"], FACTORIES["sd"](), tmp_path)
    _assert_same_adapter(net, fresh.unet, "default", "default_0")


def test_pixart_partial_load_raises(tmp_path: Path) -> None:
    family = FAMILIES["pixart"]
    _, net = _trained("pixart", ALL_LINEAR)
    folder = save_lora(family, net, tmp_path)
    file = folder / "adapter_model.safetensors"
    state = load_file(str(file))
    state.pop(next(k for k in sorted(state) if "lora_B" in k))
    save_file(state, str(file))
    with pytest.raises(FewstepError, match=r"of \d+ tensors"):
        load_lora(family, FACTORIES["pixart"](), tmp_path)


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(FewstepError, match="only safetensors LoRA files are loaded"):
        load_lora(FAMILIES["sd"], FACTORIES["sd"](), tmp_path)


def test_pickle_next_to_safetensors_is_never_read(tmp_path: Path) -> None:
    _, net = _trained("sd", FAMILIES["sd"].lora_targets)
    save_lora(FAMILIES["sd"], net, tmp_path)
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"not a pickle: reading it would fail")
    fresh = load_lora(FAMILIES["sd"], FACTORIES["sd"](), tmp_path)
    _assert_same_adapter(net, fresh.unet, "default", "default_0")


def test_quiet_filter_keeps_other_records(diffusers_warnings: Any) -> None:
    logger = logging.getLogger("diffusers.loaders.lora_base")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with quiet_text_encoder_warnings():
            logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. x")
            logger.warning("something else")
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. y")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else",
                    "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. y"]

