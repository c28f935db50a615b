"""`TreeSDEScheduler`: a diffusers scheduler that samples TreeGRPO trees (and the flat/mix peer shapes).

Notation (SPEC §2): step index i runs up from noise (i = 0 is the root, pure noise), as in the paper; for the flow
family step i goes from `sigmas[i]` down to `sigmas[i+1]`, for the DDPM family from `timesteps[i]` to
`timesteps[i+1]` (DDIM's `t - num_train_timesteps // num_inference_steps` for its default spacing).
`branch_factor` = k, `window_width` = w, `window_start` = s, `window_ratio` = r, `eta` = η.

Two ways to use it:
1. Swapped into a stock pipeline (fixed-batch mode): every `k^w` consecutive rows of the batch are the leaves of
   one tree. Before each step, every row takes the latent and model output of the first leaf of its node, so the
   leaves share their root noise and everything up to their common ancestor, exactly as the plan says; SDE steps
   draw one noise per child node. Wasteful (every leaf is computed), but works in any pipeline unchanged.
2. Node-level, by `TreeRolloutPipeline` and the trainer: `transition(...)` steps any set of nodes from a given step
   index with given noise, or re-scores a given child (one code path for sampling and training log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .dynamics import FLOW_SDE_TYPES, StepResult, ddim_step, flow_step
from .noise import draw_branch_noise
from .plan import BranchFactor, BranchPlan, build_plan, check_tree_settings, checked_tree_shape
from .tail import tail_solver
from .window import sample_window_start

DDPM_SDE_TYPES: tuple[str, ...] = ("ddim",)
# the keywords of a tree's shape and noise (everything but the base scheduler)
TREE_SETTINGS: tuple[str, ...] = ("sde_type", "eta", "branch_factor", "window_width", "window_start", "window_ratio",
                                  "algorithm", "tail_steps", "tail_solver_order")
DEFAULT_ETA = {"flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8, "ddim": 1.0, "ode": 0.0}


@dataclass
class TreeSDESchedulerOutput(BaseOutput):
    """Output of [`TreeSDEScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the latents after the step, `[B, ...]`, in the input dtype.
        log_prob (`torch.Tensor` or `None`): float32 `[B]` log-prob of each row's transition (rows of one node
            share it); `None` on an ODE step.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None = None


class TreeSDEScheduler(SchedulerMixin, ConfigMixin):
    """Wraps a flow-matching (SD3, FLUX) or DDPM-family (SD1.5, SDXL) scheduler and samples branching trees.

    Args:
        base_scheduler_class (`str`, defaults to `"FlowMatchEulerDiscreteScheduler"`): diffusers class of the base.
        base_config (`dict`, *optional*): the base scheduler's config; its keys are also readable from this
            scheduler's config, as stock pipelines expect.
        sde_type (`str`, *optional*): `"flow_sde"`, `"dance_sde"`, `"cps"` or `"ode"` for the flow family,
            `"ddim"` for the DDPM family. Defaults to `"flow_sde"` / `"ddim"`.
        eta (`float`, *optional*): noise level η; defaults per `sde_type`: flow_sde 0.7 (Flow-GRPO), dance_sde 0.3
            (DanceGRPO), cps 0.8, ddim 1.0 (DDPO).
        branch_factor (`int` or `list[int]`, defaults to 3): k, children per node at each window step; or one count
            per window step (`[9, 3, 1]`: nine children per root, three per grandchild, one after), leaves Π k_j.
        window_width (`int`, *optional*): w, number of SDE steps; defaults to 3, or to the length of a
            `branch_factor` list.
        window_start (`int`, *optional*): s; `None` draws it from Eq. 7 at every `set_timesteps`.
        window_ratio (`float`, defaults to 0.5): r of Eq. 7.
        algorithm (`str`, defaults to `"tree"`): `"tree"`, `"flat"` (k^w SDE trajectories from one noise) or
            `"mix"` (k^w trajectories, SDE only in the window).
        tail_steps (`int`, *optional*): most denoiser evaluations per leaf after the last SDE step; the ODE tail is
            then integrated by [`~TreeSDEScheduler.tail_solver`] (DPM-Solver++) over that many steps of the model's
            own schedule. `None` (default) keeps the exact one-step-per-timestep tail. Used by
            `TreeRolloutPipeline`; a stock pipeline calling `step` walks every timestep, so it keeps the exact tail.
        tail_solver_order (`int`, defaults to 2): order of the tail's multistep solver: 1 is DDIM (= the Euler ODE
            step for flow models), 2 is DPM-Solver++(2M), 3 is DPM-Solver++(3M).

    Example:
        ```py
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> from diffusers_tree import TreeSDEScheduler
        >>> tree = TreeSDEScheduler.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), window_start=2)
        >>> tree.set_timesteps(10)
        >>> tree.plan.num_leaves, tree.plan.sde_steps[:6]
        (27, (False, False, True, True, True, False))
        ```
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        base_scheduler_class: str = "FlowMatchEulerDiscreteScheduler",
        base_config: dict | None = None,
        sde_type: str | None = None,
        eta: float | None = None,
        branch_factor: BranchFactor = 3,
        window_width: int | None = None,
        window_start: int | None = None,
        window_ratio: float = 0.5,
        algorithm: str = "tree",
        tail_steps: int | None = None,
        tail_solver_order: int = 2,
    ):
        base_cls = getattr(diffusers, base_scheduler_class, None)
        if base_cls is None:
            raise ValueError(f"Unknown base scheduler class {base_scheduler_class!r} (not found in diffusers).")
        base = base_cls.from_config(dict(base_config or {}))
        self.family = _family_of(base)
        if self.family == "ddpm" and not isinstance(base, diffusers.DDIMScheduler):
            # Every DDPM-family scheduler shares ᾱ; the tree steps are DDIM steps on DDIM's timestep grid.
            base = diffusers.DDIMScheduler.from_config(base.config)
        self.base = base
        sde_type = _checked_sde_type(sde_type, self.family, type(base).__name__)
        branch_factor, window_width = checked_tree_shape(branch_factor, window_width)
        check_tree_settings(algorithm, tail_steps, tail_solver_order, window_ratio)
        eta = DEFAULT_ETA[sde_type] if eta is None else float(eta)
        base_keys = {k: v for k, v in base.config.items() if not k.startswith("_")}
        self.register_to_config(base_scheduler_class=type(base).__name__, base_config=base_keys, sde_type=sde_type,
                                eta=eta, branch_factor=branch_factor, window_width=window_width)
        # Flatten the base's keys into our config: stock pipelines read e.g. `scheduler.config.base_image_seq_len`.
        own = set(self._get_init_keys(type(self)))
        self.register_to_config(**{k: v for k, v in base_keys.items() if k not in own})

        self.init_noise_sigma = 1.0
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None
        self.timestep_table: torch.Tensor | None = None  # CPU float32 copy of `timesteps`
        self.sigma_table: torch.Tensor | None = None  # CPU float32 copy of `sigmas` (flow family)
        self.num_inference_steps: int | None = None
        self.plan: BranchPlan | None = None
        self.noise_generator: torch.Generator | None = None
        self.window_generator: torch.Generator | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # The flattened base keys are re-derived from `base_config` in __init__; keep them out of the
        # "unexpected config attributes" warning.
        base_keys = set((config_dict.get("base_config") or {}).keys()) - set(cls._get_init_keys(cls))
        config_dict = {k: v for k, v in config_dict.items() if k not in base_keys}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_scheduler(cls, base_scheduler: SchedulerMixin, **tree_kwargs) -> TreeSDEScheduler:
        """Wrap a stock scheduler with tree settings given as keywords. Re-wrapping a `TreeSDEScheduler` keeps its
        tree settings (the tree the user configured) except those given: a new `sde_type` takes its own default
        `eta` unless `eta` is given too, and a `branch_factor` list its own `window_width`."""
        if isinstance(base_scheduler, TreeSDEScheduler):
            kept = {key: base_scheduler.config[key] for key in TREE_SETTINGS}
            if "sde_type" in tree_kwargs:
                kept.pop("eta")
            if not isinstance(tree_kwargs.get("branch_factor", 0), int):
                kept.pop("window_width")
            tree_kwargs = {**kept, **tree_kwargs}
            base_scheduler = base_scheduler.base
        base_config = {k: v for k, v in base_scheduler.config.items() if not k.startswith("_")}
        return cls(base_scheduler_class=type(base_scheduler).__name__, base_config=base_config, **tree_kwargs)

    # ---- what stock pipelines ask for ---------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Set the base schedule (same arguments as the base) and build this call's branching plan."""
        extra = {k: v for k, v in {"sigmas": sigmas, "mu": mu, "timesteps": timesteps}.items() if v is not None}
        if self.family == "ddpm" and extra:
            raise ValueError(f"{type(self.base).__name__} does not accept {sorted(extra)}; pass num_inference_steps.")
        self.base.set_timesteps(num_inference_steps, device=device, **extra)
        self.timesteps = self.base.timesteps
        self.num_inference_steps = len(self.timesteps)
        # CPU float32 copies of the schedule, read by every transition: FlowMatchEuler keeps `sigmas` (and the
        # pipelines' `timesteps`) on the accelerator, where each lookup would be a device sync.
        self.timestep_table = self.timesteps.detach().float().cpu()
        if self.family == "flow":
            self.sigmas = self.base.sigmas
            self.sigma_table = self.sigmas.detach().float().cpu()
        start = self.config.window_start
        if start is None:
            start = sample_window_start(self.num_inference_steps, self.config.window_width, self.config.window_ratio,
                                        self.window_generator)
        self.set_window_start(start)
        self._step_index = None

    def set_window_start(self, window_start: int) -> None:
        """Rebuild the plan with the SDE window at `window_start` (after `set_timesteps`)."""
        if self.num_inference_steps is None:
            raise RuntimeError("Call `set_timesteps` before `set_window_start`.")
        self.plan = build_plan(self.config.algorithm, self.num_inference_steps, self.config.branch_factor,
                               self.config.window_width, window_start, zero_noise_steps=self.zero_noise_steps(),
                               tail_steps=self.config.tail_steps)

    def zero_noise_steps(self) -> tuple[int, ...]:
        """Steps of the current schedule at which this `sde_type` has no noise (std = 0), so no log-probability:
        `cps` into σ' = 0 (std = σ'·sin(ηπ/2)) and DDIM into ᾱ_prev = 1 (the last step when the base scheduler's
        `final_alpha_cumprod` is 1, e.g. `set_alpha_to_one=True`). The flat shape takes them as ODE steps; a tree
        or mix window must not cover them."""
        if self.timesteps is None:
            raise RuntimeError("Call `set_timesteps` before `zero_noise_steps`.")
        steps = torch.arange(self.num_inference_steps)
        if self.family == "flow":
            if self.config.sde_type != "cps":
                return ()
            zero = self.sigma_table[steps + 1] <= 0
        else:
            zero = self.alpha_pair(steps)[1] >= 1
        return tuple(int(i) for i in zero.nonzero().flatten())

    def manual_seed(self, seed: int) -> TreeSDEScheduler:
        """Seed the branch noise and the window draw (stock pipelines do not pass their generator to FLUX/SD3
        scheduler steps). Returns `self`."""
        self.noise_generator = torch.Generator().manual_seed(seed)
        self.window_generator = torch.Generator().manual_seed(seed + 1)
        return self

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        """Index of the next step in fixed-batch mode (for observation only; the math never reads it)."""
        return self._step_index

    def add_noise(self, *args, **kwargs):
        return self.base.add_noise(*args, **kwargs)

    def scale_noise(self, *args, **kwargs):
        return self.base.scale_noise(*args, **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Step index of a timestep of the current schedule."""
        if self.timesteps is None:
            raise RuntimeError("Call `set_timesteps` before stepping.")
        t = float(torch.as_tensor(timestep).flatten()[0])
        distance = (self.timestep_table - t).abs()
        index = int(distance.argmin())
        if float(distance[index]) > 1e-3 * max(1.0, abs(t)):
            raise ValueError(f"timestep {t} is not in the current schedule {self.timesteps.tolist()}.")
        return index

    # ---- node-level transition (rollout pipeline and trainer) ---------------------------------------------------
    def transition(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        step_index: int | torch.Tensor,
        *,
        stochastic: bool | None = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepResult:
        """Step `sample` from step `step_index` (an int, or a `[B]` tensor of step indices): an SDE step with a
        log-prob if `stochastic` (default: what the plan says for an int index), else the ODE step. Pass
        `prev_sample` to re-score a stored child; the same code computes sampling and training log-probs.

        Devices: the schedule tables (`sigma_table`, `timestep_table`, `alphas_cumprod`) are CPU copies made at
        `set_timesteps` and are indexed there, with no device sync; a step-index tensor on another device is read
        back first (a device sync), so pass CPU indices (the [`RolloutRecord`]'s index arrays are CPU tensors). The
        looked-up values follow `sample`."""
        if self.timesteps is None:
            raise RuntimeError("Call `set_timesteps` before stepping.")
        if stochastic is None:
            if not isinstance(step_index, int):
                raise ValueError("Pass `stochastic=` when `step_index` is a tensor.")
            stochastic = self.plan.sde_steps[step_index]
        index = torch.as_tensor(step_index, dtype=torch.long).cpu()
        if self.family == "flow":
            sigmas = self.sigma_table
            sigma, sigma_next = sigmas[index].to(sample.device), sigmas[index + 1].to(sample.device)
            sde_type = self.config.sde_type if stochastic else "ode"
            return flow_step(model_output, sample, sigma, sigma_next, sde_type=sde_type, eta=self.config.eta,
                             noise=noise, prev_sample=prev_sample, sigma_max=float(sigmas[1]), generator=generator)
        alpha, alpha_prev = (value.to(sample.device) for value in self.alpha_pair(index))
        return ddim_step(model_output, sample, alpha, alpha_prev, eta=self.config.eta if stochastic else 0.0,
                         prediction_type=self.config.prediction_type, noise=noise, prev_sample=prev_sample,
                         generator=generator)

    def tail_solver(self, levels: tuple[int, ...] | list[int], order: int | None = None):
        """A DPM-Solver++ set up to integrate the ODE tail over `levels` of the current schedule (see
        [`~diffusers_tree.tail.tail_solver`]); `order` defaults to `tail_solver_order`."""
        return tail_solver(self, levels, self.config.tail_solver_order if order is None else order)

    def alpha_pair(self, step_index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ᾱ_t, ᾱ_prev) of DDIM step(s), as CPU float32 tensors. ᾱ_prev is read at the next timestep of the schedule
        (for DDIM's "leading"/"trailing" spacings that is DDIM's t - num_train_timesteps // num_inference_steps; for
        "linspace" it keeps the step on the grid the sampler really visits), and `final_alpha_cumprod` after the
        last step."""
        index = torch.as_tensor(step_index, dtype=torch.long).cpu()
        grid = torch.cat([self.timestep_table.long(), torch.tensor([-1])])
        t, prev_t = grid[index], grid[index + 1]
        alphas = self.base.alphas_cumprod.float().cpu()
        final = torch.as_tensor(self.base.final_alpha_cumprod, dtype=torch.float32).cpu()
        alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final)
        return alphas[t], alpha_prev

    # ---- fixed-batch mode: a stock pipeline's step ---------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> TreeSDESchedulerOutput | tuple:
        """One step of a stock pipeline's batch, read as whole trees of `plan.num_leaves` consecutive rows."""
        i = self.index_for_timestep(timestep)
        plan = self.plan
        batch, leaves = sample.shape[0], plan.num_leaves
        if batch % leaves:
            raise ValueError(
                f"The batch has {batch} rows, which is not whole trees of {leaves} leaves "
                f"(branch_factor={self.config.branch_factor}, window_width={self.config.window_width}); call the "
                f"pipeline with num_images_per_prompt={leaves} (video pipelines: num_videos_per_prompt) or a "
                "multiple."
            )
        num_trees, rows = batch // leaves, torch.arange(batch, device=sample.device)
        tree, leaf = rows // leaves, rows % leaves
        group = leaves // plan.frontier_sizes[i]
        representative = tree * leaves + (leaf // group) * group  # first leaf of each row's node at level i
        model_output, sample = model_output[representative], sample[representative]
        noise = None
        if plan.sde_steps[i]:
            children = plan.frontier_sizes[i + 1]
            if isinstance(generator, list):
                generator = generator[0]
            branch = draw_branch_noise(num_trees, children, tuple(sample.shape[1:]),
                                       generator=self.noise_generator or generator, device=sample.device)
            noise = branch[tree * children + leaf // (leaves // children)]
        result = self.transition(model_output, sample, i, noise=noise)
        self._step_index = i + 1
        if not return_dict:
            return (result.prev_sample, result.log_prob)
        return TreeSDESchedulerOutput(prev_sample=result.prev_sample, log_prob=result.log_prob)


def _family_of(scheduler: SchedulerMixin) -> str:
    """"flow" for flow-matching schedules, "ddpm" for variance-preserving ones. Decided by what the schedule is,
    not the class: the UniPC / DPM-Solver schedulers that Wan and SANA ship run flow sigmas (`use_flow_sigmas`,
    `prediction_type="flow_prediction"`) while also carrying an unused `alphas_cumprod`. Their own sigmas and
    timesteps are kept (the model was trained and tuned on them); only the step rule is the flow SDE/ODE's."""
    config = scheduler.config
    flow_schedule = bool(config.get("use_flow_sigmas", False)) or config.get("prediction_type") == "flow_prediction"
    if (type(scheduler).__name__.startswith("FlowMatch") or flow_schedule) and hasattr(scheduler, "sigmas"):
        return "flow"
    if hasattr(scheduler, "alphas_cumprod"):
        return "ddpm"
    raise ValueError(
        f"TreeSDEScheduler cannot wrap {type(scheduler).__name__}: it supports flow-matching schedules "
        "(FlowMatchEulerDiscrete: SD3, FLUX; UniPC / DPM-Solver with use_flow_sigmas: Wan, SANA) and the DDPM "
        "family (DDIM, DDPM, Euler discrete; anything with `alphas_cumprod`)."
    )


def _checked_sde_type(sde_type: str | None, family: str, base_name: str) -> str:
    """The SDE type (the family's first, Flow-GRPO's `sde` or DDIM's `ddim`, when not given)."""
    allowed = FLOW_SDE_TYPES if family == "flow" else DDPM_SDE_TYPES
    sde_type = sde_type or allowed[0]
    if sde_type not in allowed:
        raise ValueError(f"sde_type={sde_type!r} does not apply to {base_name}; choose one of {allowed}.")
    return sde_type

