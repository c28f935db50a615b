"""Recipes: the TOML schema (pydantic, `extra="forbid"`, frozen), loading, `--set` overrides, the resolved copy.

Every field is documented once, here, in `Field(description=...)`; `docs/recipes.md` is generated from this schema
(`python -m treegrpo.recipe.docs`). Derived values live in `treegrpo.recipe.plan.RunPlan`, never back in the recipe.
"""

from __future__ import annotations

import math
import sys
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from treegrpo.errors import UsageError

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass


class RecipeError(UsageError):
    """A recipe or override is invalid; the message names the key, the value and what is allowed."""


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes up to 64 bits; our derived seeds stay below 2**63
MAX_LEAVES_PER_TREE = 4096  # k^w: beyond this a single tree's frontier does not fit any GPU at 512 px


class _Table(BaseModel):
    # NaN or inf in any number (a weight, a learning rate) is never meaningful: reject it at load time
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_strings(cls, value, info: ValidationInfo):
        """`learning_rate = "3e-4"` is a string in TOML, which pydantic would quietly parse; a quoted number is
        usually a mistake, so say so instead of guessing."""
        annotation = str(cls.model_fields[info.field_name].annotation)
        numeric = ("int" in annotation or "float" in annotation) and "str" not in annotation
        if isinstance(value, str) and numeric and _is_number(value):
            raise ValueError(f"a string; write the number without quotes ({info.field_name} = {value})")
        return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class LoraRecipe(_Table):
    rank: int = Field(32, gt=0, description="LoRA rank r.")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the family's attention projections "
        "(SD3/FLUX: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; UNets: to_q/k/v, to_out.0).")
    init_seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of the LoRA initialisation (identical on every "
                           "process).")


class ModelRecipe(_Table):
    pretrained: str = Field(..., description="Hub id, local diffusers folder, or a shipped tiny model: "
                            "`builtin:digits` (SD3-style, handwritten digits), `builtin:shapes` (FLUX-style, "
                            "GenEval-style scenes of coloured shapes) or `builtin:shapes_edit` (FLUX.1 Kontext-"
                            "style: recolours one object of a shapes scene).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `pretrained`.")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Dtype of the frozen weights and of the "
                                                    "mixed-precision forwards; trainable weights stay fp32.")
    lora: LoraRecipe | None = Field(None, description="LoRA settings; absent = full fine-tuning of the denoiser.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save "
                                         "memory.")
    offload_text_encoders: bool = Field(False, description="Keep the text encoders in CPU memory, moving them to "
                                        "the accelerator only to encode prompts the run has not cached yet (with "
                                        "data.cache_embeddings); frees their accelerator memory (SD3's T5-XXL: "
                                        "~9 GB in bf16) for most of the run.")
    offload_rewards: bool = Field(False, description="Keep the reward models in CPU memory, moving them to the "
                                  "accelerator only while they score an epoch's leaves; frees their accelerator "
                                  "memory (PickScore/HPS's CLIP ViT-H: ~2 GB in bf16) during rollout and training.")


