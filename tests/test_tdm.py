"""TDM (algorithms.md §5): the unit tests of §5.8 on the real recipe's functions and class, with analytic
denoisers and no pipeline."""
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from fewstep.diffusion.forward import transition_coeffs
from fewstep.diffusion.schedule import DiscreteVP, RectifiedFlow, bcast
from fewstep.methods.tdm import TDMConfig
from fewstep.recipes.base import Batch
from fewstep.recipes.tdm import (TDM, generator_loss, importance_weight, interval_start, mixed_noise,
                                 noise_index_bounds, randint_between, table_times, trajectory_indices)
from fewstep.sampling.draws import Draws


def pixart_vp() -> DiscreteVP:
    """PixArt-alpha's table: DDPM linear betas 1e-4 .. 0.02, 1000 entries (§5.2)."""
    return DiscreteVP(DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod)


@pytest.mark.parametrize("schedule", [pixart_vp(), RectifiedFlow()], ids=["vp", "flow"])
def test_mixed_noise_identity_and_exact_transition_variance(schedule):
    """§5.8 test 1: x_t = alpha_t x0hat + sigma_t m exactly, and the forward transition's variance closes:
    b^2 + a^2 sigma_mid^2 = sigma_t^2."""
    g = torch.Generator().manual_seed(0)
    to_t = table_times(schedule)
    x0, z, x_in = (torch.randn(6, 2, 4, 4, generator=g) for _ in range(3))
    t_g, t_mid, t = (to_t(torch.tensor([v] * 6)).float() for v in (674, 450, 600))
    d = mixed_noise(x_in, x0, t_g, t_mid, t, schedule, z)
    a_t, s_t = (bcast(v, x0) for v in schedule.alpha_sigma(t))
    assert torch.allclose(d.x_t, a_t * x0 + s_t * d.mixed, atol=2e-6)
    a, b = transition_coeffs(t_mid, t, schedule, x0)
    (_, s_mid), (_, s_tt) = (schedule.alpha_sigma(v.double()) for v in (t_mid, t))
    assert torch.allclose(b.reshape(-1) ** 2 + a.reshape(-1) ** 2 * s_mid.double() ** 2, s_tt.double() ** 2,
                          atol=1e-12)


