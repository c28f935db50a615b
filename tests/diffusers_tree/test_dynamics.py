"""Step math against independent computations: the peers' own formulas, diffusers' schedulers, torch.distributions."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_tree.dynamics import ddim_step, flow_step, gaussian_log_prob, predicted_clean_sample


@pytest.fixture
def xv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    v = torch.randn(3, 4, 8, 8, generator=g)
    z = torch.randn(3, 4, 8, 8, generator=g)
    return x.double(), v.double(), z.double()


def normal_mean_log_prob(x, mean, std):
    """Independent: torch.distributions' density, averaged over elements."""
    return torch.distributions.Normal(mean, std).log_prob(x).flatten(1).mean(1)


def flow_grpo_step(v, x, sigma, sigma_next, eta, sigma_max, z):
    """Flow-GRPO's sde_step_with_logprob as published (expanded form of the mean)."""
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * eta
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    prev = mean + std * z
    log_prob = (-((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi)))
    return prev, mean, std, log_prob.flatten(1).mean(1)


def dance_grpo_step(v, x, sigma, sigma_next, eta, z):
    """DanceGRPO's flux_step with sde_solver=True: the mean through the score estimate."""
    dsigma = sigma_next - sigma
    mean = x + dsigma * v
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    std = eta * math.sqrt(sigma - sigma_next)
    return mean + std * z, mean, std


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.8), (0.465, 0.278), (0.278, 0.0089), (1.0, 0.96)])
def test_flow_sde_matches_flow_grpo(xv, sigma, sigma_next):
    x, v, z = xv
    out = flow_step(v, x, sigma, sigma_next, sde_type="flow_sde", eta=0.7, noise=z, sigma_max=0.96)
    prev, mean, std, log_prob = flow_grpo_step(v, x, sigma, sigma_next, 0.7, 0.96, z)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, prev.to(out.prev_sample.dtype), rtol=1e-5, atol=1e-5)
    assert out.std.flatten()[0].item() == pytest.approx(std, rel=1e-6)
    torch.testing.assert_close(out.log_prob.double(), log_prob, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [1.0, 0.999999, 0.99967, 0.97])
def test_flow_sde_noise_stays_bounded_as_sigma_tends_to_one(xv, sigma):
    """Schedules that start just below σ = 1 (Wan 0.999999, SANA 0.99967) take the σ = 1 value of Flow-GRPO's
    coefficient: s = η·sqrt(σ / (1 − σ_max)) with σ_max = 0.96, not η·sqrt(σ / (1 − σ)) (s = 490 and 32 there)."""
    x, v, z = xv
    out = flow_step(v, x, sigma, 0.9, sde_type="flow_sde", eta=0.7, noise=z, sigma_max=0.96)
    expected_std = 0.7 * math.sqrt(sigma / (1 - 0.96)) * math.sqrt(sigma - 0.9)
    assert out.std.flatten()[0].item() == pytest.approx(expected_std, rel=1e-6)
    assert expected_std < 1.2


def test_flow_sde_closed_form_of_mean(xv):
    # closed form: mean = x + dt·[v + s²/(2σ)·(x + (1-σ)·v)] equals the expanded Flow-GRPO form above
    x, v, _ = xv
    sigma, sigma_next, eta = 0.7, 0.6, 0.7
    s2 = eta**2 * sigma / (1 - sigma)
    closed = x + (sigma_next - sigma) * (v + s2 / (2 * sigma) * (x + (1 - sigma) * v))
    _, expanded, _, _ = flow_grpo_step(v, x, sigma, sigma_next, eta, None, torch.zeros_like(x))
    torch.testing.assert_close(closed, expanded)
    out = flow_step(v, x, sigma, sigma_next, sde_type="flow_sde", eta=eta, noise=torch.zeros_like(x))
    torch.testing.assert_close(out.mean.double(), closed, rtol=1e-5, atol=1e-6)


def test_dance_sde_matches_dance_grpo(xv):
    x, v, z = xv
    out = flow_step(v, x, 0.6, 0.45, sde_type="dance_sde", eta=0.3, noise=z)
    prev, mean, std = dance_grpo_step(v, x, 0.6, 0.45, 0.3, z)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample.double(), prev, rtol=1e-5, atol=1e-5)
    expected = normal_mean_log_prob(out.prev_sample.double(), mean, torch.tensor(std, dtype=torch.float64))
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


def test_cps_mean_and_proper_log_prob(xv):
    x, v, z = xv
    sigma, sigma_next, eta = 0.8, 0.6, 0.8
    out = flow_step(v, x, sigma, sigma_next, sde_type="cps", eta=eta, noise=z)
    std = sigma_next * math.sin(eta * math.pi / 2)
    mean = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * math.sqrt(sigma_next**2 - std**2)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    expected = normal_mean_log_prob(out.prev_sample.double(), mean, torch.tensor(std, dtype=torch.float64))
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-5)


def test_flow_ode_equals_diffusers_euler(xv):
    x, v, _ = xv
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    i = 4
    expected = sched.step(v.float(), sched.timesteps[i], x.float()).prev_sample
    out = flow_step(v.float(), x.float(), sched.sigmas[i], sched.sigmas[i + 1], sde_type="ode", eta=0.0)
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-6, atol=1e-6)
    assert out.log_prob is None


