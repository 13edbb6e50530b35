"""`fewstep eval MODEL [MODEL ...] --protocol NAME`: generate through the sampling engine, score, report.

For every protocol, model and step count: the protocol's prompts (image i: prompt i, seed `seed + i`) are sharded
over the processes of an `accelerate` run (process p takes indices p::P; a plain `python`/`fewstep` call is one
process), generated in batches with `generate_latents` + the family's decode, and each batch is streamed into
the metric accumulators of `fewstep.eval.scoring` (FID sums, per-sample scores, a few images for the grid), so no
run ever holds all its images. At the end the shards are combined (`gather_stats`, gathered per-sample values) and
only the main process writes. `evaluate_during_training` runs the same scoring on a student inside the trainer.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from time import perf_counter
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fewstep.errors import FewstepError
from fewstep.paths import claim_output
from fewstep.eval import references as refs
from fewstep.eval import report, scoring
from fewstep.eval.protocols import Protocol, build_prompts, load_protocol
from fewstep.eval.report import EvalRow, add_speedups, markdown, write_report
from fewstep.metrics.fid import hash_items
from fewstep.models.teacher import Teacher
from fewstep.recipes.base import InferenceSpec
from fewstep.sample import TEACHER_DEFAULT_STEPS, precision_dtype, resolve_model
from fewstep.sampling.generate import generate_latents, guided
from fewstep.train.shards import collective_forwards


@dataclass
class EvalOptions:
    """Everything but the models and protocols."""

    steps: list[int] | None = None      # teachers' step counts; None: 50
    guidance: float | None = None       # teachers' CFG scale; None: 1.0
    student_steps: list[int] | None = None     # exports' step counts; None: each export's own
    student_guidance: float | None = None      # exports' CFG scale; None: each export's own
    num_images: int | None = None       # None: the protocol's
    batch_size: int = 32
    seed: int | None = None             # None: the protocol's; image i uses seed + i
    device: str | None = None           # None: the accelerator's device
    precision: str = "auto"             # auto | fp32 | bf16 (as `fewstep sample`)
    overrides: list[str] = field(default_factory=list)   # protocol key=value
    progress: bool = True


class LocalAccelerator:
    """Stand-in for `accelerate.Accelerator` in one process, with no collectives (the trainer hook)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """The image indices process `rank` of `world` generates: rank, rank + world, ... below n."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad shard rank={rank} of world={world}")
    return list(range(rank, n, world))


@dataclass
class Target:
    """One model at one step count."""

    model: str
    display: str
    kind: str
    teacher_name: str
    teacher: Teacher
    spec: InferenceSpec
    steps: int
    net: nn.Module | None = None         # sample this network instead of the bundle's (trainer hook)

    @property
    def label(self) -> str:
        return f"{self.display} ({self.kind}, {self.spec.step} {self.steps} steps, w={self.spec.guidance_scale:g})"

    def sampler(self) -> tuple[nn.Module, nn.Module]:
        """(denoiser, network) to sample with; phased students switch adapters by time."""
        net = self.net if self.net is not None else self.teacher.net
        return self.spec.wrap(self.teacher.denoiser(net)), net


def export_meta(model: str) -> dict | None:
    """The sidecar of an export folder, None for a teacher name or folder."""
    from fewstep.paths import read_sidecar

    return read_sidecar(Path(model)) if Path(model).is_dir() else None


def model_settings(meta: dict | None, opts: EvalOptions) -> tuple[list[int] | None, float | None]:
    """(steps, guidance): the student options for an export (`meta` = its sidecar), the teacher options otherwise,
    so one call can compare a teacher at 1..50 guided steps with students at their own settings."""
    return (opts.student_steps, opts.student_guidance) if meta is not None else (opts.steps, opts.guidance)


def load_targets(model: str, opts: EvalOptions, device: str) -> list[Target]:
    """Load MODEL once and derive its sampler for every step count (export: own grid at its own count)."""
    meta = export_meta(model)
    steps, guidance = model_settings(meta, opts)
    teacher, spec, name = resolve_model(model, None, guidance, device)
    teacher.autocast_dtype = precision_dtype(opts.precision, device)
    own = len(spec.times) - 1
    display = "/".join(Path(model).resolve().parts[-2:]) if Path(model).is_dir() else model
    kind = "teacher" if meta is None else f"{meta.get('recipe', '?')} student"
    out = []
    for k in steps or [own if meta else TEACHER_DEFAULT_STEPS]:
        times = teacher.teacher_times(k) if meta is None else spec.times if k == own else teacher.student_times(k)
        out.append(Target(model, display, kind, name, teacher, replace(spec, times=[float(t) for t in times]), k))
    return out


def nfe(teacher: Teacher, net: nn.Module, steps: int, guidance: float) -> int:
    """Network evaluations per image: steps, doubled by batched CFG."""
    return steps * (2 if guided(teacher, teacher.denoiser(net), net, guidance)[1] else 1)


def generate_into(teacher: Teacher, denoiser: nn.Module, net: nn.Module, spec: InferenceSpec, prompts: list[str],
                  seed: int, indices: Sequence[int], batch_size: int, sinks: Sequence[Any], bar: Any,
                  rounds: int = 0) -> float:
    """Generate images `indices` in batches into `sinks`; returns the seconds spent generating and decoding.
    With `rounds`, this process runs exactly that many batches (after the warm-up image), repeating image 0 in
    batches it has no images for and dropping them: the forwards of a network FSDP2 shards are collective, so
    every process must run the same number."""
    times = torch.tensor(spec.times, dtype=torch.float64)
    cuda = next(net.parameters()).device.type == "cuda"
    def untimed_image() -> None:
        first = prompts[indices[0] if len(indices) else 0]
        generate_latents(teacher, denoiser, net, [first], [seed], times, spec.step, spec.guidance_scale)

    if len(indices) or rounds:  # one untimed image first, so lazy initialisation is not timed
        untimed_image()
    seconds = 0.0
    for start in range(0, max(len(indices), rounds * batch_size), batch_size):
        chunk = list(indices[start:start + batch_size])
        if not chunk:   # a batch only the other processes have images for
            untimed_image()
            continue
        p = [prompts[i] for i in chunk]
        tic = perf_counter()
        lat = generate_latents(teacher, denoiser, net, p, [seed + i for i in chunk], times, spec.step,
                               spec.guidance_scale)
        images = teacher.decode(lat).float()
        if cuda:
            torch.cuda.synchronize()
        seconds += perf_counter() - tic
        for sink in sinks:
            sink.update(images, p, chunk)
        bar.update(len(chunk))
    return seconds


@dataclass
class Context:
    """State shared by the rows of one run."""

    proto: Protocol
    prompts: list[str]
    seed: int
    opts: EvalOptions
    acc: Any
    device: str
    store: Path | None                   # reference-statistics store (None: none)
    save_refs: bool = True               # False: read the store, never write (trainer hook)
    memo: dict = field(default_factory=dict)
    teachers: dict = field(default_factory=dict)
    extractors: dict = field(default_factory=dict)

    def bar(self, n: int, desc: str) -> Any:
        return tqdm(total=n, desc=desc, leave=False, disable=not (self.opts.progress and self.acc.is_main_process))

    def shard(self, n: int) -> list[int]:
        return shard_indices(n, self.acc.process_index, self.acc.num_processes)


def evaluate_target(ctx: Context, target: Target, shared: dict[str, Any], out: Path | None) -> EvalRow:
    """Generate and score one row."""
    proto, n = ctx.proto, len(ctx.prompts)
    sinks: list[Any] = []
    records, scorers, roles = [], {}, {"geneval": "geneval_overall"}
    res = proto.fid.eval_res
    if proto.fid.extractor != "none":
        metric, record = refs.fid_metric(ctx, target, generate_into)
        sinks.append(metric)
        records.append(record)
        scorers["extractor"] = metric.extractor.describe()
        roles["fid"] = metric.name
        for extra in proto.fid.extra_extractors:   # a second feature space on the same images and reference
            metric, record = refs.fid_metric(ctx, target, generate_into, extra)
            sinks.append(metric)
            records.append(record)
            scorers.setdefault("extra_extractors", []).append(metric.extractor.describe())
    if "clip" in shared:
        clip = shared["clip"]
        sinks.append(scoring.SampleMetric(f"clip_score[{clip.model_name}]", clip.score, res))
        scorers["clip"] = clip.describe()
        roles["clip_score"] = sinks[-1].name
    for r in shared["rewards"]:
        sinks.append(scoring.SampleMetric(f"reward[{r.name}]", r, res))
        scorers.setdefault("rewards", []).append(r.describe())
        roles.setdefault("reward", sinks[-1].name)
    if proto.main_metric not in roles:
        raise FewstepError(f"protocol {proto.name}: main_metric={proto.main_metric} but no such metric is configured")
    if proto.digits:
        sinks.append(scoring.DigitsMetric())
    writer = None
    if "geneval_config" in shared:
        folder = Path(out) / "geneval" / scoring.slug(target.label)
        writer = scoring.geneval_writer(folder, n, ctx.seed, shared, ctx.acc)
        scorers["geneval"] = writer.describe()
    grid = scoring.GridKeeper(proto.grid, -(-proto.grid // ctx.acc.num_processes))
    idx = ctx.shard(n)
    t = target.teacher
    denoiser, net = target.sampler()
    bs = ctx.opts.batch_size
    most = len(shard_indices(n, 0, ctx.acc.num_processes))   # process 0 has the most images
    rounds = -(-most // bs) if collective_forwards(net.parameters()) else 0
    with ctx.bar(len(idx), target.label) as bar:
        seconds = generate_into(t, denoiser, net, target.spec, ctx.prompts, ctx.seed, idx, bs,
                                [*sinks, *([writer] if writer else []), grid], bar, rounds)
    metrics: dict[str, float] = {}
    for sink in sinks:
        metrics.update(sink.finalize(ctx.acc))
    label = proto.description
    if writer is not None:
        got, label = writer.finalize(ctx.acc)
        metrics.update(got)
    total = sum(scoring.gather_list([seconds], ctx.acc))
    g = target.spec.guidance_scale
    return EvalRow(protocol=proto.name, protocol_label=label or proto.description, model=target.display,
                   label=target.label, kind=target.kind, teacher=target.teacher_name, steps=target.steps,
                   nfe=nfe(t, net, target.steps, g), guidance=g, sampler=target.spec.step, resolution=t.size, n=n,
                   seeds=(ctx.seed, ctx.seed + n - 1), seconds_per_image=total / n,
                   main_metric=roles[proto.main_metric], metrics=metrics, references=records, scorers=scorers,
                   prompts_sha256=hash_items(ctx.prompts), grid_images=grid.finalize(ctx.acc))


def make_accelerator(device: str | None) -> tuple[Any, str]:
    """(Accelerator, device string); `--device cpu` keeps every process on the CPU."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=device == "cpu")
    return acc, device if device not in (None, "cuda") else str(acc.device)


