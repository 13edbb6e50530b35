"""Our pure sampler steps against diffusers' own schedulers as the oracle (architecture.md S6)."""
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler, TCDScheduler

from fewstep.diffusion.param import to_x0
from fewstep.diffusion.schedule import DiscreteVP, RectifiedFlow, bcast
from fewstep.sampling.steps import consistency_step, ddim_step, lcm_boundary, tcd_step

KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _x_eps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)


def _t(vp, ts):
    return vp.to_t(torch.tensor([ts, ts])).float()


def test_ddim_step_matches_diffusers():
    sched = DDIMScheduler(**KW, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(4)
    vp = DiscreteVP(sched.alphas_cumprod)
    x, eps = _x_eps()
    ts = [int(v) for v in sched.timesteps] + [0]
    for cur, nxt in zip(ts[:-1], ts[1:]):
        t = _t(vp, cur)
        a, s = (bcast(v, x) for v in vp.alpha_sigma(t))
        ours = ddim_step(x, to_x0(eps, x, a, s, "eps"), t, _t(vp, nxt) if nxt else torch.zeros(2), vp)
        ref = sched.step(eps, cur, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_flow_euler_matches_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    rf = RectifiedFlow()
    x, v = _x_eps(1)
    sig = list(sched.sigmas)
    for i, ts in enumerate(sched.timesteps):
        t, t_next = sig[i].expand(2), sig[i + 1].expand(2)
        a, s = (bcast(u, x) for u in rf.alpha_sigma(t))
        ours = ddim_step(x, to_x0(v, x, a, s, "flow"), t, t_next, rf)
        ref = sched.step(v, ts, x).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        x = ref


def test_lcm_boundary_conditions():
    c_skip, c_out = lcm_boundary(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-5 and abs(c_out[2] - 1) < 1e-6


def test_consistency_step_matches_lcm_scheduler():
    sched = LCMScheduler(**KW)
    sched.set_timesteps(4)
    vp = DiscreteVP(sched.alphas_cumprod)
    x, eps = _x_eps(2)
    ts = [int(v) for v in sched.timesteps]
    assert ts == [999, 759, 499, 259]
    for i, cur in enumerate(ts):
        nxt = ts[i + 1] if i + 1 < len(ts) else None
        t = _t(vp, cur)
        a, s = (bcast(v, x) for v in vp.alpha_sigma(t))
        ours = consistency_step(x, to_x0(eps, x, a, s, "eps"), t, _t(vp, nxt) if nxt else torch.zeros(2), vp,
                                torch.Generator().manual_seed(7))
        ref = sched.step(eps, cur, x, generator=torch.Generator().manual_seed(7)).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        x = ref


def test_tcd_step_matches_tcd_scheduler():
    for gamma in (0.0, 0.3, 1.0):
        sched = TCDScheduler(**KW)
        sched.set_timesteps(4)
        vp = DiscreteVP(sched.alphas_cumprod)
        x, eps = _x_eps(3)
        ts = [int(v) for v in sched.timesteps]
        for i, cur in enumerate(ts):
            nxt = ts[i + 1] if i + 1 < len(ts) else 0
            t = _t(vp, cur)
            a, s = (bcast(v, x) for v in vp.alpha_sigma(t))
            ours = tcd_step(x, to_x0(eps, x, a, s, "eps"), t, _t(vp, nxt).float() if nxt else torch.zeros(2), vp,
                            torch.Generator().manual_seed(5), gamma=gamma)
            ref = sched.step(eps, cur, x, eta=gamma, generator=torch.Generator().manual_seed(5)).prev_sample
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=f"gamma={gamma} step {i}")
            x = ref


def test_dpmsolver_matches_diffusers_multistep_on_custom_timesteps():
    """DPM-Solver++(2M) through TDM's grid 899/674/449/224 -> 0 against DPMSolverMultistepScheduler
    (dpmsolver++, order 2, lower_order_final, final sigma 0) fed the same x0 model as eps; and a second run of the
    same step object reproduces the first (its history restarts with the trajectory)."""
    from diffusers import DPMSolverMultistepScheduler

    from fewstep.data.toy import GaussianDenoiser
    from fewstep.sampling.engine import sample
    from fewstep.sampling.steps import make_step

    sched = DPMSolverMultistepScheduler(**KW, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                        final_sigmas_type="zero")
    sched.set_timesteps(timesteps=[899, 674, 449, 224])
    vp = DiscreteVP(sched.alphas_cumprod)
    model = GaussianDenoiser(torch.linspace(-1, 1, 4)[:, None, None], 0.3, vp)
    x, _ = _x_eps(3)
    ref = x.clone()
    for ts in sched.timesteps:
        t = _t(vp, int(ts))
        a, s = (bcast(v, ref) for v in vp.alpha_sigma(t))
        eps = (ref - a * model(ref, t)) / s
        ref = sched.step(eps, ts, ref).prev_sample
    times = torch.cat([vp.to_t(torch.tensor([899, 674, 449, 224])).double(), torch.zeros(1, dtype=torch.float64)])
    step = make_step("dpmsolver")
    ours = sample(model, x, times, vp, step=step)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sample(model, x, times, vp, step=step), ours)
    ddim = sample(model, x, times, vp, step=ddim_step)
    assert (ddim - ours).abs().max() > 1e-3                                       # second order does something
