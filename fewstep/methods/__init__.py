"""Each algorithm's `method:` settings as plain dataclasses, with the string choices they accept, the rules that
tie them to the rest of the run, and the dotted path of the recipe's builder.

One module per recipe in this package defines `CARD` (a `MethodCard`); it is found here by scanning the package,
so a new recipe registers itself by adding its card module, and no list elsewhere names it. Nothing here imports
torch or diffusers, so `fewstep.config` validates a whole run configuration (keys, types, choices, ranges)
before anything heavy loads; `fewstep.recipes.build_recipe` imports the builder only when a run starts."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from fewstep.methods.card import MethodCard


def _cards() -> dict[str, MethodCard]:
    cards: dict[str, MethodCard] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        card = getattr(importlib.import_module(f"{__name__}.{info.name}"), "CARD", None)
        if isinstance(card, MethodCard):
            if card.name in cards:
                raise RuntimeError(f"two recipe cards are named {card.name!r}")
            cards[card.name] = card
    return cards


CARDS: dict[str, MethodCard] = _cards()
METHODS: dict[str, type] = {name: card.config for name, card in CARDS.items()}
# String settings each algorithm accepts, checked when the config loads (before any model does).
METHOD_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {name: card.choices for name, card in CARDS.items()}
# Cross-setting rules per algorithm, run by fewstep.config after the generic checks (method, whole run config).
METHOD_RULES: dict[str, Callable[[Any, Any], None]] = {name: card.rules for name, card in CARDS.items()}


def builder(name: str) -> Callable[..., Any]:
    """The recipe builder a card names, imported on first use."""
    module, _, function = CARDS[name].builder.partition(":")
    return getattr(importlib.import_module(module), function)