@pytest.mark.parametrize("sde_type", ["flow_sde", "dance_sde", "cps"])
def test_flow_eta_to_zero_is_ode(xv, sde_type):
    x, v, z = xv
    ode = flow_step(v, x, 0.7, 0.5, sde_type="ode", eta=0.0)
    tiny = flow_step(v, x, 0.7, 0.5, sde_type=sde_type, eta=1e-6, noise=z)
    torch.testing.assert_close(tiny.prev_sample, ode.prev_sample, rtol=1e-4, atol=1e-4)


def make_ddim(prediction_type="epsilon"):
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    sched.set_timesteps(10)
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("i", [0, 5, 9])
def test_ddim_matches_diffusers_ddim(xv, prediction_type, eta, i):
    x, out_, z = (t.float() for t in xv)
    sched = make_ddim(prediction_type)
    t = int(sched.timesteps[i])
    prev_t = t - 1000 // 10
    alpha = sched.alphas_cumprod[t]
    alpha_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    expected = sched.step(out_, t, x, eta=eta, variance_noise=z).prev_sample
    result = ddim_step(out_, x, alpha, alpha_prev, eta=eta, prediction_type=prediction_type,
                       noise=z if eta else None)
    torch.testing.assert_close(result.prev_sample, expected, rtol=1e-4, atol=1e-4)
    if eta == 0:
        assert result.log_prob is None
    else:
        # DDPO's std: η·sqrt((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)); log-prob = the Gaussian density, element mean
        std = eta * torch.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
        expected_lp = normal_mean_log_prob(result.prev_sample.double(), result.mean.double(), std.double())
        torch.testing.assert_close(result.log_prob.double(), expected_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sde_type", ["flow_sde", "dance_sde", "cps"])
def test_rescore_equals_sampling_log_prob(xv, dtype, sde_type):
    x, v, _ = (t.to(dtype) for t in xv)
    g = torch.Generator().manual_seed(3)
    sampled = flow_step(v, x, 0.7, 0.5, sde_type=sde_type, eta=0.7, generator=g)
    assert sampled.prev_sample.dtype == dtype and sampled.log_prob.dtype == torch.float32
    rescored = flow_step(v, x, 0.7, 0.5, sde_type=sde_type, eta=0.7, prev_sample=sampled.prev_sample)
    assert torch.equal(sampled.log_prob, rescored.log_prob)  # ratio exactly 1 even in bf16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ddim_rescore_equals_sampling_log_prob(xv, dtype):
    x, eps, _ = (t.to(dtype) for t in xv)
    sampled = ddim_step(eps, x, 0.3, 0.45, eta=1.0, generator=torch.Generator().manual_seed(1))
    rescored = ddim_step(eps, x, 0.3, 0.45, eta=1.0, prev_sample=sampled.prev_sample)
    assert torch.equal(sampled.log_prob, rescored.log_prob)


def test_per_sample_sigmas_equal_scalar_calls(xv):
    x, v, z = xv
    sigma = torch.tensor([0.9, 0.7, 0.3])
    sigma_next = torch.tensor([0.8, 0.5, 0.1])
    batched = flow_step(v, x, sigma, sigma_next, sde_type="flow_sde", eta=0.7, noise=z)
    for b in range(3):
        single = flow_step(v[b:b + 1], x[b:b + 1], float(sigma[b]), float(sigma_next[b]), sde_type="flow_sde",
                           eta=0.7, noise=z[b:b + 1])
        torch.testing.assert_close(batched.log_prob[b:b + 1], single.log_prob)


def test_generator_reproducible_and_noise_is_standard_normal():
    x = torch.zeros(64, 4, 8, 8)
    v = torch.zeros_like(x)
    a = flow_step(v, x, 0.5, 0.4, sde_type="dance_sde", eta=1.0, generator=torch.Generator().manual_seed(0))
    b = flow_step(v, x, 0.5, 0.4, sde_type="dance_sde", eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.prev_sample, b.prev_sample)
    z = (a.prev_sample - a.mean) / a.std  # std = sqrt(0.1)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def test_errors_are_clear(xv):
    x, v, z = xv
    with pytest.raises(ValueError, match="Unknown sde_type 'sde'"):
        flow_step(v, x, 0.5, 0.4, sde_type="sde", eta=0.7)
    with pytest.raises(ValueError, match="sigma_max"):
        flow_step(v, x, 1.0, 0.9, sde_type="flow_sde", eta=0.7)
    with pytest.raises(ValueError, match=r"sigma_max must be in \[0, 1\)"):
        flow_step(v, x, 1.0, 0.9, sde_type="flow_sde", eta=0.7, sigma_max=1.0)
    with pytest.raises(ValueError, match="not both"):
        flow_step(v, x, 0.5, 0.4, sde_type="flow_sde", eta=0.7, noise=z, prev_sample=x)
    with pytest.raises(ValueError, match="zero noise"):
        flow_step(v, x, 0.5, 0.0, sde_type="cps", eta=0.7, noise=z)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(v, x, 0.3, 0.5, eta=1.0, prediction_type="sample")


def test_gaussian_log_prob_known_value():
    # x = mean, std = 1: log-density is -½·log(2π) = -0.918939 for every element
    x = torch.zeros(2, 3)
    assert torch.allclose(gaussian_log_prob(x, x, torch.ones(())), torch.full((2,), -0.9189385))


def test_predicted_clean_sample(xv):
    x, v, _ = xv
    torch.testing.assert_close(predicted_clean_sample(v, x, sigma=0.4), (x - 0.4 * v).float())
    eps_x0 = predicted_clean_sample(v, x, alpha_prod=0.25, prediction_type="epsilon")
    torch.testing.assert_close(eps_x0, ((x - math.sqrt(0.75) * v) / 0.5).float())
