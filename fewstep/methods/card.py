"""What a recipe declares about itself without importing torch: its `method:` dataclass, the string choices
those settings accept, the rules that tie them to the rest of the run, and where its builder lives."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def no_rules(method: Any, run: Any) -> None:
    """A recipe without cross-setting rules."""


@dataclass(frozen=True)
class MethodCard:
    name: str                                    # the run config's `algorithm:`
    config: type                                 # the `method:` dataclass
    builder: str                                 # "module:function" returning the recipe from (run config, teacher)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)
    rules: Callable[[Any, Any], None] = no_rules
