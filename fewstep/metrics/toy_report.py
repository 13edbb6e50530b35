"""The toy quality benchmark: teacher and students on an embedded toy teacher (`--teacher`: toy-digits, the VP
UNet, or toy-digits-sd3, the rectified-flow SD3 transformer), scored with fid[digits-cnn] and
fid[digits-mlp] (two independent digits feature spaces: a CNN and an MLP trained on different splits), class
accuracy and per-class diversity, timed per image, written to docs/results.md by this script only. A "student
beats teacher" statement stands only where both FIDs agree. `--rewards` adds each named reward's mean over the
images (e.g. digits-class, the log-probability of the prompted digit that RTDMD trains on, and micro-clip, a scorer
it does not train on, to catch reward hacking). `--tilt-beta` adds rows of the teacher tilted by a reward with a
known maximum, p(x) exp(r(x) / beta), drawn exactly by rejection sampling: the target RTDMD distils towards;
`--tilt-student` adds an export's (a stage-1 export tilted is the optimum of RTDMD stage 2 with a KL to it).

    python scripts/toy_benchmark.py --student lcm=runs/lcm-toy/export --section toy-lcm
    python scripts/toy_benchmark.py --teacher toy-digits-sd3 --teacher-guidance 3,2,1 --section toy-sd3

`--update` re-scores only the rows this command names and keeps the section's other rows (from results.json):
rows of the same name are replaced in place, new ones appended, `--drop NAME` removes one, and the section's first
line keeps the earlier command and names the rows the new one re-scored or dropped, so every row stays traceable to
the command that scored it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fewstep.data.digits import class_balanced_prompts, parse_digit
from fewstep.export import load_export
from fewstep.metrics.digits import METRIC_NAME, MLP_METRIC_NAME, default_mlp, mlp_reference, score_digits
from fewstep.metrics.rewards import RewardFn, build_reward
from fewstep.metrics.tilt import rejection_sample, reward_upper_bound
from fewstep.models.teacher import Teacher, load_teacher
from fewstep.paths import SIDECAR
from fewstep.recipes.base import InferenceSpec
from fewstep.sampling.generate import generate_images
from fewstep.train.report import save_grid


@dataclass
class Row:
    name: str
    steps: int
    guidance: float
    fid: float
    accuracy: float
    diversity: float
    sec_per_image: float
    n: int
    fid_mlp: float = float("nan")   # fid[digits-mlp]; `fid` is fid[digits-cnn]
    rewards: dict[str, float] = field(default_factory=dict)   # reward name -> mean over the n images
    accuracy_mlp: float = float("nan")    # class accuracy and diversity under the MLP (`accuracy`, `diversity`: the
    diversity_mlp: float = float("nan")   # CNN, which digits-class also is): a witness the reward never saw


def reward_scores(reward: RewardFn, images: torch.Tensor, prompts: list[str], batch_size: int = 250) -> torch.Tensor:
    """The reward of every image, (N,), scored in batches."""
    return torch.cat([reward(images[i:i + batch_size], prompts[i:i + batch_size]).float()
                      for i in range(0, len(images), batch_size)])


def mean_rewards(images: torch.Tensor, prompts: list[str], rewards: dict[str, RewardFn],
                 batch_size: int = 250) -> dict[str, float]:
    """Each reward's mean over the images (scored in batches, no gradients)."""
    return {name: float(reward_scores(reward, images, prompts, batch_size).mean()) for name, reward in rewards.items()}


