"""The recipe contract. A recipe owns its losses and nothing else; the trainer owns accelerate, optimizers,
accumulation, checkpoints and logging (architecture.md §0.3)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from fewstep.sampling.draws import Draws


@dataclass
class StepOutput:
    losses: dict[str, Tensor]                        # keyed by the trainable role that steps this iteration
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Batch:
    """What recipes see: model-space latents and conditions (already encoded by the trainer)."""

    x0: Tensor                     # clean latents [B, C, H, W]
    cond: dict[str, Tensor]        # positive condition, batched
    neg: dict[str, Tensor]         # unconditional / negative condition, batched
    prompts: list[str]


@dataclass
class InferenceSpec:
    """How the trained student samples, the one inference object every sampler goes through (sampling, eval,
    the trainer's preview, bench) and the export writes: times in [0, 1] ending at 0, a step name from
    fewstep.sampling.steps, the CFG scale (1 = off), and for students made of several experts (Phased DMD,
    algorithms.md §4.1) the experts in time order, each a LoRA adapter name or a network of its own, serving the
    times above its bound."""

    times: list[float]
    step: str
    guidance_scale: float = 1.0
    experts: list[tuple[Any, float]] = field(default_factory=list)  # (adapter name or network, used while t > bound)

    def wrap(self, denoiser: nn.Module) -> nn.Module:
        """The denoiser sampling calls: `denoiser` itself, or the switch that picks each time's expert."""
        if not self.experts:
            return denoiser
        from fewstep.models.adapters import ExpertSwitch

        return ExpertSwitch(denoiser, self.experts)

    def networks(self, net: nn.Module) -> list[nn.Module]:
        """Every network sampling runs: `net` (the pipeline's), then experts that are networks of their own."""
        return [net, *(key for key, _ in self.experts if isinstance(key, nn.Module) and key is not net)]


class Recipe(ABC):
    """Base of every recipe (one level of inheritance, no mixins)."""

    Config: ClassVar[type]
    name: ClassVar[str]

    @abstractmethod
    def trainable(self) -> dict[str, nn.Module]:
        """Role name -> the module holding every parameter that role trains (one optimizer per role; the trainer
        prepares each network inside it with the engine, so a role parameter outside it is an error)."""

    def parameters(self, role: str) -> dict[str, nn.Parameter]:
        """The parameters one role's optimizer owns (names are checkpoint keys). Default: the role module's
        trainable parameters. Recipes whose roles share a module (two LoRA adapters on one base) override it."""
        return {n: p for n, p in self.trainable()[role].named_parameters() if p.requires_grad}

    def optimizer_settings(self, role: str) -> dict[str, float]:
        """Per-role optimizer overrides (e.g. a critic learning rate for two time-scale updates)."""
        return {}

    @abstractmethod
    def train_step(self, batch: Batch, step: int, draws: Draws) -> StepOutput:
        """Losses for this iteration; randomness only from `draws` (per-sample draws from `draws.sample`, choices
        the whole global batch shares from `draws.choice`), so the result does not depend on the world size."""

    @abstractmethod
    def inference(self) -> InferenceSpec:
        """The student's sampler, recorded in the export's fewstep.json."""

    def after_optimizer_step(self, step: int) -> None:
        """Hook for target networks (EMA) that follow the student."""

    def followers(self) -> list[nn.Module]:
        """Networks that are not trained but follow trained ones (LCM's EMA target), which a sharding engine must
        shard like them; their tensors are in `extra_state`."""
        return []

    def extra_state(self) -> dict[str, Tensor]:
        """Tensors beyond trainables and optimizers that a checkpoint must hold (e.g. a target network)."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state but the checkpoint holds {sorted(state)[:3]}")

    def export_net(self) -> nn.Module:
        """The network whose weights the export writes (the student, or its EMA)."""
        return self.trainable()["student"]