def run_eval(models: list[str], protocols: list[str], options: EvalOptions | None = None,
             out: Path | None = None) -> list[EvalRow]:
    """Evaluate every model (every step count) under every protocol; rows in protocol, model, steps order."""
    opts = options or EvalOptions()
    if opts.batch_size < 1 or (opts.num_images is not None and opts.num_images < 1):
        raise FewstepError("--batch-size and --num-images must be >= 1")
    protos = [load_protocol(p, opts.overrides) for p in protocols]   # fails fast on missing files
    acc, device = make_accelerator(opts.device)
    targets = [t for m in models for t in load_targets(m, opts, device)]
    rows = []
    for proto in protos:
        shared = scoring.shared_scorers(proto, device, out, acc)
        prompts = build_prompts(proto, opts.num_images)
        seed = proto.seed if opts.seed is None else opts.seed
        ctx = Context(proto, prompts, seed, opts, acc, device, refs.stats_root(proto.stats_dir))
        rows += [evaluate_target(ctx, t, shared, out) for t in targets]
    add_speedups(rows)
    return rows


def run_eval_cli(args: Any, argv: Sequence[str]) -> list[EvalRow]:
    """`fewstep eval`: refuse an existing report before any work, run, print the table, write (main process)."""
    from accelerate import PartialState

    from fewstep.cli_args import int_list as parse_int_list
    from fewstep.metrics.toy_report import write_section

    out = claim_output(args.out, "--out")
    steps = parse_int_list(args.steps, "--steps") if args.steps else None
    student_steps = parse_int_list(args.student_steps, "--student-steps") if args.student_steps else None
    opts = EvalOptions(steps=steps, guidance=args.guidance, student_steps=student_steps,
                       student_guidance=args.student_guidance, num_images=args.num_images, batch_size=args.batch_size,
                       seed=args.seed, device=args.device, precision=args.precision, overrides=list(args.set or []),
                       progress=not args.no_progress)
    rows = run_eval(args.models, args.protocol, opts, out)
    state = PartialState()
    if state.is_main_process:
        command = "fewstep " + shlex.join(list(argv))
        env = report.environment(args.device or str(state.device), args.precision, state.num_processes)
        protos = {p: asdict(load_protocol(p, opts.overrides)) for p in args.protocol}
        write_report(rows, out, command, env, protos)
        body = markdown(rows, command, env)
        print(body)
        if args.results:
            section = args.section or "eval-" + "-".join(args.protocol)
            write_section(Path(args.results), section, body)
            print(f"wrote section {section} of {args.results}")
        print(f"wrote {out / 'report.json'}, report.md, metric_vs_nfe.png and grids/")
    state.wait_for_everyone()      # leave together, then close the process group (an abandoned gloo group can abort)
    state.destroy_process_group()
    return rows


