"""The `fewstep` command: distill, launch, sample, pairs, export, bench, eval.

Every command checks its arguments, paths and output folder before loading anything, and reports bad input as
one `error:` line with exit code 2 (`fewstep.errors.guarded`)."""
from __future__ import annotations

import sys
from typing import Any

from fewstep import paths
from fewstep.cli_args import OneLineParser, guidance_scale, non_negative_int, pick_device, positive_int
from fewstep.errors import guarded


def add_overwrite(parser: OneLineParser) -> None:
    """The one flag that lets a command replace a used --out (paths.claim_output / staged_output)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (only once the new output is complete)")


def _parser() -> OneLineParser:
    p = OneLineParser(prog="fewstep", description="Few-step distillation of Diffusers teachers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser("launch", help="accelerate launch with fewstep's checks: fewstep launch --multi_gpu "
                   "--num_processes 8 scripts/distill.py recipe=dmd2 model=sdxl (takes accelerate launch's options)",
                   add_help=False)
    d = sub.add_parser("distill", help="train a student: fewstep distill recipe=lcm model=toy-digits train.steps=200")
    d.add_argument("overrides", nargs="*", help="key=value overrides (recipe=, model=, dotted keys)")
    s = sub.add_parser("sample", help="generate images from a preset, a pipeline folder or an export folder")
    s.add_argument("model", help="preset name (toy-digits), Diffusers pipeline folder, or fewstep export folder")
    s.add_argument("--out", required=True, help="output folder for 00000.png ... and metadata.jsonl")
    add_overwrite(s)
    s.add_argument("--num-images", type=positive_int, default=16)
    s.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: export's, or 50 for a teacher)")
    s.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale, 1 = off (default: export's, or 1.0)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="image i uses seed + i")
    s.add_argument("--prompts", default=None, help="text file, one prompt per line (cycled)")
    s.add_argument("--batch-size", type=positive_int, default=32)
    s.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "efficient", "math", "xformers"])
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    s.add_argument("--compile", action="store_true", help="torch.compile the denoising network")
    q = sub.add_parser("pairs", help="cache teacher noise->image pairs for recipe=dmd's regression loss")
    q.add_argument("model", help="preset name or Diffusers pipeline folder (the teacher)")
    q.add_argument("--out", required=True)
    add_overwrite(q)
    q.add_argument("--num", type=positive_int, default=2000)
    q.add_argument("--steps", type=positive_int, default=50, help="teacher DDIM/Euler steps")
    q.add_argument("--guidance", type=guidance_scale, default=2.0, help="teacher CFG scale (use the distillation's)")
    q.add_argument("--seed", type=non_negative_int, default=1_000_000, help="pair i uses seed + i (kept apart from sampling seeds)")
    q.add_argument("--prompts", default=None)
    q.add_argument("--batch-size", type=positive_int, default=64)
    q.add_argument("--device", default=None)
    e = sub.add_parser("export", help="rebuild the export of a checkpoint or a run folder")
    e.add_argument("checkpoint", help="runs/x (newest checkpoint) or runs/x/checkpoints/step-0000200")
    e.add_argument("--out", default=None, help="destination (default: <run>/exports/<checkpoint name>)")
    add_overwrite(e)
    b = sub.add_parser("bench", help="latency, throughput, memory and NFE of generation (engine, optionally vs stock)")
    b.add_argument("model", help="preset name (toy-digits), Diffusers pipeline folder, or fewstep export folder")
    add_overwrite(b)
    b.add_argument("--steps", default="1,4", help="comma-separated step counts, e.g. 1,4,50")
    b.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes, e.g. 1,8")
    b.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale, 1 = off (default: export's, or 1.0)")
    b.add_argument("--repeats", type=positive_int, default=5, help="timed runs per case")
    b.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads(N) for the run")
    b.add_argument("--warmup", type=positive_int, default=1,
                   help="untimed runs first (at least 2 with --compile, 3 with --cuda-graphs)")
    b.add_argument("--compare-stock", action="store_true", help="also time the stock Diffusers pipeline call")
    b.add_argument("--out", default=None, help="folder for bench.json and bench.md (refuses an existing bench.json)")
    b.add_argument("--prompts", default=None, help="text file, one prompt per line (default: fixed prompts)")
    b.add_argument("--seed", type=non_negative_int, default=0, help="image i of a batch uses seed + i")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="bf16 is CUDA only")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype, as the stock pipeline's torch_dtype (default float32, with --precision "
                   "auto giving bf16 autocast on CUDA)")
    b.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "efficient", "math", "xformers"])
    b.add_argument("--compile", action="store_true", help="torch.compile the denoising network (CUDA only)")
    b.add_argument("--cuda-graphs", action="store_true", help='torch.compile mode="reduce-overhead" (CUDA only)')
    b.add_argument("--stub-network", action="store_true", help="the denoising network returns its input without "
                   "computing: times the sampler loop, prompt encoding and VAE decode alone (engine overhead)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--results", default=None, help="also write the table into this markdown file (docs/results.md)")
    b.add_argument("--section", default=None, help="section of --results to (re)write (default: bench)")
    v = sub.add_parser("eval", help="quality metrics (FID, CLIP score, rewards, GenEval-style) vs NFE under protocols")
    v.add_argument("models", nargs="+", metavar="MODEL", help="preset name, Diffusers pipeline folder or export folder")
    v.add_argument("--protocol", nargs="+", required=True, help="protocol preset(s) in eval/protocols/ or YAML files")
    v.add_argument("--out", required=True, help="folder for report.json/.md, plot and grids (refuses an existing one)")
    v.add_argument("--steps", default=None, help="teachers' comma-separated step counts, e.g. 1,2,4,8,50 "
                   "(default: 50)")
    v.add_argument("--guidance", type=guidance_scale, default=None, help="teachers' CFG scale, 1 = off (default: 1.0)")
    v.add_argument("--student-steps", default=None, help="exports' comma-separated step counts (default: each "
                   "export's own)")
    v.add_argument("--student-guidance", type=guidance_scale, default=None, help="exports' CFG scale (default: each "
                   "export's own)")
    v.add_argument("--num-images", type=positive_int, default=None, help="images per row (default: the protocol's)")
    v.add_argument("--batch-size", type=positive_int, default=32)
    v.add_argument("--seed", type=non_negative_int, default=None, help="image i uses seed + i (default: the protocol's)")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol key, e.g. --set fid.reference_folder=/data/val2014 (repeatable)")
    v.add_argument("--device", default=None, help="cpu or cuda (default: the accelerate process's device)")
    v.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="bf16 is CUDA only")
    v.add_argument("--results", default=None, help="also write the table into this markdown file (docs/results.md)")
    v.add_argument("--section", default=None, help="section of --results to (re)write (default: eval-<protocols>)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: Any) -> None:
    """Paths, prompt files, output folders and devices of a parsed command, checked before any model loads."""
    models = getattr(args, "models", None) or ([args.model] if getattr(args, "model", None) else [])
    for model in models:
        if args.command == "pairs":
            paths.resolve_pretrained(model, role="teacher")
        else:
            paths.model_kind(model)
    if getattr(args, "prompts", None):
        paths.read_prompt_file(args.prompts)
    if args.command == "eval":
        from fewstep.eval.protocols import load_protocol

        for name in args.protocol:
            load_protocol(name, list(args.set or []))
    if getattr(args, "out", None) and args.command != "export":
        paths.claim_output(args.out, "--out", getattr(args, "overwrite", False))
    if getattr(args, "device", None):
        args.device = pick_device(args.device)


def run_command(args: Any, argv: list[str]) -> None:
    if args.command == "distill":   # the config is checked by distill's own preflight
        from fewstep.distill import run

        run(args.overrides)
        return
    check_args(args)
    if args.command == "sample":
        from fewstep.sample import run_sample

        run_sample(args)
    elif args.command == "pairs":
        from fewstep.pairs import run_pairs

        run_pairs(args)
    elif args.command == "export":
        from fewstep.distill import export_from_checkpoint

        print(f"export written to {export_from_checkpoint(args.checkpoint, args.out, args.overwrite)}")
    elif args.command == "bench":
        from fewstep.bench import run_bench_cli

        args.argv = argv
        run_bench_cli(args)
    elif args.command == "eval":
        from fewstep.eval.run import run_eval_cli

        run_eval_cli(args, argv)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:   # accelerate's own parser takes the rest
        from fewstep.launch import run_launch

        guarded(lambda: run_launch(argv[1:]))
        return
    args = _parser().parse_args(argv)
    guarded(lambda: run_command(args, argv))


if __name__ == "__main__":
    main()
