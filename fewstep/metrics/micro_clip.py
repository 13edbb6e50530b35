"""micro-CLIP: a tiny open_clip ``CLIP`` trained contrastively on scikit-learn's digits (evaluation.md section 7.4).

Honest offline fallback for the CLIP score of the ``toy-digits`` teacher and a fixture for tests: report its
values as ``clip_score[micro-clip-digits]``; they are not comparable with any real CLIP score.

* Model: ``open_clip.CLIP`` (vision ViT 16x16 input, patch 4, width 64, 2 layers; text transformer width 64,
  2 layers, context 16), about 0.2 M parameters, shipped as ``fewstep/assets/micro-clip-digits.safetensors``
  with ``micro-clip-digits.json`` (``open_clip_config.json`` layout plus a ``tokenizer`` section).
* Tokenizer: open_clip's bundled ``SimpleTokenizer`` (CLIP BPE), restricted to the BPE ids that occur in the
  training prompts (``CompactTokenizer``) so the token table stays small; other words map to one unknown id.
* Data: the 1797 digits as bright ink on dark, value / 16, nearest-upsampled to 16x16, grey copied to RGB
  (``fewstep.data.digits.load_digit_images`` shifted to [0, 1]); prompts "a handwritten digit {d}" and
  "a handwritten digit {word}" ("seven").
* Training (``train_micro_clip``): symmetric InfoNCE (Radford et al. 2021) over groups of ten images, one per
  class, so every group is a batch of unique pairs; seeded and run on one thread, so it is deterministic.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.errors import FewstepError
from fewstep.metrics.clip_score import ClipScorer, load_open_clip, preprocess_images
from fewstep.metrics.digits import single_thread

MODEL_NAME = "micro-clip-digits"
METRIC_NAME = "clip_score[micro-clip-digits]"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_WEIGHTS = ASSETS / f"{MODEL_NAME}.safetensors"
DEFAULT_CONFIG = ASSETS / f"{MODEL_NAME}.json"
IMAGE_SIZE = 16
CONTEXT_LENGTH = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {d}", "a handwritten digit {word}")
PAD_ID, UNK_ID = 0, 1


def digit_prompts(template: str = TEMPLATES[0]) -> list[str]:
    """The ten class prompts of ``template`` ("{d}" is the numeral, "{word}" the English word)."""
    return [template.format(d=d, word=DIGIT_WORDS[d]) for d in range(10)]


def training_prompts() -> list[str]:
    """All prompts the micro-CLIP sees in training: ``TEMPLATES`` x digits, template-major (index t * 10 + d)."""
    return [p for t in TEMPLATES for p in digit_prompts(t)]


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int):  # -> open_clip.SimpleTokenizer
    """open_clip's bundled CLIP BPE tokenizer (offline: the vocabulary ships in the wheel)."""
    import open_clip

    return open_clip.SimpleTokenizer(context_length=context_length)


