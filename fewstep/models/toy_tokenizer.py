"""A hand-written 56-entry CLIP BPE tokenizer for the `toy-digits` teacher's prompts.

Vocabulary: `<|startoftext|>`=0, `<|endoftext|>`=1, every character of "a handwritten digit 0..9" plain and
with `</w>`, and the 14 intermediate merges that build `handwritten</w>` and `digit</w>`. Each digit prompt
therefore tokenizes to its own id sequence and "" to `[0, 1, 1, ...]`.

transformers 5 trap: `CLIPTokenizer(vocab_file=..., merges_file=...)` is silently ignored (a 2-token
tokenizer), and merges given as "a b" strings raise; pass `vocab=dict, merges=list[tuple]` or load saved
files with `CLIPTokenizer.from_pretrained(dir, model_max_length=...)`.
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_LENGTH = 16  # must not exceed the text encoder's max_position_embeddings: the pipeline pads to it
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORDS = ("handwritten", "digit")
_CHARS = sorted(set("a" + "".join(_WORDS) + "0123456789"))


def toy_merges() -> list[tuple[str, str]]:
    """Left-to-right merges for each word: ("h","a"), ("ha","n"), ..., ("handwritte","n</w>"), ("d","i"), ..."""
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            left = left + right
    return merges


def toy_vocab() -> dict[str, int]:
    """The 56-entry vocabulary: specials, characters (plain and `</w>`), then every merge result in order."""
    tokens = [BOS, EOS] + _CHARS + [c + "</w>" for c in _CHARS] + [a + b for a, b in toy_merges()]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write `vocab.json` and `merges.txt` (with the usual `#version` header) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(toy_vocab(), indent=1), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in toy_merges()]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_tokenizer(out_dir: str | Path | None = None, max_length: int = MAX_LENGTH):  # -> CLIPTokenizer
    """The toy CLIPTokenizer (model_max_length 16 unless `max_length`). With `out_dir`, the files are written there
    and loaded back with `from_pretrained` (the path a saved pipeline takes); without, it is built in memory."""
    from transformers import CLIPTokenizer

    if out_dir is not None:
        write_tokenizer_files(out_dir)
        tok = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=max_length)
    else:
        tok = CLIPTokenizer(vocab=toy_vocab(), merges=toy_merges(), model_max_length=max_length)
    if len(tok) != len(toy_vocab()):
        raise RuntimeError(f"toy tokenizer has {len(tok)} entries, expected {len(toy_vocab())} "
                           "(transformers ignored the vocabulary?)")
    return tok
