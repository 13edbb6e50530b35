"""Train the offline digits classifier (fid[digits-cnn] feature extractor) and write its safetensors weights.

Usage (from the repository root): python scripts/train_digits_classifier.py [--seed 0] [--steps 1500] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fewstep.metrics.digits import (  # noqa: E402
    DEFAULT_WEIGHTS,
    classifier_accuracy,
    digits_arrays,
    save_digits_classifier,
    train_digits_classifier,
)


def main(argv: list[str] | None = None) -> int:
    """Train with a fixed seed, write the weights and print the held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, heldout = train_digits_classifier(seed=args.seed, steps=args.steps)
    x, y = digits_arrays()
    full = classifier_accuracy(model, x.unsqueeze(1), y)
    meta = {"seed": str(args.seed), "steps": str(args.steps), "heldout_accuracy": f"{heldout:.4f}"}
    path = save_digits_classifier(model, args.out, metadata=meta)
    print(f"held-out accuracy {heldout:.4f}, all-data accuracy {full:.4f}, "
          f"{time.perf_counter() - start:.1f} s -> {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