class CompactTokenizer:
    """open_clip ``SimpleTokenizer`` with its ids remapped onto a small vocabulary.

    Compact ids: 0 = padding, 1 = unknown BPE token, then the kept BPE ids in ascending order, then
    start-of-text and end-of-text last, so end-of-text has the largest id and open_clip's default "argmax"
    text pooling still picks it.
    """

    def __init__(self, bpe_ids: Sequence[int], context_length: int = CONTEXT_LENGTH) -> None:
        base = _simple_tokenizer(context_length)
        specials = {base.sot_token_id, base.eot_token_id}
        self.bpe_ids = sorted({int(i) for i in bpe_ids} - specials - {0})
        self.context_length = context_length
        lookup = torch.full((base.vocab_size,), UNK_ID, dtype=torch.long)
        lookup[0] = PAD_ID
        ordered = self.bpe_ids + [base.sot_token_id, base.eot_token_id]
        lookup[torch.tensor(ordered)] = torch.arange(2, 2 + len(ordered))
        self._lookup, self._base = lookup, base

    @classmethod
    def for_texts(cls, texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> "CompactTokenizer":
        """Keep exactly the BPE ids that occur in ``texts``."""
        base = _simple_tokenizer(context_length)
        return cls(sorted({i for t in texts for i in base.encode(t)}), context_length)

    @property
    def vocab_size(self) -> int:
        """Number of compact ids (pad, unknown, kept BPE ids, start, end)."""
        return len(self.bpe_ids) + 4

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids (N, context_length), int64; truncation keeps end-of-text last, as open_clip does."""
        return self._lookup[self._base([texts] if isinstance(texts, str) else list(texts))]

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description (stored in the micro-CLIP config)."""
        return {"kind": "open_clip.SimpleTokenizer+compact", "context_length": self.context_length,
                "bpe_ids": self.bpe_ids}


def micro_clip_model_cfg(vocab_size: int) -> dict[str, Any]:
    """open_clip ``CLIP`` config of the micro-CLIP (vision: 16x16, patch 4; both towers width 64, 2 layers)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 64, "heads": 2,
                     "layers": 2},
    }


def digit_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """All 1797 real digits as float (N, 3, size, size) in [0, 1] (value / 16, nearest upsample) and labels."""
    from fewstep.data.digits import load_digit_images

    x, y = load_digit_images(size)
    return (x + 1.0) / 2.0, y


def _augment(x: Tensor, gen: torch.Generator, max_shift: int, noise: float) -> Tensor:
    """Shift (N, C, H, W) images by up to ``max_shift`` pixels (zero fill), add Gaussian noise, clamp to [0, 1]."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    shifted = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    return (shifted + noise * torch.randn(shifted.shape, generator=gen)).clamp(0.0, 1.0)


def _group_batch(pools: list[Tensor], groups: int, gen: torch.Generator) -> Tensor:
    """Indices (groups, 10): row g holds one random training image of each class 0..9."""
    cols = [pool[torch.randint(0, len(pool), (groups,), generator=gen)] for pool in pools]
    return torch.stack(cols, dim=1)


def grouped_clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (Radford et al. 2021) inside each group of unique pairs.

    ``img``, ``txt``: normalised embeddings (G, K, D), pair k of group g matches; returns the mean of the
    image->text and text->image cross-entropies over all G * K rows.
    """
    logits = logit_scale * img @ txt.transpose(1, 2)  # (G, K, K)
    target = torch.arange(img.shape[1]).expand(img.shape[0], -1).reshape(-1)
    k = img.shape[1]
    return 0.5 * (F.cross_entropy(logits.reshape(-1, k), target)
                  + F.cross_entropy(logits.transpose(1, 2).reshape(-1, k), target))


@dataclass(frozen=True)
class TrainResult:
    """A trained micro-CLIP: the open_clip model, its tokenizer, the held-out indices, wall and CPU seconds."""

    model: nn.Module
    tokenizer: CompactTokenizer
    heldout: Tensor
    seconds: float
    cpu_seconds: float
    settings: dict[str, Any]


def train_micro_clip(
    seed: int = 0,
    steps: int = 1000,
    groups: int = 8,
    lr: float = 2e-3,
    heldout_fraction: float = 0.2,
) -> TrainResult:
    """Train the micro-CLIP on the seeded, stratified training split of the digits (one CPU thread).

    Each step draws ``groups`` groups of ten images (one per class), augments them (+-2 px shifts, noise 0.05),
    pairs each image with its class prompt under a random template and minimises ``grouped_clip_loss``.
    AdamW with linear warm-up, cosine decay and gradient-norm clipping at 1 (larger learning rates collapsed
    the embeddings in trials); the logit scale is learnt and clamped at 100 as in CLIP.
    """
    import open_clip

    from fewstep.metrics.digits import split_digits

    start, cpu_start = time.perf_counter(), time.process_time()
    prompts = training_prompts()
    tokenizer = CompactTokenizer.for_texts(prompts)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = open_clip.CLIP(**micro_clip_model_cfg(tokenizer.vocab_size))
    torch.random.set_rng_state(torch_state)
    pp_cfg = _preprocess_cfg()
    gen = torch.Generator().manual_seed(seed)
    x, y = digit_images()
    kept, held = split_digits(seed, heldout_fraction)
    pools = [kept[y[kept] == c] for c in range(10)]
    tokens = tokenizer(prompts)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    with single_thread():
        model.train()
        for _ in range(steps):
            idx = _group_batch(pools, groups, gen)  # (G, 10)
            template = torch.randint(0, len(TEMPLATES), idx.shape, generator=gen)
            images = preprocess_images(_augment(x[idx.reshape(-1)], gen, 2, 0.05), pp_cfg)
            img = F.normalize(model.encode_image(images), dim=-1).view(groups, 10, -1)
            txt_all = F.normalize(model.encode_text(tokens), dim=-1)
            txt = txt_all[template * 10 + torch.arange(10)]  # (G, 10, D)
            loss = grouped_clip_loss(img, txt, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
    model.eval().requires_grad_(False)
    open_clip.set_model_preprocess_cfg(model, pp_cfg)
    settings = {"seed": seed, "steps": steps, "groups": groups, "lr": lr, "heldout_fraction": heldout_fraction}
    return TrainResult(model, tokenizer, held, time.perf_counter() - start, time.process_time() - cpu_start, settings)


def _preprocess_cfg() -> dict[str, Any]:
    """open_clip's default preprocess config (OpenAI mean/std, bicubic, shortest side) at 16x16."""
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg

    return {**asdict(PreprocessCfg()), "size": IMAGE_SIZE}


def save_micro_clip(
    result: TrainResult,
    weights: str | Path = DEFAULT_WEIGHTS,
    config: str | Path = DEFAULT_CONFIG,
    metrics: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the weights (safetensors) and the config JSON (model_cfg, preprocess_cfg, tokenizer, training)."""
    from safetensors.torch import save_file

    weights, config = Path(weights), Path(config)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    save_file(tensors, str(weights), metadata={"arch": "open_clip.CLIP", "name": MODEL_NAME})
    doc = {
        "model_cfg": micro_clip_model_cfg(result.tokenizer.vocab_size),
        "preprocess_cfg": _preprocess_cfg(),
        "tokenizer": result.tokenizer.config(),
        "training": {**result.settings, "templates": list(TEMPLATES), **(metrics or {})},
    }
    config.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return weights, config


def load_micro_clip(
    weights: str | Path | None = None,
    config: str | Path | None = None,
    scale: str = "100cos",
    prompt_prefix: str = "",
) -> ClipScorer:
    """The shipped micro-CLIP (or another ``save_micro_clip`` pair) as a ``ClipScorer`` (default scale 100 cos)."""
    weights = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    config = Path(config) if config is not None else DEFAULT_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise FewstepError(f"micro-CLIP file not found: {path}; run scripts/train_micro_clip.py to create it")
    tok_cfg = json.loads(config.read_text(encoding="utf-8")).get("tokenizer", {})
    tokenizer = CompactTokenizer(tok_cfg.get("bpe_ids", []), int(tok_cfg.get("context_length", CONTEXT_LENGTH)))
    model, ckpt = load_open_clip(config, weights)
    return ClipScorer(model, tokenizer, model_name=MODEL_NAME, pretrained=str(weights), checkpoint_path=ckpt,
                      scale=scale, prompt_prefix=prompt_prefix)


@torch.no_grad()
def evaluate_micro_clip(scorer: ClipScorer, indices: Tensor | None = None, seed: int = 0) -> dict[str, float]:
    """Matched vs shuffled-prompt mean score (scorer's scale) and prompt-based class accuracy on real digits.

    ``indices`` selects the digits (default: all 1797). Shuffled prompts are a seeded permutation of the
    matched ones (about 10% stay correct by chance). Accuracy: argmax over the ten "a handwritten digit {d}"
    prompts.
    """
    x, y = digit_images()
    if indices is not None:
        x, y = x[indices], y[indices]
    prompts = [digit_prompts()[int(c)] for c in y]
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    with single_thread():
        matched = scorer.mean_score(x, prompts)
        shuffled = scorer.mean_score(x, [prompts[int(i)] for i in perm])
        sims = scorer.encode_images(x) @ scorer.encode_prompts(digit_prompts()).T
    accuracy = float((sims.argmax(dim=1) == y).float().mean())
    return {"matched": matched, "shuffled": shuffled, "zero_shot_accuracy": accuracy, "n": len(y)}