def evaluate_during_training(teacher: Teacher, net: nn.Module, spec: InferenceSpec, protocol: str | Protocol,
                             num_images: int, *, seed: int | None = None, batch_size: int = 64,
                             accelerator: Any = None, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Score the current student `net` (sampled with `spec`) under `protocol`; writes no files.

    Without `accelerator` it runs in this process alone (no collectives, safe to call on the main process only);
    with the trainer's accelerator every process must call it and each generates its shard. A teacher-FID
    reference is read from the stats store when present, else generated in memory by a freshly loaded teacher.
    """
    proto = protocol if isinstance(protocol, Protocol) else load_protocol(protocol, list(overrides))
    proto = replace(proto, grid=0)   # no grid: nothing is written
    if proto.prompts.source == "geneval":
        raise FewstepError("the geneval protocol writes image folders: evaluate it after training with fewstep eval")
    acc = accelerator or LocalAccelerator()
    device = str(next(net.parameters()).device)
    store = refs.stats_root(proto.stats_dir)
    ctx = Context(proto, build_prompts(proto, num_images), proto.seed if seed is None else seed,
                  EvalOptions(batch_size=batch_size, progress=False), acc, device, store if store.is_dir() else None,
                  save_refs=False, memo=_TRAINING_MEMO)
    target = Target(teacher.name, teacher.name, "student", teacher.name, teacher, spec, len(spec.times) - 1, net)
    was_training = net.training
    net.eval()
    try:
        row = evaluate_target(ctx, target, scoring.shared_scorers(proto, device, None, acc), None)
    finally:
        net.train(was_training)
    return {k: float(v) for k, v in row.metrics.items()}


_TRAINING_MEMO: dict = {}   # references computed in memory by evaluate_during_training, reused across calls
