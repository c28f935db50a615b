"""Step dynamics: one stochastic (or deterministic) denoising transition and its log-probability.

Notation (SPEC §2.5, TreeGRPO paper §3):

| code            | paper / peers          | meaning                                                    |
|-----------------|------------------------|------------------------------------------------------------|
| `sample`        | x_t                    | the latent before the step                                 |
| `model_output`  | v (flow) / ε̂ or v (DDPM)| the (guided) denoiser output at `sample`                    |
| `sigma`         | σ = sigmas[i]          | flow noise level before the step (1 = pure noise)          |
| `sigma_next`    | σ' = sigmas[i+1]       | flow noise level after the step; dt = σ' - σ < 0          |
| `alpha_prod`    | ᾱ_t                    | DDPM cumulative alpha at the step's timestep               |
| `alpha_prod_prev` | ᾱ_prev               | cumulative alpha at the next (less noisy) timestep         |
| `eta`           | η                      | noise level of the stochastic step                         |
| `noise`         | z ~ N(0, I)            | the standard-normal draw of the transition                 |
| `prev_sample`   | x_{t-1} (x' here)      | the latent after the step (diffusers' name)                |

The paper counts step indices up from noise (i = 0 is pure noise); diffusers' sigma goes down from 1 to 0.
Step index i goes from `sigmas[i]` to `sigmas[i+1]`, the same direction as the paper.

Every function here is pure: the result depends only on the arguments. All math runs in float32 whatever
the input dtype; only `prev_sample` is cast back to the input dtype, and the log-probability is computed
from that cast-back value, so re-scoring the stored `prev_sample` later gives the same log-prob bit for bit
(the "ratio = 1 before the first update" property).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

FlowSDEType = Literal["flow_sde", "dance_sde", "cps", "ode"]
FLOW_SDE_TYPES: tuple[str, ...] = ("flow_sde", "dance_sde", "cps", "ode")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepResult:
    """Result of one transition.

    Args:
        prev_sample (`torch.Tensor`): the latent after the step, in the dtype of the input `sample`. `[B, ...]`
        mean (`torch.Tensor`): float32 mean of the Gaussian transition. `[B, ...]`
        std (`torch.Tensor`): float32 standard deviation, broadcastable to `mean` (zero for an ODE step).
        log_prob (`torch.Tensor` or `None`): float32 `[B]`, the Gaussian log-density of `prev_sample`
            averaged over its elements; `None` for a deterministic step.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar or per-sample value shaped to broadcast over `like` ([B] -> [B, 1, 1, ...])."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 1 and like.ndim > 1:
        value = value.reshape(-1, *([1] * (like.ndim - 1)))
    return value


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density of `x` under N(mean, std²), averaged over all but the batch dimension. Returns `[B]`."""
    x, mean = x.float(), mean.float()
    std = torch.broadcast_to(std.float(), mean.shape)
    if bool((std <= 0).any()):
        raise ValueError(
            "The transition has zero noise (std = 0), so it has no log-probability. This happens for `cps` at "
            "sigma_next = 0 and for DDIM with alpha_prod_prev = 1; make that step deterministic (ODE) instead."
        )
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_density.flatten(1).mean(dim=1)


def _sample_or_score(
    mean: torch.Tensor,
    std: torch.Tensor,
    out_dtype: torch.dtype,
    noise: torch.Tensor | None,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None,
) -> StepResult:
    """Draw x' = mean + std·z (or take the given `prev_sample`) and score it under the same Gaussian."""
    if noise is not None and prev_sample is not None:
        raise ValueError("Pass either `noise` (to sample) or `prev_sample` (to score a transition), not both.")
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        # Cast first, then score the cast value: the stored latent is what training re-scores.
        prev_sample = (mean + std * noise.float()).to(out_dtype)
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepResult(prev_sample=prev_sample, mean=mean, std=torch.broadcast_to(std, mean.shape), log_prob=log_prob)


