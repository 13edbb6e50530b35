"""Train an offline digits classifier (fid[digits-cnn] or fid[digits-mlp] features) to a safetensors file.

Usage (from the repository root):
    python scripts/train_digits_classifier.py [--arch cnn] [--seed 0] [--steps 1500] [--out PATH]
    python scripts/train_digits_classifier.py --arch mlp   # seed 1 (other split), 5000 steps, digits-mlp.safetensors

The seed sets both the initialisation and the held-out split (split_digits(seed, 0.2)); the CNN uses seed 0 and
the MLP seed 1, so the two classifiers are trained and validated on different splits. The split is written into
the weights' metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fewstep.metrics.digits import (  # noqa: E402
    CNN_SEED,
    DEFAULT_WEIGHTS,
    MLP_SEED,
    MLP_WEIGHTS,
    classifier_accuracy,
    digits_arrays,
    save_digits_classifier,
    train_digits_classifier,
)

HELDOUT_FRACTION = 0.2
DEFAULTS = {"cnn": (CNN_SEED, 1500, DEFAULT_WEIGHTS), "mlp": (MLP_SEED, 5000, MLP_WEIGHTS)}  # seed, steps, file


def main(argv: list[str] | None = None) -> int:
    """Train with a fixed seed, write the weights and print the held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(DEFAULTS), default="cnn")
    parser.add_argument("--seed", type=int, default=None, help="default: 0 for cnn, 1 for mlp")
    parser.add_argument("--steps", type=int, default=None, help="default: 1500 for cnn, 5000 for mlp")
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped file of --arch")
    args = parser.parse_args(argv)
    seed = DEFAULTS[args.arch][0] if args.seed is None else args.seed
    steps = DEFAULTS[args.arch][1] if args.steps is None else args.steps
    out = DEFAULTS[args.arch][2] if args.out is None else args.out
    start = time.perf_counter()
    model, heldout = train_digits_classifier(seed=seed, steps=steps, heldout_fraction=HELDOUT_FRACTION,
                                             arch=args.arch)
    seconds = time.perf_counter() - start
    x, y = digits_arrays()
    full = classifier_accuracy(model, x.unsqueeze(1), y)
    meta = {"seed": str(seed), "steps": str(steps), "heldout_accuracy": f"{heldout:.4f}"}
    if args.arch != "cnn":  # the CNN's header stays as it was shipped
        meta["split"] = f"split_digits(seed={seed}, heldout_fraction={HELDOUT_FRACTION})"
    path = save_digits_classifier(model, out, metadata=meta)
    print(f"{args.arch}: held-out accuracy {heldout:.4f}, all-data accuracy {full:.4f}, "
          f"{seconds:.1f} s -> {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
