"""The two sides `fewstep bench` times: generation through fewstep's engine, and the stock Diffusers pipeline call
on the same model, prompts, seeds, steps, guidance and resolution."""
from __future__ import annotations

from contextlib import contextmanager
from functools import wraps
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from fewstep.bench.measure import Side, batch_tensor
from fewstep.models.families.base import recorded_call_defaults
from fewstep.models.teacher import Teacher
from fewstep.sample import GRAYSCALE_TEACHERS
from fewstep.sampling.engine import seed_generators
from fewstep.sampling.generate import generate_latents


DEFAULT_PROMPTS = [
    "a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table", "an astronaut riding a horse on the moon",
    "a cozy reading nook with a cat", "a futuristic city skyline at night",
    "a close-up of a hummingbird drinking nectar", "a mountain lake reflecting pine trees",
]


def bench_prompts(prompts: list[str] | str | None, n: int, teacher_name: str) -> list[str]:
    """n fixed prompts: the given ones (or a file's lines) cycled, digit prompts for the toy teacher, else a
    built-in list."""
    if isinstance(prompts, str):
        from fewstep.data.datasets import read_prompts

        prompts = read_prompts(prompts)
    if prompts is None and teacher_name in GRAYSCALE_TEACHERS:
        from fewstep.data.digits import class_balanced_prompts

        return class_balanced_prompts(n)
    pool = list(prompts) if prompts else DEFAULT_PROMPTS
    return [pool[i % len(pool)] for i in range(n)]


def grid_for(teacher: Teacher, meta: dict | None, steps: int) -> list[float]:
    """The engine's time grid at `steps` (as `fewstep sample` picks it): the export's own grid at its step count,
    the default student grid otherwise; a teacher's DDIM/Euler grid."""
    if meta is None:
        return [float(t) for t in teacher.teacher_times(steps)]
    if steps == len(meta["times"]) - 1:
        return [float(t) for t in meta["times"]]
    return [float(t) for t in teacher.student_times(steps)]


class StubOutput:
    """What a diffusers denoising network returns (`.sample`), for `stub_network`."""

    def __init__(self, sample: Tensor) -> None:
        self.sample = sample


@contextmanager
def patched_forward(net: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """`net.forward` replaced by `forward` inside the block; whatever instance-level forward was there before (an
    enclosing patch) comes back afterwards, so patches nest."""
    had, before = "forward" in vars(net), vars(net).get("forward")
    net.forward = forward
    try:
        yield
    finally:
        if had:
            net.forward = before
        else:
            del net.forward


@contextmanager
def stub_network(net: nn.Module, on: bool) -> Iterator[None]:
    """With `on`, the network's forward returns its own input (as `.sample`, or a 1-tuple with return_dict=False)
    without computing anything, so a run times everything around the network: the sampler loop, prompt encoding
    and VAE decode. The images are meaningless; the network calls are still counted."""
    if not on:
        yield
        return

    def forward(*args: Any, **kwargs: Any) -> Any:
        x = batch_tensor(args, kwargs)
        return (x,) if kwargs.get("return_dict", True) is False else StubOutput(x)

    with patched_forward(net, forward):
        yield


@contextmanager
def net_autocast(net: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast around the network's forward only (what the engine's Denoiser does), so the stock pipeline's text
    encoder and VAE stay in their own dtype exactly as the engine's do."""
    if dtype is None:
        yield
        return
    inner = net.forward

    @wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cuda", dtype=dtype):
            return inner(*args, **kwargs)

    with patched_forward(net, forward):
        yield


def compile_net(net: nn.Module, mode: str) -> None:
    """Compile the denoising network in place (the engine and the stock pipeline share it); "reduce-overhead"
    captures CUDA graphs."""
    net.compile(mode=mode)


def engine_side(teacher: Teacher, denoiser: nn.Module, times: list[float], step: str, guidance: float,
                prompts: list[str], seeds: list[int]) -> Side:
    """Prompt encoding + engine loop + the family's VAE decode, images left on the device."""
    grid = torch.tensor(times, dtype=torch.float64)

    def call() -> Tensor:
        lat = generate_latents(teacher, denoiser, teacher.net, prompts, seeds, grid, step, guidance)
        return teacher.decode(lat)

    return Side("engine", call)


def stock_kwargs(teacher: Teacher, meta: dict | None, times: list[float]) -> dict[str, Any]:
    """Extra pipeline arguments: none for a teacher (its own scheduler), the recorded timesteps/sigmas for an
    export; both with the arguments recorded with the teacher (`recorded_call_defaults`)."""
    base = {"num_inference_steps": len(times) - 1, **recorded_call_defaults(teacher.pipe)}
    if meta is None:
        return base
    size = teacher.size
    grid = torch.tensor(times, dtype=torch.float64)
    return {**base, **teacher.family.pipeline_call_kwargs(teacher.pipe, grid, size, size)}


def stock_scheduler(teacher: Teacher, meta: dict | None) -> Any:
    """The scheduler the stock call runs: the pipeline's own for a teacher, the recorded one for an export."""
    if meta is None:
        return teacher.pipe.scheduler
    import diffusers

    return getattr(diffusers, meta["scheduler"]["class"]).from_config(meta["scheduler"]["config"])


@contextmanager
def stock_components(pipe: Any, scheduler: Any) -> Iterator[None]:
    """Swap in the stock scheduler and switch off work the engine does not do (safety checker, watermark)."""
    saved = {name: getattr(pipe, name) for name in ("scheduler", "safety_checker", "watermark")
             if getattr(pipe, name, None) is not None}
    pipe.scheduler = scheduler
    for name in ("safety_checker", "watermark"):
        if name in saved:
            setattr(pipe, name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(pipe, name, value)


def stock_side(teacher: Teacher, meta: dict | None, scheduler: Any, times: list[float], guidance: float,
               prompts: list[str], seeds: list[int]) -> Side:
    """The stock pipeline call at equal steps, guidance, resolution and seeds, decoding to a tensor."""
    pipe, size = teacher.pipe, teacher.size
    kwargs = stock_kwargs(teacher, meta, times)
    pipe.set_progress_bar_config(disable=True)

    def call() -> Tensor:
        return pipe(prompt=prompts, guidance_scale=guidance, generator=seed_generators(seeds), height=size,
                    width=size, output_type="pt", **kwargs).images

    return Side("stock", call, lambda: stock_components(pipe, scheduler))


def stock_setup_note(meta: dict | None, teacher: Teacher, scheduler: Any) -> str:
    kind = "the export's recorded scheduler, explicit timesteps" if meta is not None else "the pipeline's own scheduler"
    return (f"{type(teacher.pipe).__name__}.__call__ with {type(scheduler).__name__} ({kind}), output_type='pt', "
            "progress bar / safety checker / watermark off")