def flow_sde_scale(sigma: torch.Tensor, *, sde_type: str, eta: float, sigma_max: float | None) -> torch.Tensor:
    """The diffusion coefficient s of the flow SDE (SPEC §2.5).

    `flow_sde` (Flow-GRPO): s = η·sqrt(σ / (1 - min(σ, σ_max))), σ_max = `sigma_max`, the schedule's second sigma.
    Flow-GRPO replaces σ by σ_max in the denominator only where σ = 1 exactly; its intent is that s stays bounded
    as σ → 1. Schedules that start just below 1 (SANA's DPM-Solver flow sigmas at 0.99967, Wan's UniPC at
    0.999999) would otherwise get s ≈ 38 / 695 at their first step and leaves of pure noise. Capping the
    denominator's σ at σ_max equals Flow-GRPO wherever its schedule is used (σ = 1, or σ ≤ σ_max after the first
    step) and keeps s ≤ η·sqrt(1 / (1 - σ_max)) everywhere.
    `dance_sde` (DanceGRPO): s = η.
    """
    if sde_type == "dance_sde":
        return torch.full_like(sigma, float(eta))
    if sigma_max is None:
        if bool((sigma >= 1.0).any()):
            raise ValueError(
                "flow_sde at sigma = 1 needs `sigma_max` (Flow-GRPO uses sigmas[1]) for the 1 - sigma denominator."
            )
        return eta * torch.sqrt(sigma / (1.0 - sigma))
    if not 0.0 <= sigma_max < 1.0:
        raise ValueError(f"sigma_max must be in [0, 1) (the schedule's second sigma), got {sigma_max}.")
    return eta * torch.sqrt(sigma / (1.0 - sigma.clamp(max=sigma_max)))


def flow_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    sde_type: str,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    sigma_max: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepResult:
    """One flow-matching transition from `sigma` to `sigma_next` (SPEC §2.5).

    Args:
        model_output (`torch.Tensor`): velocity prediction v at `sample` (guided, if CFG is used). `[B, ...]`
        sample (`torch.Tensor`): the latent x at `sigma`. `[B, ...]`
        sigma (`float` or `torch.Tensor`): σ, a float or a `[B]` tensor.
        sigma_next (`float` or `torch.Tensor`): σ' < σ, a float or a `[B]` tensor.
        sde_type (`str`): one of `"flow_sde"`, `"dance_sde"`, `"cps"`, `"ode"`.
        eta (`float`): noise level η (ignored for `"ode"`).
        noise (`torch.Tensor`, *optional*): the standard-normal z to use; drawn from `generator` if omitted.
        prev_sample (`torch.Tensor`, *optional*): score this given x' instead of sampling (training recompute).
        sigma_max (`float`, *optional*): caps σ in `1 - σ` (`flow_sde` only; pass the schedule's `sigmas[1]`, as
            Flow-GRPO does): bounds the first step's noise on schedules that start at or just below σ = 1.
        generator (`torch.Generator`, *optional*): used to draw z when `noise` is omitted.

    Returns:
        [`StepResult`]; `log_prob` is `None` for `"ode"`.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_tree.dynamics import flow_step
        >>> x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> out = flow_step(v, x, 0.9, 0.8, sde_type="flow_sde", eta=0.7)
        >>> rescored = flow_step(v, x, 0.9, 0.8, sde_type="flow_sde", eta=0.7, prev_sample=out.prev_sample)
        >>> torch.equal(out.log_prob, rescored.log_prob)
        True
        ```
    """
    if sde_type not in FLOW_SDE_TYPES:
        raise ValueError(f"Unknown sde_type {sde_type!r} for a flow-matching step; choose one of {FLOW_SDE_TYPES}.")
    x, v = sample.float(), model_output.float()
    sigma_t, sigma_next_t = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next_t - sigma_t

    if sde_type == "ode":
        if prev_sample is not None:
            raise ValueError("An ODE step is deterministic: there is no `prev_sample` to score.")
        mean = x + dt * v
        return StepResult(mean.to(sample.dtype), mean, torch.zeros_like(mean), None)

    mean, std = _flow_sde_mean_std(x, v, sigma_t, sigma_next_t, sde_type=sde_type, eta=eta, sigma_max=sigma_max)
    return _sample_or_score(mean, std, sample.dtype, noise, prev_sample, generator)


