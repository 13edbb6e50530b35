"""Train the offline micro-CLIP on scikit-learn digits and write its safetensors weights and config JSON.

Usage (from the repository root, one thread):
    OMP_NUM_THREADS=1 python scripts/train_micro_clip.py [--seed 0] [--steps 1000] [--weights PATH] [--config PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fewstep.metrics.micro_clip import (  # noqa: E402
    DEFAULT_CONFIG,
    DEFAULT_WEIGHTS,
    evaluate_micro_clip,
    load_micro_clip,
    save_micro_clip,
    train_micro_clip,
)


def main(argv: list[str] | None = None) -> int:
    """Train with a fixed seed, write the files, reload them and print matched/shuffled scores and accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    result = train_micro_clip(seed=args.seed, steps=args.steps)
    weights, config = save_micro_clip(result, args.weights, args.config)
    scorer = load_micro_clip(weights, config)
    held = evaluate_micro_clip(scorer, result.heldout, seed=args.seed)
    full = evaluate_micro_clip(scorer, None, seed=args.seed)
    metrics = {
        "train_seconds": round(result.seconds, 1),
        "train_cpu_seconds": round(result.cpu_seconds, 1),
        "heldout_zero_shot_accuracy": round(held["zero_shot_accuracy"], 4),
        "all_zero_shot_accuracy": round(full["zero_shot_accuracy"], 4),
        "all_matched_100cos": round(full["matched"], 2),
        "all_shuffled_100cos": round(full["shuffled"], 2),
    }
    save_micro_clip(result, weights, config, metrics=metrics)  # same weights, config now records the metrics
    print(f"trained in {result.seconds:.1f} s ({result.cpu_seconds:.1f} s CPU) -> {weights} "
          f"({weights.stat().st_size} bytes), {config}")
    for name, m in (("held-out", held), ("all", full)):
        print(f"{name:8s} n={m['n']}: matched {m['matched']:.2f} vs shuffled {m['shuffled']:.2f} (100 cos), "
              f"zero-shot accuracy {m['zero_shot_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
