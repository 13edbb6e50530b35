"""One small trainer for every recipe: accelerate (devices, processes, bf16 autocast, trackers), one optimizer and
LR schedule per trainable role, gradient accumulation, EMA, progress, metrics, sample grids and checkpoints.
It knows nothing about any algorithm: the recipe returns losses keyed by the roles that step this iteration."""
from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fewstep.data.datasets import batch_indices, collate
from fewstep.errors import FewstepError
from fewstep.models.student import has_lora, lora_config_dict
from fewstep.models.teacher import Teacher
from fewstep.recipes.base import Batch, Recipe
from fewstep.sampling.draws import DATA, Draws
from fewstep.train import checkpoint as ckpt
from fewstep.train import zero
from fewstep.train.step import RoleOptimizers, train_iteration
from fewstep.train.report import save_grid


class PromptCache:
    """Text conditions per distinct prompt (the text encoders are frozen), so repeated prompts cost nothing."""

    def __init__(self, teacher: Teacher, limit: int = 4096) -> None:
        self.teacher, self.limit, self.rows = teacher, limit, {}

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        if missing:
            enc = self.teacher.encode_prompts(missing)
            fresh = {p: {k: v[i:i + 1] for k, v in enc.items()} for i, p in enumerate(missing)}
            if len(self.rows) + len(missing) <= self.limit:
                self.rows.update(fresh)
        rows = [self.rows[p] if p in self.rows else fresh[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


class Trainer:
    def __init__(self, cfg: Any, recipe: Recipe, teacher: Teacher, dataset: Any, accelerator: Any) -> None:
        self.cfg, self.recipe, self.teacher, self.dataset, self.acc = cfg, recipe, teacher, dataset, accelerator
        self.out = Path(cfg.output_dir)
        self.roles = recipe.trainable()
        self.optim = RoleOptimizers(recipe, cfg.train, accelerator)
        self.params, self.optimizers, self.schedulers = self.optim.params, self.optim.optimizers, self.optim.schedulers
        self.sharded = self.optim.sharded
        if self.sharded:
            check_shardable(recipe, self.optim.shardable)
        self.ema = self._ema()
        self.prompts = PromptCache(teacher, limit=4096 if cfg.train.text_embedding_cache else 0)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._window: dict[str, tuple[float, int]] = {}
        self.nonfinite_streak = 0

    # -- setup ---------------------------------------------------------------------------------------------
    def _ema(self) -> Any:
        if self.cfg.train.ema_decay <= 0:
            return None
        from diffusers.training_utils import EMAModel

        with self.optim.whole():   # its shadow weights are whole copies
            ema = EMAModel(list(self.params["student"].values()), decay=self.cfg.train.ema_decay)
        ema.to(dtype=torch.float32)   # DeepSpeed's bf16 keeps the module's own weights in bf16, too coarse to average
        return ema

    # -- data and randomness -------------------------------------------------------------------------------
    def positions(self, micro: int) -> range:
        """Where this process's samples of micro-step `micro` sit in the step's global batch (the slice that
        `batch_indices` gives it)."""
        size, world = self.cfg.data.batch_size, self.acc.num_processes
        start = (micro * world + self.acc.process_index) * size
        return range(start, start + size)

    def draws(self, micro: int) -> Draws:
        """The recipe's draws for micro-step `micro` of the current step, keyed by the global positions of this
        process's samples, so a run's math does not depend on the number of processes."""
        return Draws.keyed(self.cfg.train.seed, self.step, micro, self.positions(micro))

    def batch(self, index: int) -> Batch:
        """Micro-batch `index` (step * accumulation + micro-step): its images, encoded with per-sample latent
        draws keyed like the recipe's, and its encoded prompts."""
        step, micro = divmod(index, self.cfg.train.gradient_accumulation_steps)
        idx = batch_indices(index, self.cfg.data.batch_size, len(self.dataset), self.cfg.train.seed,
                            self.acc.process_index, self.acc.num_processes)
        images, prompts = collate([self.dataset[i] for i in idx])
        device = self.acc.device
        with torch.no_grad():
            if images is None:
                x0 = torch.empty(0, device=device)
            else:
                latents = Draws.keyed(self.cfg.train.seed, step, micro, self.positions(micro), DATA).sample
                x0 = self.teacher.encode_images(images.to(device), latents).to(device)
            cond = {k: v.to(device) for k, v in self.prompts(prompts).items()}
            neg = {k: v.to(device) for k, v in self.prompts([""] * len(prompts)).items()}
        return Batch(x0=x0, cond=cond, neg=neg, prompts=prompts)

    # -- loop ----------------------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, float]]:
        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, disable=not (t.progress and self.acc.is_main_process),
                   desc=f"{self.cfg.algorithm}", dynamic_ncols=True)
        while self.step < t.steps:
            tic = time.perf_counter()
            row = self.train_iteration()
            row["sec_per_step"] = time.perf_counter() - tic
            if self.acc.device.type == "cuda":   # the allocator's high-water mark so far (what decides an OOM)
                row["cuda_peak_gb"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
            else:                                # this process's resident-memory high-water mark
                row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("loss")})
            self._log(row)
            self._check_finite(row)
            if t.sample_every and self.step % t.sample_every == 0:
                self.sample_grid()
            if t.eval_every and self.step % t.eval_every == 0:
                self.evaluate()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.steps:
                self.save()
        bar.close()
        self.save()
        self.sample_grid()
        if t.eval_every and self.step % t.eval_every:
            self.evaluate()
        return self.history

    def train_iteration(self) -> dict[str, float]:
        accum = self.cfg.train.gradient_accumulation_steps
        totals, stepped = train_iteration(self.recipe, self.optim, lambda micro: self.batch(self.step * accum + micro),
                                          self.draws, self.step, self.acc.autocast)
        if self.ema is not None and "student" in stepped:
            with self.optim.whole():
                self.ema.step(list(self.params["student"].values()))
        return self._mean_over_processes(totals)

    def _mean_over_processes(self, row: dict[str, float]) -> dict[str, float]:
        """The global batch's means of the per-process means (equal shards), for the log."""
        if self.acc.num_processes == 1:
            return row
        keys = sorted(row)
        mean = self.acc.reduce(torch.tensor([row[k] for k in keys], dtype=torch.float64, device=self.acc.device),
                               reduction="mean")
        return dict(zip(keys, mean.tolist()))

    def _check_finite(self, row: dict[str, float]) -> None:
        """Count steps in a row whose losses or gradients were not finite (their optimizer steps were skipped);
        `train.max_nonfinite_steps` of them stop the run before anything more is saved or exported."""
        bad = [k for k, v in row.items() if k.startswith("loss/") and not math.isfinite(v)]
        bad += [k for k, v in row.items() if k.startswith("skipped/") and v > 0]
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad else 0
        limit = self.cfg.train.max_nonfinite_steps
        if limit and self.nonfinite_streak >= limit:
            good = ckpt.latest(self.out / "checkpoints")
            where = f"the last good checkpoint is {good} (resume=latest with a lower train.lr)" if good else \
                "no checkpoint was saved yet"
            raise FewstepError(f"{self.nonfinite_streak} steps in a row (to step {self.step}) had a non-finite loss or "
                               f"gradient ({', '.join(sorted(set(bad)))}), so no optimizer stepped; stopped without "
                               f"saving or exporting: {where}; train.lr is {self.cfg.train.lr}")

    # -- outputs -------------------------------------------------------------------------------------------
    def _log(self, row: dict[str, float]) -> None:
        """Every iteration goes to `history`; metrics.jsonl gets, at each log step, the mean of every metric over
        the iterations since the last log line (so a role that steps every N iterations still shows up)."""
        self.history.append({"step": self.step, **row})
        for k, v in row.items():
            total, count = self._window.get(k, (0.0, 0))
            self._window[k] = (total + v, count + 1)
        if self.step % self.cfg.train.log_every and self.step != self.cfg.train.steps:
            return
        row = {"step": self.step, **{k: total / count for k, (total, count) in self._window.items()}}
        self._window = {}
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.acc.log(row, step=self.step)
            if not self.cfg.train.progress:
                self.acc.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def evaluate(self) -> dict[str, float]:
        """Score the current student with `train.eval_protocol` (fewstep eval's code, no files but the log): every
        process generates its shard; the main process appends `{"step", "eval/<metric>"...}` to eval.jsonl."""
        from fewstep.eval.run import evaluate_during_training

        t = self.cfg.train
        acc = self.acc if self.acc.num_processes > 1 else None
        scores = evaluate_during_training(self.teacher, self.recipe.export_net(), self.recipe.inference(),
                                          t.eval_protocol, t.eval_num_images, accelerator=acc)
        row = {"step": self.step, **{f"eval/{k}": v for k, v in scores.items()}}
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "eval.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.acc.log(row, step=self.step)
            self.acc.print(" ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
        return scores

    def sample_grid(self) -> Path | None:
        """The preview grid at this step, captioned with the recipe, step and sampling settings, e.g.
        "lcm · step 250/1000 · 4 steps (t=0.999,0.760,0.499,0.259) · guidance 1.0" (times in [0, 1])."""
        # sharded or partitioned: every process runs the network's forwards (they gather its blocks or
        # parameters); the main one saves the grid
        images = self.preview_images() if self.optim.collective or self.acc.is_main_process else None
        if self.sharded:
            self.optim.reshard()
        if not self.acc.is_main_process:
            return None
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        spec = self.recipe.inference()
        times = [float(t) for t in spec.times[:-1]]   # the grid ends at 0, which is not a step
        caption = (f"{self.cfg.recipe} · step {self.step}/{self.cfg.train.steps} · {len(times)} steps "
                   f"(t={','.join(f'{t:.3f}' for t in times)}) · guidance {spec.guidance_scale:g}")
        save_grid(images, path, caption=caption)
        return path

    @torch.no_grad()
    def preview_images(self) -> torch.Tensor:
        from fewstep.sampling.generate import generate_images

        spec = self.recipe.inference()
        n = self.cfg.sample.grid_size
        prompts = preview_prompts(self.dataset, n)
        net = self.recipe.export_net()
        return generate_images(self.teacher, spec.wrap(self.teacher.denoiser(net)), net, prompts, list(range(n)),
                               torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale)

    def check_replicas_in_sync(self) -> None:
        """Multi-process runs: every process must hold the same trainables (gradients are averaged before each
        optimizer step). Compares a float64 checksum per role across processes; raises if they drifted apart."""
        if self.acc.num_processes == 1 or self.optim.collective:
            return   # sharded or partitioned parameters (FSDP2, ZeRO-3) have one copy by construction
        sums = torch.stack([torch.stack([p.detach().double().sum() for p in self.params[r].values()]).sum()
                            for r in self.roles]).to(self.acc.device)
        everyone = self.acc.gather(sums[None])
        spread = float((everyone - everyone[0]).abs().max())
        if spread > 1e-6 * (1.0 + float(everyone[0].abs().max())):
            raise RuntimeError(f"trainable weights differ across processes at step {self.step} (checksum spread "
                               f"{spread:.3g}); gradients were not synchronised")

    def save(self) -> Path | None:
        """A checkpoint of this step; none while the last steps were non-finite (nothing to keep there, and
        rotation would drop a good one)."""
        self.check_replicas_in_sync()
        if self.nonfinite_streak:
            return None
        if self.optim.spread:
            return self._save_sharded()
        if not self.acc.is_main_process:
            return None
        tensors = {f"trainable-{r}": dict(self.params[r]) for r in self.roles}
        extra = self.recipe.extra_state()
        if extra:
            tensors["extra"] = extra
        blobs = {"optimizers": {r: o.state_dict() for r, o in self.optimizers.items()},
                 "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
                 "rng": {"torch": torch.get_rng_state()}}
        if self.ema is not None:
            blobs["ema"] = self.ema.state_dict()
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, tensors, blobs, self.meta(),
                                    self.cfg.train.keep_checkpoints)

    def _shard_extra(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors beside the trainables that a sharded checkpoint holds in its shards: the recipe's extra state
        (LCM's target network) and the EMA's shadow weights, named by the student's parameter names."""
        extra = {"extra": self.recipe.extra_state()}
        if self.ema is not None:
            extra["ema.student"] = dict(zip(self.params["student"], self.ema.shadow_params))
        return {k: v for k, v in extra.items() if v}

    def _save_sharded(self) -> Path | None:
        """Every process writes its part of the trained parameters and optimizer states (FSDP2's shards, ZeRO's
        partitions: `shards.save_shards`) into the main process's staging folder; the main one adds the rest and
        renames it into place."""
        from accelerate.utils import broadcast_object_list

        from fewstep.train import shards

        self.optim.reshard()
        roles = {r: self.optim.role_state(r) for r in self.roles}
        tensors = shards.run_state(roles, self._shard_extra())
        blobs = {"optimizer_groups": {r: s.settings() for r, s in roles.items()},
                 "schedulers": {r: s.state_dict() for r, s in self.schedulers.items()},
                 "rng": {"torch": torch.get_rng_state()}}
        if self.ema is not None:   # its shadow weights are in the shards
            blobs["ema"] = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        meta = {**self.meta(), "sharded": True, "shards": shards.LAYOUT}
        if not self.acc.is_main_process:   # the main process names its staging folder, or the error it met first
            kind, text = broadcast_object_list([None])[0]
            if kind == "dir":
                shards.save_shards(Path(text), tensors)
                kind, text = broadcast_object_list([None])[0]
            if kind == "error":
                raise FewstepError(text)
            return None

        def write_shards(tmp: Path) -> None:
            broadcast_object_list([("dir", str(tmp))])
            shards.save_shards(tmp, tensors)

        try:
            saved = ckpt.save_checkpoint(self.out / "checkpoints", self.step, {}, blobs, meta,
                                         self.cfg.train.keep_checkpoints, shards=write_shards)
        except FewstepError as exc:
            broadcast_object_list([("error", str(exc))])
            raise
        broadcast_object_list([("ok", str(saved))])
        return saved

    def export_net(self) -> nn.Module | None:
        """The recipe's export network with full weights on the main process (gathered when sharded: call it on
        every process); None on the others when sharded."""
        return self.optim.export_network(self.recipe.export_net())

    def apply_ema(self) -> None:
        """Copy the EMA weights into the student (end of training / export); no-op without train.ema_decay."""
        if self.ema is not None:
            with self.optim.whole(modify=True):
                self.ema.copy_to(list(self.params["student"].values()))
            if zero.is_deepspeed(self.acc):   # the export reads the fp32 masters
                zero.set_masters(list(self.params["student"].values()), self.ema.shadow_params)

    def meta(self) -> dict[str, Any]:
        student = self.roles["student"]
        lora = lora_config_dict(student) if has_lora(student) else None
        return {"recipe": self.cfg.recipe, "algorithm": self.cfg.algorithm, "student_mode": self.cfg.student.mode,
                "lora_rank": lora["r"] if lora else None, "teacher": self.cfg.teacher.pretrained,
                "global_batch": self.cfg.data.batch_size * self.acc.num_processes
                * self.cfg.train.gradient_accumulation_steps,
                "log_window": {k: list(v) for k, v in self._window.items()}}

    def restore(self, path: Path) -> None:
        tensors, blobs, meta = ckpt.load_checkpoint(path)
        check_compatible(meta, self.meta(), path)
        wanted = {r: [g["initial_lr"] for g in o.param_groups] for r, o in self.optimizers.items()}   # this run's lr
        if meta.get("sharded"):
            self._restore_sharded(path, blobs, meta)
        else:
            self._restore_full(path, tensors, blobs)
        for role in self.roles:
            self.schedulers[role].load_state_dict(blobs["schedulers"][role])
            apply_lr(self.optimizers[role], self.schedulers[role], wanted[role])
        torch.set_rng_state(blobs["rng"]["torch"])
        if self.ema is not None and "ema" in blobs:   # an engine that spreads the weights took the shadow ones by range
            state = blobs["ema"]
            self.ema.load_state_dict({k: v for k, v in state.items() if k != "shadow_params"} if self.optim.spread
                                     else state)
        self.step = int(meta["step"])
        self._window = {k: (float(total), int(count)) for k, (total, count) in meta.get("log_window", {}).items()}
        if self.acc.is_main_process:   # rows logged after this checkpoint are logged again from here on
            for name in ("metrics.jsonl", "eval.jsonl"):
                truncate_log(self.out / name, self.step)

    def _restore_sharded(self, path: Path, blobs: dict[str, Any], meta: dict[str, Any]) -> None:
        """Parameters and optimizer states from the checkpoint's shards, resharded for this run's engine and
        world size (or read whole by a run that does not shard)."""
        import warnings

        from torch.distributed.checkpoint.api import CheckpointException

        from fewstep.train import shards

        missing = [f"{stem}.pt" for stem in ("optimizer_groups", "schedulers", "rng") if stem not in blobs]
        if missing or not (path / shards.SHARDS).is_dir():
            raise FewstepError(f"checkpoint {path} is incomplete: {', '.join(missing) or shards.SHARDS + '/'} missing; "
                               "resume from an earlier checkpoint (resume=<run>/checkpoints/step-...)")
        if meta.get("shards") != shards.LAYOUT:
            raise FewstepError(f"checkpoint {path} was written by fewstep before 2026-12-07 (shards of shaped "
                               "tensors); resume it with that version, or start a new output_dir")
        with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process.*")
            try:
                roles = {r: self.optim.role_state(r) for r in self.roles}
                shards.load_shards(path, roles, self._shard_extra(), blobs["optimizer_groups"])
            except (CheckpointException, Exception) as exc:   # any unreadable shard means the same to the user
                raise ckpt.damaged(path, f"its shards do not load: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc

    def _restore_full(self, path: Path, tensors: dict[str, Any], blobs: dict[str, Any]) -> None:
        """Parameters and optimizer states from a checkpoint of full tensors (1 process or DDP wrote it); an
        engine that spreads them over the processes (FSDP2, ZeRO) takes each process's ranges of them."""
        for role in self.roles:
            if f"trainable-{role}" not in tensors:
                raise FewstepError(f"checkpoint {path} is incomplete: trainable-{role}.safetensors is missing; resume "
                                   "from an earlier checkpoint (resume=<run>/checkpoints/step-...)")
            check_trainables(self.params[role], tensors[f"trainable-{role}"], path, role)
        missing = [f"{stem}.pt" for stem in ("optimizers", "schedulers", "rng") if stem not in blobs]
        if missing:
            raise FewstepError(f"checkpoint {path} is incomplete: {', '.join(missing)} missing; resume from an earlier "
                               "checkpoint (resume=<run>/checkpoints/step-...)")
        weights = {r: tensors[f"trainable-{r}"] for r in self.roles}
        if not self.optim.spread:
            self.recipe.load_extra_state(tensors.get("extra", {}))
            for role in self.roles:
                self.optim.load(role, weights[role], blobs["optimizers"][role])
            return
        from fewstep.train import shards

        saved_extra = {"extra": tensors.get("extra", {})}
        if self.ema is not None and "ema" in blobs:   # its shadow weights go in by range; restore loads the rest
            saved_extra["ema.student"] = dict(zip(self.params["student"], blobs["ema"]["shadow_params"]))
        try:
            shards.load_full({r: self.optim.role_state(r) for r in self.roles}, self._shard_extra(), weights,
                             blobs["optimizers"], saved_extra)
        except (KeyError, ValueError) as exc:
            raise FewstepError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: {exc}); resume it "
                               "with the settings it was written with") from exc


def check_shardable(recipe: Recipe, networks: list[nn.Module]) -> None:
    """What a run whose parameters FSDP2 shards cannot do yet, refused in one line before it trains."""
    if recipe.export_net() not in networks:   # modules compare by identity
        raise FewstepError(f"{type(recipe).__name__} exports a network FSDP2 did not shard as one piece; launch it "
                           "with recipes/accelerate/ddp.yaml")


def apply_lr(optimizer: Any, scheduler: Any, initial: list[float]) -> None:
    """Give a restored optimizer this run's learning rates (resume with a changed train.lr), keeping the schedule's
    position: each group's lr is the new initial lr times the factor the schedule had reached."""
    for group, lr in zip(optimizer.param_groups, initial):
        if group["initial_lr"] != lr:
            group["lr"] = lr * group["lr"] / group["initial_lr"]
            group["initial_lr"] = lr
    getattr(scheduler, "scheduler", scheduler).base_lrs = list(initial)   # inside accelerate's wrapper


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to `step` (atomically), so a resumed run's log equals an
    uninterrupted one's."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key, fix in (("algorithm", "recipe"), ("student_mode", "student.mode"), ("lora_rank", "student.lora.rank")):
        if saved.get(key) != current.get(key):
            raise FewstepError(f"checkpoint {path} was trained with {fix}={saved.get(key)} but this run has "
                               f"{fix}={current.get(key)}; set {fix}={saved.get(key)} or start a new output_dir")


def check_trainables(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], path: Path, role: str) -> None:
    shape = {k: getattr(p, "ds_shape", p.shape) for k, p in params.items()}   # ZeRO-3: the partitioned one's
    if set(params) != set(state) or any(shape[k] != state[k].shape for k in params):
        raise FewstepError(f"checkpoint {path} does not match the {role}'s trainable parameters (different LoRA "
                           "targets or architecture); use the config the run was started with")


def preview_prompts(dataset: Any, n: int) -> list[str]:
    """Class-balanced prompts for the digits data; otherwise the first distinct prompts of the dataset."""
    from fewstep.data.datasets import DigitsDataset

    if isinstance(dataset, DigitsDataset):
        from fewstep.data.digits import class_balanced_prompts

        return class_balanced_prompts(n)
    prompts = list(dict.fromkeys(dataset[i][1] for i in range(min(len(dataset), 10 * n))))
    return [prompts[i % len(prompts)] for i in range(n)]
