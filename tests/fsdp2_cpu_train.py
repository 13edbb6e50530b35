"""Train a few iterations with fewstep's Trainer under accelerate's FSDP2 on CPU processes, for
tests/test_world_size.py, and write the per-step log rows and the full (gathered) trained weights.

accelerate enables FSDP only on GPU-like devices and builds DDP on CPU processes, so `--engine fsdp2` makes the
run's Accelerator FSDP2 (full shard, each diffusers block its own unit from `_no_split_modules`) before anything is
prepared; from there on it is accelerate's own FSDP2 path: `fully_shard` in `prepare`, DTensor parameters, sharded
Adam states and accelerate's clipping. `--engine single` is the 1-process reference. `--engine fsdp2-run` runs the
whole `fewstep distill` (checkpoints, sample grids, export) with that Accelerator; OUT is then unused. An engine
name ending in `-ac` also turns on FSDP's own activation checkpointing (`fsdp_activation_checkpointing: true`), one
ending in `-rl` accelerate's `fsdp_cpu_ram_efficient_loading: true` (the main process's weights are broadcast into
the others' networks, which start on the meta device), as recipes/accelerate/fsdp2.yaml sets it.
`--engine zero2-run` (`zero3-run`) runs the whole `fewstep distill` under DeepSpeed ZeRO-2 (ZeRO-3) with the settings
of recipes/accelerate/deepspeed-zero2.yaml (deepspeed-zero3.yaml) (DeepSpeed's CPU accelerator, gloo): accelerate launches DeepSpeed only on
GPU-like devices and on CPU processes would give DeepSpeed a 1-process state, so the harness builds the DeepSpeed
plugin itself on the run's 2-process CPU state; `prepare` and every step after it are accelerate's DeepSpeed path.
    accelerate launch --multi_gpu --num_processes 2 tests/fsdp2_cpu_train.py OUT --engine fsdp2 recipe=lcm ..."""
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from fewstep.config import load_config
from fewstep.distill import build_run, make_accelerator


def fsdp2_accelerator(cfg, activation_checkpointing: bool = False, ram_efficient: bool = False):
    """The run's Accelerator, made FSDP2 (full shard, diffusers blocks as units) on CPU processes."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = make_accelerator(cfg)
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                           auto_wrap_policy="transformer_based_wrap",
                                                           activation_checkpointing=activation_checkpointing,
                                                           cpu_ram_efficient_loading=ram_efficient)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP   # or a later state re-read undoes it
    return acc


def zero_accelerator(cfg, stage: int = 2):
    """The run's Accelerator, made DeepSpeed ZeRO on CPU processes with recipes/accelerate/deepspeed-zero{stage}.yaml's
    ZeRO settings (its bf16 is the run's train.mixed_precision here: the CPU tests run in float32)."""
    from accelerate import PartialState
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from fewstep.train import zero

    launch = Path(__file__).resolve().parent.parent / "recipes" / "accelerate" / f"deepspeed-zero{stage}.yaml"
    ds = load_config_from_file(str(launch)).deepspeed_config
    acc = make_accelerator(cfg)
    plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], gradient_clipping=ds["gradient_clipping"],
                             gradient_accumulation_steps=ds["gradient_accumulation_steps"],
                             offload_optimizer_device=ds["offload_optimizer_device"],
                             offload_param_device=ds["offload_param_device"],
                             zero3_init_flag=ds["zero3_init_flag"],
                             zero3_save_16bit_model=ds.get("zero3_save_16bit_model", False))
    plugin.set_mixed_precision(cfg.train.mixed_precision)
    acc.state.deepspeed_plugins = {"default": plugin}
    plugin.select(_from_accelerator_state=True)
    acc.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    acc.deepspeed_engine_wrapped = None   # what Accelerator() sets up when it starts under DeepSpeed
    # what make_accelerator does for a run launched with a DeepSpeed config
    zero.configure(plugin.deepspeed_config, cfg.data.batch_size, cfg.train.gradient_accumulation_steps,
                   cfg.train.grad_clip)
    return acc


def report_partitioned() -> None:
    """Print, once prepared, how many trained parameters ZeRO-3 left with no elements on this process (all of
    them, if it partitioned them): tests/test_zero.py checks the line."""
    from fewstep.train import step

    original = step.RoleOptimizers.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        params = [p for named in self.params.values() for p in named.values()]
        empty = sum(hasattr(p, "ds_id") and p.numel() == 0 and p.ds_numel > 0 for p in params)
        print(f"ZeRO-3 partitioned {empty} of {len(params)} trained parameters", flush=True)

    step.RoleOptimizers.__init__ = init


def main(out: Path, engine: str, argv: list[str]) -> None:
    from accelerate.utils import set_seed
    from torch.distributed.tensor import DTensor

    from fewstep.train.trainer import Trainer

    checkpointing, ram_efficient = engine.endswith("-ac"), engine.endswith("-rl")
    engine = engine.removesuffix("-ac").removesuffix("-rl")
    if engine in ("fsdp2-run", "zero2-run", "zero3-run"):
        import fewstep.distill

        fewstep.distill.make_accelerator = (lambda cfg: zero_accelerator(cfg, int(engine[4]))) \
            if engine.startswith("zero") else (lambda cfg: fsdp2_accelerator(cfg, checkpointing, ram_efficient))
        if engine == "zero3-run":
            report_partitioned()
        fewstep.distill.run(argv)
        return
    cfg = load_config(argv)
    acc = fsdp2_accelerator(cfg, checkpointing, ram_efficient) if engine == "fsdp2" else make_accelerator(cfg)
    set_seed(cfg.train.seed)
    teacher, recipe, dataset = build_run(cfg, acc.device)
    trainer = Trainer(cfg, recipe, teacher, dataset, acc)
    sharded = [p for named in trainer.params.values() for p in named.values() if isinstance(p, DTensor)]
    assert (engine == "fsdp2") == bool(sharded), "FSDP2 must have sharded the trained parameters"
    wrapped = [n for net in trainer.optim.networks for n, _ in net.named_modules() if "_checkpoint_wrapped" in n]
    assert checkpointing == bool(wrapped), "FSDP activation checkpointing must have wrapped the blocks iff asked"
    rows = []
    for _ in range(cfg.train.steps):
        rows.append({"step": trainer.step + 1, **trainer.train_iteration()})
        trainer.step += 1
    full = {f"{role}/{k}": (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous()
            for role, named in trainer.params.items() for k, p in named.items()}
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.json").write_text(json.dumps(rows))
        save_file(full, str(out / "weights.safetensors"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    from fewstep.errors import guarded

    guarded(lambda: main(Path(sys.argv[1]), sys.argv[3], sys.argv[4:]))