class SamplingRecipe(_Table):
    num_inference_steps: int = Field(10, ge=2, description="T, denoising steps per rollout.")
    guidance_scale: float | None = Field(None, ge=0, description="CFG scale (FLUX: distilled guidance); default: "
                                         "the pipeline family's default.")
    height: int = Field(512, ge=8, le=8192, description="Image height in pixels (a multiple of the model's latent "
                        "patch size in pixels, checked when the model loads).")
    width: int = Field(512, ge=8, le=8192, description="Image width in pixels (as height).")
    num_frames: int | None = Field(None, ge=1, description="Video models (Wan): frames per video, 4k + 1 (e.g. 33, "
                                   "81); default: the pipeline's. Must be unset for image models.")
    sde_type: Literal["flow_sde", "dance_sde", "cps", "ddim"] | None = Field(
        None, description="Stochastic step: flow_sde (Flow-GRPO), dance_sde (DanceGRPO), cps; ddim for UNet "
        "(DDPM-family) models. Default: flow_sde for flow models, ddim for UNets.")
    eta: float | None = Field(None, gt=0, description="Noise level η of the SDE step; default per sde_type "
                              "(flow_sde 0.7, dance_sde 0.3, cps 0.8, ddim 1.0).")
    max_sequence_length: int | None = Field(None, gt=0, description="T5 token length (SD3/FLUX); default: the "
                                            "pipeline's, or the value stored with a builtin model.")
    negative_prompt: str | None = Field(None, description="Negative prompt for CFG (default empty).")
    auto_resize: bool | None = Field(None, description="Editing models: resize each source image (a .jsonl "
                                     "line's `image`) to the family's preferred resolution nearest its aspect ratio, "
                                     "as the stock pipeline does (FLUX.1 Kontext: 672-1568 px a side); false keeps "
                                     "its size, floored to a multiple of 16 px. Default: the shipped model's setting "
                                     "(builtin:shapes_edit: false), else true. Ignored by text-to-image models.")
    max_batch_size: int = Field(64, ge=2, description="Most latent rows per denoiser forward while sampling (CFG "
                                "halves included).")
    tail_steps: int | None = Field(None, ge=1, description="Denoiser steps per leaf after the SDE window: the "
                                   "untrained ODE tail is integrated by DPM-Solver++ over this many steps of the "
                                   "model's schedule instead of one per timestep (fewer rollout rows). Absent = the "
                                   "exact tail. See docs/training.md, 'Fast tails'.")
    tail_solver_order: int = Field(2, ge=1, le=3, description="Order of the tail solver: 1 DDIM/Euler, 2 "
                                   "DPM-Solver++(2M), 3 DPM-Solver++(3M).")
    rollout_groups: int = Field(1, ge=1, description="Roll each process's prompts of an epoch out in this many "
                                "groups (at most one per prompt) and score each group's leaves while the next group "
                                "rolls out (overlap_scoring): scoring hides behind the rollout. Trains exactly as one "
                                "group (same trees, same record). See docs/training.md, 'Rewards off the critical "
                                "path'.")
    overlap_scoring: bool = Field(True, description="With rollout_groups > 1, score a group in a background thread "
                                  "while the next one rolls out; false scores the groups after the rollout (the same "
                                  "numbers, for rewards that must not run beside the rollout).")


class TreeRecipe(_Table):
    @model_validator(mode="before")
    @classmethod
    def _width_from_factor_list(cls, data):
        if isinstance(data, dict) and isinstance(data.get("branch_factor"), list):
            factors = data["branch_factor"]
            width = data.setdefault("window_width", len(factors))
            if width != len(factors):
                raise ValueError(f"tree.branch_factor={factors} lists {len(factors)} children counts (one per window "
                                 f"step) but tree.window_width={width}; drop window_width or make them agree.")
        return data

    @property
    def window_factors(self) -> tuple[int, ...]:
        """Children per node at each window step (as `diffusers_tree.plan.window_factors`, without importing torch:
        loading a recipe stays light; the list's length was checked against window_width on load)."""
        if isinstance(self.branch_factor, int):
            return (self.branch_factor,) * self.window_width
        return tuple(self.branch_factor)

    @property
    def leaves_per_tree(self) -> int:
        return math.prod(self.window_factors)

    algorithm: Literal["tree", "flat", "mix"] = Field(
        "tree", description="tree (TreeGRPO), flat (DanceGRPO-style: k^w SDE trajectories from one noise), mix "
        "(MixGRPO-style: k^w trajectories, SDE only in the window).")
    branch_factor: Annotated[int, Field(ge=1, le=64)] | list[Annotated[int, Field(ge=1, le=512)]] = Field(
        3, description="k, children per node at each window step; or one count per window step, e.g. [9, 3, 1] "
        "(a wide first split; leaves = their product, window_width = the list's length).")
    window_width: int = Field(3, ge=1, description="w, SDE steps per rollout (leaves = k^w); with a branch_factor "
                              "list, its length (set it only to the same value).")
    window_ratio: float = Field(0.5, gt=0, le=1, description="r of Eq. 7 (geometric window policy).")
    window_policy: Literal["geometric", "fixed", "shifting"] = Field(
        "geometric", description="geometric (Eq. 7, drawn every epoch), fixed (`window_start`), shifting "
        "(starts at `window_start`, advances `shift_step` every `shift_every` epochs, wraps).")
    window_start: int = Field(0, ge=0, description="Start for the fixed and shifting policies.")
    shift_step: int = Field(1, ge=1, description="Steps the shifting window advances.")
    shift_every: int = Field(1, ge=1, description="Epochs between advances of the shifting window.")
    num_trees: int = Field(1, ge=1, description="Trees per prompt (leaves of all a prompt's trees form its group).")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="flat only: each trajectory trains "
                                     "int(fraction·(T−1)) random steps, never the last (DanceGRPO: 0.6; 1 trains "
                                     "steps 0…T−2 as Flow-GRPO does).")


