"""The CPS step (coefficients-preserving sampling, RTDMD; algorithms.md §6.2, §6.7 test 1) in its flow and VP
forms, its log-probability, the sampler-spec strings that carry eta through exports, and the stock-pipeline recipe
that reproduces a CPS export on the flow toy teacher."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fewstep.diffusion.forward import diffuse  # noqa: E402
from fewstep.diffusion.schedule import DiscreteVP, RectifiedFlow  # noqa: E402
from fewstep.sampling.steps import (cps_kl, cps_log_prob, cps_mean_std, cps_step, ddim_step, make_step, parse_step,  # noqa: E402
                                    step_spec)

SCHEDULES = {"flow": RectifiedFlow(), "vp": DiscreteVP(torch.cumprod(1 - torch.linspace(8.5e-4, 1.2e-2, 1000), 0))}
TOL = 1e-6   # the schedules hand out float32 coefficients


def fixed(noise: torch.Tensor):
    return lambda shape, generator, device, dtype: noise


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(64, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    return x0, eps, z, torch.full((64,), 0.7, dtype=torch.float64), torch.full((64,), 0.4, dtype=torch.float64)


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_eta_limits_and_the_last_step(kind, case):
    sched, (x0, eps, z, t, t_next) = SCHEDULES[kind], case
    x_t = diffuse(x0, t, sched, eps)
    ddim = ddim_step(x_t, x0, t, t_next, sched)
    assert torch.allclose(cps_step(x_t, x0, t, t_next, sched, noise_fn=fixed(z), eta=0.0), ddim, atol=TOL)
    renoise = diffuse(x0, t_next, sched, z)                    # eta = 1: x0 plus fresh noise at t'
    assert torch.allclose(cps_step(x_t, x0, t, t_next, sched, noise_fn=fixed(z), eta=1.0), renoise, atol=TOL)
    zero = torch.zeros_like(t)
    assert cps_step(x_t, x0, t, zero, sched, noise_fn=fixed(z), eta=0.9) is x0
    mean, rho = cps_mean_std(x_t, x0, t, zero, sched, 0.9)
    assert torch.allclose(mean, x0) and float(rho.abs().max()) == 0.0
    assert torch.equal(cps_log_prob(x0, mean), torch.zeros(64, dtype=torch.float64))   # PPO ratio 1 on the last step


def test_flow_form_is_the_official_velocity_formula(case):
    """x' = (1 - s') x0_hat + s' cos(theta) eps_hat + s' sin(theta) z with x0_hat = x - s v, eps_hat = x + (1 - s) v."""
    x0, eps, z, t, t_next = case
    x_t = diffuse(x0, t, RectifiedFlow(), eps)
    v = eps - x0
    s, s1, theta = 0.7, 0.4, 0.9 * math.pi / 2
    want = (1 - s1) * (x_t - s * v) + s1 * math.cos(theta) * (x_t + (1 - s) * v) + s1 * math.sin(theta) * z
    got = cps_step(x_t, x_t - s * v, t, t_next, RectifiedFlow(), noise_fn=fixed(z), eta=0.9)
    assert torch.allclose(got, want, atol=TOL)


@pytest.mark.parametrize("kind", list(SCHEDULES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 0.9, 1.0])
def test_marginal_is_preserved_on_point_mass_data(kind, eta):
    """With the exact x0 (data = one point c), x' has the forward marginal at t': mean alpha' c, std sigma'."""
    sched = SCHEDULES[kind]
    g = torch.Generator().manual_seed(1)
    n, c = 200_000, 0.8
    t, t_next = torch.full((n,), 0.9, dtype=torch.float64), torch.full((n,), 0.3, dtype=torch.float64)
    x0 = torch.full((n, 1), c, dtype=torch.float64)
    x_t = diffuse(x0, t, sched, torch.randn(n, 1, generator=g, dtype=torch.float64))
    out = cps_step(x_t, x0, t, t_next, sched, generator=g, eta=eta,
                   noise_fn=lambda shape, gen, device, dtype: torch.randn(tuple(shape), generator=gen, dtype=dtype))
    a1, s1 = (float(v[0]) for v in sched.alpha_sigma(t_next[:1]))
    assert abs(float(out.mean()) - a1 * c) < 5e-3 and abs(float(out.std()) - s1) < 5e-3


def test_log_prob_is_minus_mean_square_to_the_mean(case):
    x0, eps, z, t, t_next = case
    sched = RectifiedFlow()
    x_t = diffuse(x0, t, sched, eps)
    mean, rho = cps_mean_std(x_t, x0, t, t_next, sched, 0.9)
    x_next = cps_step(x_t, x0, t, t_next, sched, noise_fn=fixed(z), eta=0.9)
    lp = cps_log_prob(x_next, mean)
    assert lp.shape == (64,)
    assert torch.allclose(lp, -(rho * z).pow(2).flatten(1).mean(1), atol=TOL)
    assert float(rho[0, 0, 0, 0]) == pytest.approx(0.4 * math.sin(0.45 * math.pi))


def test_kl_is_the_exact_gaussian_kl_on_the_log_probability_scale(case):
    """cps_kl x C H W / (2 rho^2) is the KL between the two transitions' Gaussians (torch.distributions), and a
    KL-weighted penalty moves the same way as the log-probability: both drop the factor 2 rho^2 / (C H W)."""
    x0, eps, z, t, t_next = case
    sched = RectifiedFlow()
    x_t = diffuse(x0, t, sched, eps)
    mean, rho = cps_mean_std(x_t, x0, t, t_next, sched, 0.9)
    ref, _ = cps_mean_std(x_t, x0 + 0.1 * z, t, t_next, sched, 0.9)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, rho), torch.distributions.Normal(ref, rho))
    d = mean[0].numel()
    kl = cps_kl(mean, ref)
    assert kl.shape == (64,) and float(kl.min()) > 0
    torch.testing.assert_close(kl * d / (2 * rho.flatten(1)[:, 0] ** 2), exact.flatten(1).sum(1))
    assert float(cps_kl(mean, mean).abs().max()) == 0.0


def test_sampler_specs_round_trip_and_refuse_bad_options():
    assert parse_step("cps:eta=0.9") == ("cps", {"eta": 0.9}) and parse_step("ddim") == ("ddim", {})
    assert step_spec("cps", eta=0.9) == "cps:eta=0.9" and parse_step(step_spec("tcd", gamma=0.3)) == ("tcd", {"gamma": 0.3})
    assert make_step("cps:eta=0.0").keywords == {"eta": 0.0} and make_step("cps") is cps_step
    for bad, why in [("nope", "unknown sampler step"), ("ddim:eta=1", "takes no options"),
                     ("cps:gamma=1", "takes ['eta']"), ("cps:eta", "written as cps:key=value"),
                     ("cps:eta=high", "must be a number")]:
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_step(bad)


class StockCPS:
    """The README's stock-pipeline recipe for a CPS export: the recorded scheduler takes a deterministic step, and
    `callback_on_step_end` replaces its result by the CPS step built from the same model output, drawing the noise
    from the image's own generator (after its initial latents). Flow (FlowMatchEulerDiscreteScheduler): the Euler
    step was x + (s' - s) v. VP (EulerDiscreteScheduler, latents x / alpha, sigma = sigma_t / alpha_t): it was
    x + (s' - s) eps, and CPS there is x0 + s' (cos(theta) eps + sin(theta) z)."""

    def __init__(self, latents: torch.Tensor, generator: torch.Generator, eta: float, flow: bool):
        self.x, self.g, self.theta, self.flow = latents, generator, eta * math.pi / 2, flow

    def __call__(self, pipe, i, t, kwargs):
        s, s1 = (float(v) for v in pipe.scheduler.sigmas[i:i + 2])
        if i == 0:
            self.x = self.x * getattr(pipe.scheduler, "init_noise_sigma", 1.0)   # the first step's input
        d = (kwargs["latents"] - self.x) / (s1 - s)             # v (flow) or eps (VP)
        x0, eps = (self.x - s * d, self.x + (1 - s) * d) if self.flow else (self.x - s * d, d)
        if s1 > 0:
            noise = math.cos(self.theta) * eps + math.sin(self.theta) * torch.randn(self.x.shape, generator=self.g)
            x0 = (1 - s1) * x0 + s1 * noise if self.flow else x0 + s1 * noise
        self.x = x0
        return {"latents": x0}


@pytest.mark.parametrize("teacher_name", ["toy-digits-sd3", "toy-digits"])
def test_cps_export_is_sampled_by_fewstep_and_by_the_stock_recipe(teacher_name: str, tmp_path: Path):
    import diffusers

    from fewstep.export import export_student, load_export
    from fewstep.models.teacher import load_pipeline, load_teacher
    from fewstep.recipes.base import InferenceSpec
    from fewstep.sampling.engine import initial_noise, seed_generators
    from fewstep.sampling.generate import generate_latents

    teacher = load_teacher(teacher_name)
    flow = teacher.schedule.kind == "flow"
    times = [float(t) for t in teacher.student_times(4)]
    export = export_student(teacher, teacher.net, InferenceSpec(times, "cps:eta=0.9"), tmp_path / "export", "test",
                            teacher_name)
    meta = json.loads((export / "fewstep.json").read_text())
    assert meta["step"] == "cps:eta=0.9" and meta["step_options"] == {"eta": 0.9}
    assert meta["scheduler"]["class"] == ("FlowMatchEulerDiscreteScheduler" if flow else "EulerDiscreteScheduler")
    assert meta["scheduler"]["config"].get("stochastic_sampling", False) is False
    bundle, spec, _ = load_export(export)
    prompts, seeds = ["a handwritten digit 3", "a handwritten digit 7"], [5, 6]
    grid = torch.tensor(spec.times, dtype=torch.float64)
    ours = generate_latents(bundle, bundle.denoiser(), bundle.net, prompts, seeds, grid, spec.step, 1.0)
    euler = generate_latents(bundle, bundle.denoiser(), bundle.net, prompts, seeds, grid, "euler", 1.0)
    assert (ours - euler).abs().max() > 1e-2                   # the noise matters: the check can fail

    pipe = load_pipeline(str(export))                          # fills SD3's empty T5 slots, as the README says
    pipe.scheduler = getattr(diffusers, meta["scheduler"]["class"]).from_config(meta["scheduler"]["config"])
    stock = []
    for prompt, gen in zip(prompts, seed_generators(seeds)):
        latents = initial_noise((1, *bundle.latent_shape()), [gen])
        cps = StockCPS(latents, gen, meta["step_options"]["eta"], flow)
        stock.append(pipe(prompt, latents=latents, output_type="latent", callback_on_step_end=cps,
                          **meta["pipeline_kwargs"]).images)
    torch.testing.assert_close(ours, torch.cat(stock), atol=1e-4, rtol=1e-4)
