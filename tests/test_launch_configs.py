"""The accelerate launch configs in recipes/accelerate/ (issue 12), checked without GPUs: each loads with
accelerate's own config reader, goes through `accelerate launch`'s validation and environment preparation, and the
FSDP2 plugin and parallelism config that a launched process would build from that environment have the settings
the file promises. What needs CUDA (sharding itself, ZeRO) runs in tests/test_cuda.py."""
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from torch import nn

from fewstep.errors import FewstepError
from fewstep.train.step import check_engine

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
EXPECTED = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "fsdp2-hybrid": "FSDP", "deepspeed-zero2": "DEEPSPEED",
            "deepspeed-zero3": "DEEPSPEED"}


def test_every_config_is_there_and_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, kind in EXPECTED.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert str(cfg.distributed_type).endswith(kind) and cfg.mixed_precision == "bf16"
        if kind == "DEEPSPEED":
            ds = cfg.deepspeed_config
            assert ds["zero_stage"] == int(name[-1]) and ds["gradient_clipping"] == 1.0   # train.grad_clip's default


def launched_env(name: str) -> tuple[dict[str, str], object]:
    """The environment `accelerate launch --config_file recipes/accelerate/<name>.yaml` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "scripts/distill.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args), args


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2-hybrid"])
def test_fsdp2_configs_build_the_promised_plugin(name: str):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    env, args = launched_env(name)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True          # full shard
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")                 # a shard per rank
    assert plugin.cpu_ram_efficient_loading is True                                   # rank 0 loads, then broadcast
    assert plugin.activation_checkpointing is False      # fewstep's adapter-aware recompute instead (see the file)
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy                    # blocks: _no_split_modules
    if name == "fsdp2-hybrid":
        from accelerate.parallelism_config import ParallelismConfig

        with mock.patch.dict(os.environ, env):
            pc = ParallelismConfig()
        assert (pc.dp_replicate_size, pc.dp_shard_size) == (4, 8) and pc.total_size == int(args.num_processes)


def test_ddp_config_launches_one_process_per_gpu():
    env, args = launched_env("ddp")
    assert args.multi_gpu and int(args.num_processes) == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_diffusers_networks_name_the_blocks_fsdp2_shards():
    """TRANSFORMER_BASED_WRAP with no class list takes the network's `_no_split_modules` (accelerate's FSDP2)."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    for cls, block in ((UNet2DConditionModel, "BasicTransformerBlock"), (FluxTransformer2DModel, "FluxTransformerBlock"),
                       (SD3Transformer2DModel, "JointTransformerBlock"),
                       (PixArtTransformer2DModel, "BasicTransformerBlock")):
        assert block in cls._no_split_modules


def _fake(kind: str, activation_checkpointing: bool = False) -> SimpleNamespace:
    plugin = SimpleNamespace(activation_checkpointing=activation_checkpointing)
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", state=SimpleNamespace(fsdp_plugin=plugin))


def test_engine_settings_fewstep_cannot_honour_are_refused_in_one_line():
    shared = nn.Linear(2, 2)                   # one network, two roles (two adapters on one base)
    a, b = nn.Parameter(shared.weight), nn.Parameter(shared.bias)
    shared.weight, shared.bias = a, b
    two_roles = {"student": {"w": a}, "critic": {"b": b}}
    with pytest.raises(FewstepError, match=r"^DeepSpeed runs recipes with one trained role .*fsdp2.yaml"):
        check_engine(_fake("DEEPSPEED"), [shared], two_roles)
    check_engine(_fake("DEEPSPEED"), [shared], {"student": {"w": a, "b": b}})          # LCM: one role
    with pytest.raises(FewstepError, match="fsdp_activation_checkpointing .* student.gradient_checkpointing=true"):
        check_engine(_fake("FSDP", activation_checkpointing=True), [shared], two_roles)
    check_engine(_fake("FSDP", activation_checkpointing=False), [shared], two_roles)
    separate = [nn.Linear(2, 2), nn.Linear(2, 2)]
    check_engine(_fake("FSDP", activation_checkpointing=True), separate,
                 {"student": dict(separate[0].named_parameters()), "critic": dict(separate[1].named_parameters())})


def test_deepspeed_config_is_completed_from_the_run_or_refused_in_one_line():
    """zero.configure (called by make_accelerator under DeepSpeed): `auto` values take the run's settings, a value
    that contradicts them is refused instead of silently winning (accelerate's own behaviour for the accumulation
    steps), and what fewstep's trainer does not run (stage 0, a DeepSpeed optimizer or scheduler) too. Both shipped
    ZeRO files pass with train's defaults."""
    from accelerate.commands.config.config_args import load_config_from_file

    from fewstep.train import zero

    def ds(**over):
        return {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", **over}

    cfg = ds()
    zero.configure(cfg, batch_size=8, accumulation=2, grad_clip=0.5)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["gradient_clipping"]) \
        == (8, 2, 0.5)
    for name in ("deepspeed-zero2.yaml", "deepspeed-zero3.yaml"):   # the files' values: train's defaults
        shipped = load_config_from_file(str(CONFIGS / name)).deepspeed_config
        cfg = ds(zero_optimization={"stage": shipped["zero_stage"]},
                 gradient_accumulation_steps=shipped["gradient_accumulation_steps"],
                 gradient_clipping=shipped["gradient_clipping"])
        zero.configure(cfg, 4, 1, 1.0)
        assert cfg["train_micro_batch_size_per_gpu"] == 4
    for over, args, needle in (
            ({"gradient_clipping": 1.0}, (4, 1, 0.5), r"gradient_clipping: 1.0 contradicts train.grad_clip=0.5"),
            ({"gradient_accumulation_steps": 1}, (4, 4, 1.0),
             r"gradient_accumulation_steps: 1 contradicts train.gradient_accumulation_steps=4"),
            ({"train_micro_batch_size_per_gpu": 16}, (4, 1, 1.0), r"16 contradicts data.batch_size=4"),
            ({"zero_optimization": {"stage": 0}}, (4, 1, 1.0), r"stage 0.*ddp.yaml"),
            ({"optimizer": {"type": "Adam"}}, (4, 1, 1.0), r"sets its own optimizer.*remove the optimizer section")):
        with pytest.raises(FewstepError, match=needle):
            zero.configure(ds(**over), *args)


def test_deepspeed_refuses_a_role_that_trains_two_networks():
    nets = [nn.Linear(2, 2), nn.Linear(2, 2)]
    both = {"critic": {**{f"a.{k}": p for k, p in nets[0].named_parameters()},
                       **{f"b.{k}": p for k, p in nets[1].named_parameters()}}}
    with pytest.raises(FewstepError, match=r"^DeepSpeed runs recipes with one trained role and network"):
        check_engine(_fake("DEEPSPEED"), nets, both)