class RewardRecipe(BaseModel):
    """One [[reward]] table. Besides the fields below, any option the kind accepts may be given (e.g.
    `clip_pretrained` for aesthetic); unknown options are rejected with the list of allowed ones."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    kind: str = Field(..., description="Reward kind: pickscore, hpsv2, imagereward, aesthetic, clipscore, jpeg, "
                      "digits, diversity (within-prompt variety, against collapse), geneval (GenEval's judgement on "
                      "a GenEval .jsonl), ocr (text rendering, Tesseract), "
                      "python, http (a reward server), vlm (an OpenAI-compatible VLM judge).")
    weight: float = Field(1.0, description="Weight in the aggregation.")
    name: str | None = Field(None, description="Name in metrics (default: the kind).")
    function: str | None = Field(None, description="python kind: `module:function` taking (images, prompts).")
    pretrained: str | None = Field(None, description="Override of the reward model (hub id or local path).")
    processor: str | None = Field(None, description="Override of the image/text processor (hub id or path).")
    scale: str | float | None = Field(None, description="Score scale: pickscore raw|flow_grpo|mixgrpo; clipscore "
                                      "a float multiplier.")
    clamp: bool | None = Field(None, description="clipscore: clamp the score at 0.")
    version: str | None = Field(None, description="hpsv2: v2.1 (default) or v2.0.")
    quality: int | None = Field(None, description="jpeg: JPEG quality used to measure compressibility.")
    batch_size: int | None = Field(None, gt=0, description="Images per reward-model forward.")
    frame_reduction: Literal["mean", "min", "max", "whole"] = Field(
        "mean", description="Video models (Wan): how a video gets one score. mean/min/max: every frame is scored as "
        "an image with the video's prompt and the frame scores are reduced; whole (python rewards only): the "
        "function receives each video as a list of PIL frames. Ignored for image models.")

    def options(self) -> dict:
        """The kind-specific options that are set (passed to `treegrpo.rewards.build_reward`)."""
        skip = {"kind", "weight", "name", "frame_reduction"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}

    @model_validator(mode="after")
    def _known_kind_and_options(self) -> RewardRecipe:
        from treegrpo.recipe.reward_kinds import REQUIRED_OPTIONS, reward_option_names

        allowed = reward_option_names(self.kind)  # raises ValueError listing the known kinds
        unknown = sorted(set(self.options()) - set(allowed))
        if unknown:
            raise ValueError(f"reward kind {self.kind!r} does not take {unknown}; it takes {sorted(allowed)}.")
        missing = [name for name in REQUIRED_OPTIONS.get(self.kind, ()) if name not in self.options()]
        if missing:
            raise ValueError(f"reward kind {self.kind!r} needs {', '.join(missing)} (e.g. "
                             + {"python": 'function = "my_rewards:score"', "http":
                                'url = "http://127.0.0.1:8000/score"', "vlm":
                                'base_url = "http://127.0.0.1:8000/v1", model = "Qwen/Qwen2.5-VL-7B-Instruct"'}
                             [self.kind] + ").")
        if self.frame_reduction == "whole" and self.kind != "python":
            raise ValueError(f"frame_reduction = 'whole' (videos as lists of frames) needs a python reward; the "
                             f"{self.kind!r} reward scores images: use 'mean', 'min' or 'max'.")
        return self


class AdvantageRecipe(_Table):
    aggregation: Literal["advantage", "reward"] = Field(
        "advantage", description="Several rewards: normalize each then weight (advantage) or weight raw rewards "
        "then normalize (reward).")
    eps: float = Field(1e-4, gt=0, description="Added to the per-prompt reward std (Eq. 9).")
    clip: float = Field(5.0, gt=0, description="Advantages are clipped to [-clip, clip].")
    weighting: Literal["prob", "mean"] = Field("prob", description="Backup weights: softmax of stored log-probs "
                                               "(Eq. 11) or a plain mean.")
    depth_normalize: bool = Field(False, description="BranchGRPO variant: normalize edge advantages per depth.")


class DataRecipe(_Table):
    prompts: str = Field(..., description="Prompt file (relative to the recipe's folder): one prompt a line, or a "
                         ".jsonl file of objects with a `prompt` and any metadata fields, which python, http and vlm "
                         "rewards receive.")
    prompts_per_epoch: int = Field(16, gt=0, description="Prompts per epoch across all processes.")
    eval_prompts: str | None = Field(None, description="Prompts for sample grids (default: the first training "
                                     "prompts).")
    cache_embeddings: bool = Field(True, description="Encode each training prompt once per run and keep its "
                                   "embeddings in CPU memory (SD3 at 256 tokens: ~2 MB a prompt in bf16); false "
                                   "re-encodes every epoch (for prompt files too large to hold).")


class TrainRecipe(_Table):
    epochs: int = Field(250, gt=0, description="Training epochs (one rollout + update round each).")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of everything: prompt order, window starts, noise, "
                      "LoRA init (0 … 2^63 - 1).")

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"each AdamW beta must be in [0, 1), got {list(betas)} (the default is [0.9, 0.999]).")
        return betas
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip ε (Eq. 12).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    micro_batch_size: int = Field(8, gt=0, description="Parent nodes per training forward/backward.")
    updates_per_epoch: int = Field(1, gt=0, description="Optimizer steps per epoch; the epoch's parents are split "
                                   "evenly and each share accumulates over its micro-batches.")
    kl_beta: float = Field(0.0, ge=0, description="Weight of the KL to the LoRA-disabled reference (0 = off; needs "
                         "[model.lora]).")
    kl_scale: Literal["exact", "flow_grpo"] = Field(
        "exact", description="exact: the Gaussian KL of each transition, mean over elements of (μθ−μref)²/(2·std²) "
        "with std the step's noise std s·√|dt|. flow_grpo: Flow-GRPO's (μθ−μref)²/(2·s²), i.e. exact × |dt|, ~10× "
        "smaller at 10 steps: use it to carry over a Flow-GRPO β (0.01–0.04) unchanged (flow-matching models).")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trainable weights, used for samples "
                                    "and the final export (absent = off).")
    cpu_threads: int | None = Field(None, ge=1, le=1024, description="CPU runs: intra-op threads per process. "
                                    "Default: the cores free when the run starts (see docs/training.md), unless "
                                    "OMP_NUM_THREADS is set. GPU runs ignore it.")
    max_ratio_error: float = Field(1e-3, gt=0, description="Warn if the first micro-batch's ratio differs from 1 by "
                                   "more than this.")


class EvaluationRecipe(_Table):
    """How the policy is judged during training with the [[eval_reward]] tables (the [[reward]] tables when there are
    none): on `data.eval_prompts`, sampled as users sample (the stock pipeline's own ODE scheduler, the exported
    weights), not on the training rollouts."""

    enabled: bool = Field(True, description="Judge the policy during training and keep the best-judged weights as "
                          "best/. With no [[eval_reward]] table the training rewards judge (on ODE samples).")
    every: int | None = Field(None, gt=0, description="Epochs between evaluations (default: output.eval_every); the "
                              "untrained model and the last epoch are always evaluated.")
    images_per_prompt: int = Field(4, gt=0, description="Images per evaluation prompt (paired noise across "
                                   "evaluations).")
    best_by: str | None = Field(None, description="The evaluation reward whose mean picks `best/` (default: the "
                                "first [[eval_reward]], else the first [[reward]]).")
    collapse: Literal["warn", "stop", "off"] = Field(
        "warn", description="When, over the last `collapse_patience` evaluations, the training reward rose while the "
        "evaluation reward or the evaluation images' within-prompt diversity fell: warn, or stop the run "
        "(checkpoint, then the final export as at the end).")
    collapse_patience: int = Field(3, ge=1, description="Evaluations the collapse check looks back over.")
    collapse_tolerance: float = Field(0.05, ge=0, lt=1, description="How far the evaluation reward or the "
                                      "diversity must fall over those evaluations to count (0.05 = 5 %; one "
                                      "evaluation of 80 images varies by a few %).")


class OutputRecipe(_Table):
    dir: str = Field(..., min_length=1, description="Run folder: metrics.jsonl, checkpoints/, samples/, final/, "
                     "recipe.resolved.toml (relative to the working directory).")
    checkpoint_every: int = Field(10, gt=0, description="Epochs between checkpoints.")
    keep_checkpoints: int = Field(3, gt=0, description="Newest checkpoints kept.")
    eval_every: int = Field(10, gt=0, description="Epochs between sample grids.")
    samples: bool = Field(True, description="Write sample grids (before, every eval_every epochs, final).")
    log_with: Literal["tensorboard", "wandb", "trackio", "aim", "comet_ml", "mlflow", "dvclive", "swanlab",
                      "none"] = Field("tensorboard", description="Experiment tracker (through accelerate) besides "
                                      "metrics.jsonl: gets every epoch's metrics, the recipe as hyperparameters and "
                                      "(TensorBoard, W&B) the sample grids. Not installed: one warning, then none. "
                                      "TensorBoard: `pip install -e .[tensorboard]`; logs in <output.dir>/logs.")
    tracker_project: str = Field("treegrpo", min_length=1, description="Project name in the tracker.")
    run_name: str | None = Field(None, description="Run name in the tracker (default: the output folder's name).")
    push_to_hub: str | None = Field(None, description="`user/repo` to push the final LoRA to at the end.")


class Recipe(_Table):
    model: ModelRecipe
    sampling: SamplingRecipe = SamplingRecipe()
    tree: TreeRecipe = TreeRecipe()
    reward: list[RewardRecipe] = Field(..., min_length=1, description="One or more [[reward]] tables.")
    eval_reward: list[RewardRecipe] = Field([], description="[[eval_reward]] tables: rewards that judge the policy "
                                            "during training and pick `best/` (none: no evaluation).")
    evaluation: EvaluationRecipe = EvaluationRecipe()
    advantage: AdvantageRecipe = AdvantageRecipe()
    data: DataRecipe
    train: TrainRecipe = TrainRecipe()
    output: OutputRecipe

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Recipe:
        t, s = self.tree, self.sampling
        steps = s.num_inference_steps
        if t.algorithm != "flat" and t.window_width >= steps:
            raise ValueError(
                f"tree.window_width={t.window_width} must be smaller than sampling.num_inference_steps={steps}: "
                "the window never covers the last step (Eq. 7). Lower window_width or raise num_inference_steps.")
        if t.algorithm != "flat" and t.window_policy != "geometric" and t.window_start > steps - t.window_width - 1:
            raise ValueError(
                f"tree.window_start={t.window_start} does not fit: with num_inference_steps={steps} and "
                f"window_width={t.window_width} the start must be 0 … {steps - t.window_width - 1}.")
        if t.algorithm == "tree" and isinstance(t.branch_factor, int) and t.branch_factor < 2:
            raise ValueError(f"tree.branch_factor={t.branch_factor}: a tree needs at least 2 children per node "
                             "to compare siblings. Use branch_factor >= 2.")
        if t.algorithm == "tree" and t.window_factors[0] < 2:
            raise ValueError(f"tree.branch_factor={t.branch_factor}: the first window step needs at least 2 children "
                             "per node, or nothing is compared where the window starts; e.g. [9, 3, 1].")
        if t.leaves_per_tree > MAX_LEAVES_PER_TREE:
            raise ValueError(
                f"tree.branch_factor={t.branch_factor} and tree.window_width={t.window_width} make "
                f"{t.leaves_per_tree} leaves per tree; at most {MAX_LEAVES_PER_TREE} fit in memory. "
                "The paper uses k=3, w=3 (27 leaves); lower branch_factor or window_width.")
        if t.leaves_per_tree * t.num_trees < 2:
            raise ValueError("Each prompt needs at least 2 leaves for a group-relative advantage; raise "
                             "tree.branch_factor, tree.window_width or tree.num_trees.")
        if self.train.kl_beta > 0 and self.model.lora is None:
            raise ValueError(
                f"train.kl_beta={self.train.kl_beta} needs a reference policy: the KL is taken to the model with its "
                "LoRA disabled, and full fine-tuning (no [model.lora] table) has no LoRA to disable. Add a "
                "[model.lora] table, or set train.kl_beta = 0.")
        for table, rewards in (("reward", self.reward), ("eval_reward", self.eval_reward)):
            names = [r.name or r.kind for r in rewards]
            if len(set(names)) != len(names):
                raise ValueError(f"[[{table}]] names must be unique, got {names}; set `name` on repeated kinds.")
        judges = [r.name or r.kind for r in (self.eval_reward or self.reward)]
        if self.evaluation.best_by is not None and self.evaluation.best_by not in judges:
            source = "[[eval_reward]]" if self.eval_reward else "the [[reward]] tables, as there is no [[eval_reward]]"
            raise ValueError(f"evaluation.best_by = {self.evaluation.best_by!r} names no evaluation reward; the "
                             f"evaluation rewards are {judges} ({source}).")
        return self