def _flow_sde_mean_std(x, v, sigma, sigma_next, *, sde_type: str, eta: float, sigma_max: float | None):
    """Mean and std of the stochastic flow step (SPEC §2.5), float32 tensors."""
    if sde_type == "cps":
        std = sigma_next * math.sin(eta * math.pi / 2)
        x0_pred = x - sigma * v
        x1_pred = x + (1 - sigma) * v
        return x0_pred * (1 - sigma_next) + x1_pred * torch.sqrt(sigma_next**2 - std**2), std
    dt = sigma_next - sigma
    s = flow_sde_scale(sigma, sde_type=sde_type, eta=eta, sigma_max=sigma_max)
    # mean = x + dt·[v + s²/(2σ)·(x + (1-σ)·v)]: the Euler step of the reverse SDE with the same marginals.
    return x + dt * (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)), s * torch.sqrt(-dt)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod: float | torch.Tensor,
    alpha_prod_prev: float | torch.Tensor,
    *,
    eta: float,
    prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepResult:
    """One DDIM transition (Song et al. Eq. 12; DDPO's log-prob) from ᾱ_t to ᾱ_prev (SPEC §2.5).

    Args:
        model_output (`torch.Tensor`): ε̂ (`prediction_type="epsilon"`) or v (`"v_prediction"`). `[B, ...]`
        sample (`torch.Tensor`): the latent x_t. `[B, ...]`
        alpha_prod (`float` or `torch.Tensor`): ᾱ_t, a float or a `[B]` tensor.
        alpha_prod_prev (`float` or `torch.Tensor`): ᾱ_prev, a float or a `[B]` tensor.
        eta (`float`): η; `0` is the deterministic DDIM (ODE) step and returns `log_prob=None`.
        prediction_type (`str`, *optional*, defaults to `"epsilon"`): `"epsilon"` or `"v_prediction"`.
        noise, prev_sample, generator: as in [`flow_step`].

    Example:
        ```py
        >>> import torch
        >>> from diffusers_tree.dynamics import ddim_step
        >>> x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> out = ddim_step(eps, x, 0.3, 0.5, eta=1.0)
        >>> out.log_prob.shape
        torch.Size([2])
        ```
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}.")
    x, out = sample.float(), model_output.float()
    alpha, alpha_prev = _per_sample(alpha_prod, x), _per_sample(alpha_prod_prev, x)
    if prediction_type == "epsilon":
        eps = out
        x0_pred = (x - torch.sqrt(1 - alpha) * eps) / torch.sqrt(alpha)
    else:
        x0_pred = torch.sqrt(alpha) * x - torch.sqrt(1 - alpha) * out
        eps = torch.sqrt(alpha) * out + torch.sqrt(1 - alpha) * x
    std = eta * torch.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
    mean = torch.sqrt(alpha_prev) * x0_pred + torch.sqrt(1 - alpha_prev - std**2) * eps
    if eta == 0:
        if prev_sample is not None:
            raise ValueError("eta = 0 is the deterministic DDIM step: there is no `prev_sample` to score.")
        return StepResult(mean.to(sample.dtype), mean, torch.zeros_like(mean), None)
    return _sample_or_score(mean, std, sample.dtype, noise, prev_sample, generator)


def predicted_clean_sample(
    model_output: torch.Tensor, sample: torch.Tensor, *, sigma=None, alpha_prod=None, prediction_type: str = "flow"
) -> torch.Tensor:
    """x̂0, the model's prediction of the clean latent (used to score partial trees). float32.

    Flow matching (`prediction_type="flow"`): x̂0 = x - σ·v. DDPM: from ε̂ or v with ᾱ_t.
    """
    x, out = sample.float(), model_output.float()
    if prediction_type == "flow":
        return x - _per_sample(sigma, x) * out
    alpha = _per_sample(alpha_prod, x)
    if prediction_type == "epsilon":
        return (x - torch.sqrt(1 - alpha) * out) / torch.sqrt(alpha)
    if prediction_type == "v_prediction":
        return torch.sqrt(alpha) * x - torch.sqrt(1 - alpha) * out
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}; choose 'flow', 'epsilon' or 'v_prediction'.")