def spec_images(teacher: Teacher, spec: InferenceSpec, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The model's images at `spec` (its times, step and CFG scale), one per prompt and seed."""
    return generate_images(teacher, spec.wrap(teacher.denoiser()), teacher.net, prompts, seeds,
                           torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale,
                           batch_size=250)


def evaluate(name: str, teacher: Teacher, spec: InferenceSpec, n: int, seed: int, grid_dir: Path | None,
             rewards: dict[str, RewardFn] | None = None) -> Row:
    """Generate n class-balanced images (seeds seed..seed+n-1), time it, score it (and each reward), save a 10x10
    grid."""
    prompts = class_balanced_prompts(n)
    tic = time.perf_counter()
    images = spec_images(teacher, spec, prompts, list(range(seed, seed + n)))
    seconds = time.perf_counter() - tic
    return scored_row(name, len(spec.times) - 1, spec.guidance_scale, images, prompts, seconds / n, grid_dir, rewards)


def scored_row(name: str, steps: int, guidance: float, images: torch.Tensor, prompts: list[str],
               sec_per_image: float, grid_dir: Path | None, rewards: dict[str, RewardFn] | None) -> Row:
    """The row of one image set: FID, accuracy and diversity under both digits classifiers, each reward's mean; a
    10x10 grid of its first 100 images sorted by label."""
    labels = [parse_digit(p) for p in prompts]
    cnn = score_digits(images, labels)
    mlp = score_digits(images, labels, model=default_mlp(), reference=mlp_reference())
    if grid_dir is not None:
        order = sorted(range(min(len(images), 100)), key=lambda i: labels[i])
        save_grid(images[order], grid_dir / f"{slug(name)}.png", nrow=10)
    return Row(name, steps, guidance, cnn.fid, cnn.class_accuracy, cnn.diversity, sec_per_image, len(images),
               mlp.fid, mean_rewards(images, prompts, rewards or {}), mlp.class_accuracy, mlp.diversity)


def tilted_images(model: Teacher, spec: InferenceSpec, reward: RewardFn, beta: float, prompts: list[str],
                  seed: int) -> torch.Tensor:
    """One exact draw per prompt from the model (teacher or student export, at `spec`) tilted by the reward at
    temperature beta."""
    bound = reward_upper_bound(reward)

    def propose(slots: list[int], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ps = [prompts[i] for i in slots]
        images = spec_images(model, spec, ps, seeds)
        return images, reward_scores(reward, images, ps)

    return rejection_sample(propose, len(prompts), beta, bound, seed)


def tilted_rows(model: Teacher, spec: InferenceSpec, label: str, reward_name: str, betas: list[float], n: int,
                seed: int, grid_dir: Path | None, rewards: dict[str, RewardFn]) -> list[Row]:
    """The model (teacher or student export) at `spec`, tilted by `reward_name` at each beta (rejection sampling):
    the target a reward-tilted student (recipe=rtdmd) approaches, for the benchmark to set students against. Timed
    per accepted image, rejected draws included."""
    reward = rewards.get(reward_name) or build_reward(reward_name)
    prompts = class_balanced_prompts(n)
    rows = []
    for beta in betas:
        tic = time.perf_counter()
        images = tilted_images(model, spec, reward, beta, prompts, seed)
        seconds = time.perf_counter() - tic
        rows.append(scored_row(f"{label}, tilted by {reward_name} at beta={beta:g}", len(spec.times) - 1,
                               spec.guidance_scale, images, prompts, seconds / n, grid_dir, rewards))
    return rows


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def sampler_name(teacher: Teacher) -> str:
    """What the deterministic x0-transfer step is called on this teacher's schedule: DDIM on VP tables, Euler on
    rectified flow (the same step, `sampling.steps.ddim_step`)."""
    return "Euler" if teacher.schedule.kind == "flow" else "DDIM"


def teacher_spec(teacher: Teacher, steps: int, guidance: float) -> tuple[str, InferenceSpec]:
    """The teacher's row name and spec at `steps` deterministic steps and CFG `guidance`."""
    spec = InferenceSpec([float(t) for t in teacher.teacher_times(steps)], "ddim", guidance)
    return f"teacher {sampler_name(teacher)} {steps} steps, w={guidance:g}", spec


def student_name(label: str, spec: InferenceSpec) -> str:
    """A student row's name: its label, step count and CFG scale."""
    return f"{label} student {len(spec.times) - 1} steps, w={spec.guidance_scale:g}"


def teacher_rows(teacher: Teacher, steps: list[int], guidances: list[float], n: int, seed: int,
                 grid_dir: Path | None, rewards: dict[str, RewardFn] | None = None) -> list[Row]:
    specs = [teacher_spec(teacher, k, w) for k in steps for w in guidances]
    return [evaluate(name, teacher, spec, n, seed, grid_dir, rewards) for name, spec in specs]


def student_rows(label: str, export: Path, steps: list[int], n: int, seed: int, grid_dir: Path | None,
                 rewards: dict[str, RewardFn] | None = None) -> list[Row]:
    """The export at its own step count (empty `steps`) or at each given count."""
    student, spec, meta = load_export(export)
    steps = steps or [len(spec.times) - 1]
    rows = []
    for k in steps:
        at_k = spec if k == len(spec.times) - 1 else replace(spec, times=[float(t) for t in student.student_times(k)])
        rows.append(evaluate(student_name(label, at_k), student, at_k, n, seed, grid_dir, rewards))
    return rows


def merge_rows(kept: list[Row], new: list[Row]) -> list[Row]:
    """`kept` with each row of the same name replaced by the one in `new` (in place), then `new`'s other rows."""
    by_name = {r.name: r for r in new}
    merged = [by_name.pop(r.name, r) for r in kept]
    return merged + [r for r in new if r.name in by_name]


def provenance(command: str) -> str:
    """Which command wrote the rows, when, and on what: the first clause of a section's first line."""
    env = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads")
    return f"`{command}` ({time.strftime('%Y-%m-%d')}; {env})"


def markdown(rows: list[Row], written_by: str, n: int) -> str:
    """The section: one line on how it was made (`written_by`: `provenance`, or a chain of them), then the table."""
    base = next((r for r in rows if re.match(r"teacher \w+ 50 steps", r.name)), None)
    names = list(rows[0].rewards) if rows else []
    lines = [f"| sampler | NFE-steps | {METRIC_NAME} ↓ | {MLP_METRIC_NAME} ↓ | class acc ↑ (cnn / mlp) | "
             "diversity (cnn / mlp; 1 = real) | "
             + "".join(f"{k} ↑ | " for k in names) + "s / image | speedup vs 50 steps |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
    for r in rows:
        speed = f"{base.sec_per_image / r.sec_per_image:.1f}×" if base else "–"
        lines.append(f"| {r.name} | {r.steps} | {r.fid:.2f} | {r.fid_mlp:.2f} | "
                     f"{r.accuracy:.3f} / {_num(r.accuracy_mlp, 3)} | {r.diversity:.2f} / {_num(r.diversity_mlp, 2)} | "
                     + "".join(f"{r.rewards[k]:.3f} | " for k in names)
                     + f"{r.sec_per_image * 1000:.2f} ms | {speed} |")
    return "\n".join([f"Written by {written_by}. N = {n} images per row, "
                      f"class-balanced prompts, seeds 0..{n - 1}; {METRIC_NAME} and {MLP_METRIC_NAME} (independent "
                      "classifiers: CNN and MLP, trained on different splits) against all 1797 real digits; a row "
                      "beats another only where both FIDs agree; class accuracy and diversity under each of the two "
                      "(digits-class, RTDMD's toy reward, is the CNN: the MLP is the witness it never saw)."
                      + (f" Reward columns: each reward's mean over the row's images ({', '.join(names)})."
                         if names else ""), "",
                      *lines, ""])


def read_section(path: Path, section: str) -> tuple[str, list[Row]]:
    """An existing section's `written_by` chain (from results.md) and rows (from results.json), for `--update`.
    Raises ValueError (one line, with the fix) where there is none to update."""
    begin = f"<!-- BEGIN {section} -->"
    text = path.read_text() if path.is_file() else ""
    rows = _load_json(path.with_suffix(".json")).get(section)
    found = re.search(re.escape(begin) + r"\s*Written by (.*?)\. N = ", text, flags=re.S)
    if found is None or rows is None:
        raise ValueError(f"--update: {path} has no section '{section}' with rows in {path.with_suffix('.json')}; "
                         "write it once without --update")
    return found.group(1), [Row(**r) for r in rows]


RESULTS_HEADER = ("# fewstep results\n\nEvery table here is written by a script; re-run the command above it to "
                  "reproduce it.\n")


def write_section(path: Path, section: str, body: str) -> None:
    """Replace (or append) the block between <!-- BEGIN section --> and <!-- END section --> in results.md."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {section}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="toy-digits", help="the embedded teacher the students were distilled from "
                   "(toy-digits or toy-digits-sd3)")
    p.add_argument("--student", action="append", default=[], help="label=export_dir (repeatable)")
    p.add_argument("--student-steps", default="", help="comma-separated step counts for students (default: each "
                   "export's own)")
    p.add_argument("--teacher-steps", default="50,4", help="comma-separated step counts for the teacher (DDIM on "
                   "VP, Euler on flow)")
    p.add_argument("--teacher-guidance", default="2,1", help="comma-separated CFG scales for the teacher")
    p.add_argument("-n", "--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--section", default="toy-lcm", help="section of docs/results.md to (re)write")
    p.add_argument("--results", default="docs/results.md")
    p.add_argument("--grids", default="docs/img", help="folder for one 10x10 grid per row ('' = none)")
    p.add_argument("--rewards", default="", help="comma-separated reward names (fewstep's registry, e.g. "
                   "digits-class,micro-clip): a column of each one's mean per row")
    p.add_argument("--tilt-beta", default="", help="comma-separated temperatures: rows of the teacher (first "
                   "--teacher-steps count, CFG --tilt-guidance) tilted by --tilt-reward, p(x) exp(r(x) / beta), drawn "
                   "exactly by rejection sampling: the target RTDMD distils towards")
    p.add_argument("--tilt-reward", default="digits-class", help="the reward of the tilted rows (one with a known "
                   "maximum)")
    p.add_argument("--tilt-student", action="append", default=[], help="label=export_dir (repeatable): rows of "
                   "that export tilted at each --tilt-beta, e.g. an RTDMD stage-1 export, whose tilt is the optimum of "
                   "stage 2 with a KL to it")
    p.add_argument("--tilt-guidance", type=float, default=1.0, help="teacher CFG scale of the tilted rows")
    p.add_argument("--update", action="store_true", help="re-score only this command's rows; keep the section's "
                   "other rows (replaced where the names match) and name this command as the one that scored them")
    p.add_argument("--drop", action="append", default=[], help="with --update: a row of the section to remove, by "
                   "its full name (repeatable)")
    args = p.parse_args(argv)
    results = Path(args.results)
    command = "python scripts/toy_benchmark.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    written_by = provenance(command.strip())
    try:
        earlier, kept = rows_to_keep(args)
        check_tilt(args)
        args.student = [parse_student(spec, "--student") for spec in args.student]
        args.tilt_student = [parse_student(spec, "--tilt-student") for spec in args.tilt_student]
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    with torch.no_grad():   # scoped: a caller in the same process keeps its autograd state
        new = all_rows(args)
    rows = merge_rows(kept, new)
    if earlier is not None:
        changes = [f"rows {', '.join(names)} {verb}" for names, verb in
                   (([r.name for r in new], "re-scored"), (args.drop, "dropped")) if names]
        written_by = f"{earlier}; {' and '.join(changes)} by {written_by}" if changes else earlier
    body = markdown(rows, written_by, args.num_images)
    print(body)
    write_section(results, args.section, body)
    results.with_suffix(".json").write_text(json.dumps(
        {**_load_json(results.with_suffix(".json")), args.section: [r.__dict__ for r in rows]}, indent=2))
    return rows


def rows_to_keep(args: argparse.Namespace) -> tuple[str | None, list[Row]]:
    """With --update: the section's `written_by` chain and its rows less --drop's; without: (None, []). Raises
    ValueError (one line, with the fix) for a section that cannot be updated this way."""
    if not args.update:
        if args.drop:
            raise ValueError("--drop removes rows of an existing section: add --update")
        return None, []
    earlier, kept = read_section(Path(args.results), args.section)
    reward_names = sorted(filter(None, args.rewards.split(",")))
    if any(r.n != args.num_images or sorted(r.rewards) != reward_names for r in kept):
        raise ValueError(f"--update: section '{args.section}' was scored with other -n or --rewards; use the "
                         "section's own (see its first line) or rewrite it without --update")
    missing = sorted(set(args.drop) - {r.name for r in kept})
    if missing:
        raise ValueError(f"--drop: section '{args.section}' has no row {missing[0]!r}; give a row's full name as in "
                         "the table's first column")
    return earlier, [r for r in kept if r.name not in args.drop]


def check_tilt(args: argparse.Namespace) -> None:
    """--tilt-beta's temperatures are positive and --tilt-reward has a known maximum, checked before anything is
    generated. Raises ValueError (one line, with the fix)."""
    betas = _floats(args.tilt_beta)
    if any(b <= 0 for b in betas):
        raise ValueError(f"--tilt-beta takes temperatures > 0, got {args.tilt_beta}")
    if args.tilt_student and not betas:
        raise ValueError("--tilt-student tilts at each --tilt-beta: give --tilt-beta too")
    if betas:
        reward_upper_bound(build_reward(args.tilt_reward))


def parse_student(spec: str, flag: str = "--student") -> tuple[str, Path]:
    """A LABEL=EXPORT_DIR flag value split at the first '=' after which an export folder (with fewstep.json) follows,
    so labels may hold '=' ("K = 8") and so may paths. Raises ValueError (one line, with the fix) when none does."""
    for i, ch in enumerate(spec):
        if ch == "=" and (Path(spec[i + 1:]) / SIDECAR).is_file():
            return spec[:i], Path(spec[i + 1:])
    raise ValueError(f"{flag} {spec!r}: no export folder (with {SIDECAR}) after any '='; give LABEL=EXPORT_DIR "
                     "with the folder a fewstep export writes (<run>/export)")


def all_rows(args: argparse.Namespace) -> list[Row]:
    """The teacher's rows, its tilted rows and each --tilt-student export's, then each student's, for the parsed
    command line."""
    grid_dir = Path(args.grids) if args.grids else None
    rewards = {name: build_reward(name) for name in args.rewards.split(",") if name}
    teacher = load_teacher(args.teacher)
    rows = teacher_rows(teacher, _ints(args.teacher_steps), _floats(args.teacher_guidance), args.num_images,
                        args.seed, grid_dir, rewards)
    if args.tilt_beta:
        steps = (_ints(args.teacher_steps) or [50])[0]
        name, spec = teacher_spec(teacher, steps, args.tilt_guidance)
        rows += tilted_rows(teacher, spec, name, args.tilt_reward, _floats(args.tilt_beta), args.num_images, args.seed,
                            grid_dir, rewards)
    for label, path in args.tilt_student:
        student, spec, _ = load_export(path)
        rows += tilted_rows(student, spec, student_name(label, spec), args.tilt_reward, _floats(args.tilt_beta),
                            args.num_images, args.seed, grid_dir, rewards)
    for label, path in args.student:
        rows += student_rows(label, path, _ints(args.student_steps), args.num_images, args.seed, grid_dir,
                             rewards)
    return rows


def _num(x: float, digits: int) -> str:
    """x to `digits` decimals, or "–" for a row scored before the column existed (NaN)."""
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]