@pytest.mark.parametrize("total", [800, 900, 1000])
def test_interval_bookkeeping(total):
    """§5.8 test 2: t_g, t_mid and the noise-level range of §5.3-5.4; in separate mode t < t_g always."""
    width = total // 4
    idx = trajectory_indices(total, 4)
    assert idx == [total - 1 - m * width for m in range(4)]
    assert sorted(idx) == [j * total // 4 - 1 for j in (1, 2, 3, 4)]            # the official t_g(j)
    t_g = torch.tensor(idx)
    t_mid = interval_start(t_g, total, 4)
    assert t_mid.tolist() == [v - width + 1 for v in idx] and t_mid.min() == 0
    g = torch.Generator().manual_seed(1)
    for interval in ("separate", "global"):
        cfg = TDMConfig(total_steps=total, interval=interval)
        lo, hi = noise_index_bounds(t_g, t_mid, cfg)
        assert lo.tolist() == [max(20, v) for v in t_mid.tolist()]
        upper = t_g - 10 if interval == "separate" else torch.full_like(t_g, total - 10)
        assert hi.tolist() == (upper - 1).tolist()
        draws = torch.stack([randint_between(lo, hi, g) for _ in range(4000)])
        assert (draws >= lo).all() and (draws <= hi).all()
        if interval == "separate":                      # <= 240 values each: 4000 draws reach both ends
            assert (draws.min(0).values == lo).all() and (draws.max(0).values == hi).all()
            assert (draws < t_g).all()
    mid = torch.stack([randint_between(t_mid, t_g - 21, g) for _ in range(4000)])    # random_mid: [t_mid, t_g-20)
    assert (mid >= t_mid).all() and (mid < t_g - 20).all()


class PointMass(nn.Module):
    """The oracle denoiser of point-mass data x*: x0hat = x* whatever the input."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target = target

    def forward(self, x_t, t, cond=None):
        return self.target.expand_as(x_t)


def tiny_tdm(student: nn.Module, fake: nn.Module, real: nn.Module, schedule, shape=(1, 2, 2), **cfg) -> TDM:
    config = TDMConfig(**{"total_steps": 900, "real_guidance": 1.0, **cfg})
    params = {"w": nn.Parameter(torch.zeros(1))}
    return TDM(student=student, student_net=student, student_params=params, real=real, critic=fake,
               critic_params=params, schedule=schedule, to_t=table_times(schedule), latent_shape=shape,
               config=config, steps=4, student_lr=1e-4)


def batch_of(n: int) -> Batch:
    return Batch(x0=torch.empty(0), cond={"c": torch.zeros(n, 1)}, neg={"c": torch.zeros(n, 1)}, prompts=[""] * n)


@pytest.mark.parametrize("schedule", [pixart_vp(), RectifiedFlow()], ids=["vp", "flow"])
def test_oracle_trajectory_stays_on_the_exact_path(schedule):
    """§5.8 test 3: with the oracle eps of point-mass data the student's DDIM trajectory is x^(m) = alpha x* +
    sigma z at every state after the first (the first is pure noise labelled t^(0))."""
    target = torch.tensor([[[0.5, -1.0], [2.0, 0.25]]])
    oracle = PointMass(target)
    recipe = tiny_tdm(oracle, oracle, oracle, schedule)
    g = torch.Generator().manual_seed(3)
    states, x0s = recipe.trajectory(batch_of(5), g)
    z = torch.randn((5, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(states[0], z)
    for m in range(1, 4):
        a, s = (bcast(v, z) for v in schedule.alpha_sigma(recipe.times[m].float().expand(5)))
        eps = (z - bcast(schedule.alpha_sigma(recipe.times[0].float().expand(5))[0], z) * target) / \
            bcast(schedule.alpha_sigma(recipe.times[0].float().expand(5))[1], z)
        assert torch.allclose(states[m], a * target + s * eps, atol=1e-5)
    assert torch.equal(x0s, target.expand_as(x0s))
    assert recipe.inference().step == "ddim" and recipe.inference().times[-1] == 0


def test_generator_target_identity_and_gradient():
    """§5.8 test 4: y - x0hat = x0_cfg - x0_F, and autograd gives 2 (x0_F - x0_cfg) / (nrm numel) with MSE;
    with pseudo-Huber and |d| >> c the gradient is sign(x0_F - x0_cfg) / (nrm numel) (sign-DMD)."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    x0_cfg, x0_fake = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    nrm = (x0.detach() - x0_cfg).abs().mean((1, 2, 3), keepdim=True)
    loss = generator_loss(x0, x0_cfg, x0_fake, "l2", 1e-3, None)
    (grad,) = torch.autograd.grad(loss, x0)
    assert torch.allclose(grad, 2 * (x0_fake - x0_cfg) / (nrm * x0.numel()), rtol=1e-5)
    # the value is mean((x0_cfg - x0_F)^2 / nrm): the target sits at x0hat + (x0_cfg - x0_F)
    assert torch.allclose(loss.double(), ((x0_cfg - x0_fake) ** 2 / nrm).mean(), rtol=1e-5)
    huber = generator_loss(x0, x0_cfg, x0_fake, "huber", 1e-3, None)
    (grad_h,) = torch.autograd.grad(huber, x0)
    big = (x0_fake - x0_cfg).abs() > 0.1
    sign = torch.sign(x0_fake - x0_cfg) / (nrm * x0.numel())
    assert torch.allclose(grad_h[big], sign.expand_as(grad_h)[big], rtol=1e-3)


def test_importance_weight_is_one_for_equal_noise_and_tempered_otherwise():
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(importance_weight(z, z), torch.ones(4, dtype=torch.float64))
    w = importance_weight(2 * z, z)                       # larger effective noise -> down-weighted
    assert (w < 1).all()
    expected = torch.exp(-0.5 * (4 * z.double() ** 2).mean((1, 2, 3)) + 0.5 * (z.double() ** 2).mean((1, 2, 3)))
    assert torch.allclose(w, expected)


def test_losses_route_gradients_to_their_own_role():
    """One train_step: the fake-score loss reaches only the fake, the generator loss only the student."""
    schedule = pixart_vp()
    student, fake = nn.Linear(4, 4), nn.Linear(4, 4)

    def as_denoiser(lin):
        return lambda x, t, c: lin(x.reshape(len(x), -1)).reshape(x.shape)

    recipe = tiny_tdm(as_denoiser(student), as_denoiser(fake), PointMass(torch.zeros(1, 2, 2)), schedule,
                      real_guidance=2.0)
    out = recipe.train_step(batch_of(8), 0, Draws.from_generator(torch.Generator().manual_seed(6)))
    out.losses["critic"].backward(retain_graph=True)
    assert student.weight.grad is None and fake.weight.grad.abs().sum() > 0
    fake.weight.grad = None
    out.losses["student"].backward()
    assert fake.weight.grad is None and student.weight.grad.abs().sum() > 0


# -- end to end on tiny random-init pipelines ----------------------------------------------------------------

def tdm_argv(teacher, out, *extra):
    return ["recipe=tdm", f"teacher.pretrained={teacher}", f"output_dir={out}", "data.batch_size=2",
            "sample.grid_size=2", "train.log_every=1", "train.progress=false", "student.lora.rank=4",
            "student.lora.alpha=8", "method.critic_rank=4", "method.critic_alpha=4", "train.steps=2",
            "student.lora.init_scale=0.3", "student.mode=lora", "method.critic_mode=lora",
            "method.total_steps=900", "method.real_guidance=2.0", "student.lora.targets=[]", *extra]


@pytest.mark.parametrize("family,sampler", [("sd", "ddim"), ("sd3", "ddim"), ("sd", "dpmsolver")])
def test_lora_export_reproduced_by_the_stock_pipeline(family, sampler, tmp_path):
    """Two TDM steps, then the stock pipeline with the recorded scheduler (Euler on the DDPM table / deterministic
    flow Euler / DPMSolverMultistepScheduler), timesteps or sigmas, and load_lora_weights reproduces our sampler."""
    import json

    import diffusers
    import tiny_pipelines

    from fewstep.distill import run
    from fewstep.export import load_export
    from fewstep.sampling.engine import initial_noise, seed_generators
    from fewstep.sampling.generate import generate_latents

    teacher = tmp_path / family
    getattr(tiny_pipelines, f"tiny_{family}")().save_pretrained(str(teacher), safe_serialization=True)
    out = tmp_path / "run"
    run(tdm_argv(teacher, out, f"method.sampler={sampler}"))
    meta = json.loads((out / "export" / "fewstep.json").read_text())
    assert meta["recipe"] == "tdm" and meta["step"] == sampler
    bundle, spec, _ = load_export(out / "export")
    prompts, seeds = ["a cat", "a dog"], [3, 4]
    ours = generate_latents(bundle, bundle.denoiser(), bundle.net, prompts, seeds,
                            torch.tensor(spec.times, dtype=torch.float64), spec.step, spec.guidance_scale)
    pipe = type(bundle.pipe).from_pretrained(str(teacher))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, meta["scheduler"]["class"]).from_config(meta["scheduler"]["config"])
    pipe.load_lora_weights(str(out / "export"))
    gens = seed_generators(seeds)
    latents = initial_noise((2, *bundle.latent_shape()), gens)
    if family == "sd":
        stock_class = {"ddim": "EulerDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler"}[sampler]
        assert meta["scheduler"]["class"] == stock_class and meta["timesteps"] == [899, 674, 449, 224]
        kwargs = {"timesteps": meta["timesteps"]}
    else:
        assert meta["timesteps"] == pytest.approx([0.899, 0.674, 0.449, 0.224], abs=1e-6)
        kwargs = {"sigmas": meta["timesteps"], "num_inference_steps": 4}
    stock = pipe(prompts, latents=latents, generator=gens, guidance_scale=1.0, output_type="latent",
                 **kwargs).images
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_dpmsolver_sampler_is_refused_on_flow_teachers(tmp_path):
    import tiny_pipelines

    from fewstep.distill import run
    from fewstep.errors import FewstepError

    teacher = tmp_path / "sd3"
    tiny_pipelines.tiny_sd3().save_pretrained(str(teacher), safe_serialization=True)
    with pytest.raises(FewstepError, match="flow teachers .* method.sampler=ddim"):
        run(tdm_argv(teacher, tmp_path / "run", "method.sampler=dpmsolver"))
    assert not (tmp_path / "run" / "export").exists()
