"""Setting a run up once: the accelerator, rewards, the pipeline with its LoRA and tree scheduler, the optimizer
prepared by accelerate, the prompt-embedding cache. `Run` holds what every epoch needs (`trainer.run_epoch`)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, WindowPolicy
from diffusers_tree.adapters import makes_videos
from treegrpo.errors import UsageError
from treegrpo.model.loading import (
    DTYPES,
    add_lora,
    default_lora_targets,
    is_text_encoder,
    load_pipeline,
    trainable_parameters,
)
from treegrpo.recipe.schema import Recipe, TrainRecipe
from treegrpo.run.ema import EMA
from treegrpo.run.prompt_cache import PromptEmbeddingCache
from treegrpo.run.reporting import Reporter
from treegrpo.run.seeds import lora_init_seed
from treegrpo.run.signals import StopSignals
from treegrpo.sources import load_source_images


class SetupError(UsageError):
    """The run cannot start: bad prompts file, reward, process count, missing checkpoint. Exit code 2."""


@dataclass(frozen=True)
class SamplingSettings:
    """How every prompt of the run is encoded and sampled (rollouts and sample grids), resolved once from the recipe's
    `[sampling]` and the model's stored defaults."""

    guidance_scale: float
    height: int | None
    width: int | None
    negative_prompt: str | None
    max_sequence_length: int | None
    num_frames: int | None
    auto_resize: bool = True  # editing models: resize sources to the family's preferred resolution (stock default)

    def as_kwargs(self) -> dict:
        """The settings as keyword arguments of an encode or a stock pipeline call."""
        return asdict(self)


@dataclass
class Run:
    """Everything an epoch needs, built once by `setup`."""

    recipe: Recipe
    accelerator: object
    pipe: object
    denoiser_name: str
    rollout: TreeRolloutPipeline
    model: torch.nn.Module  # the (possibly DDP-wrapped) denoiser
    optimizer: torch.optim.Optimizer
    params: list
    rewards: list
    prompts: list[str]
    window: WindowPolicy
    sampling: SamplingSettings
    out_dir: Path
    reporter: Reporter
    ema: EMA | None = None
    signals: StopSignals | None = None
    prompt_cache: PromptEmbeddingCache | None = None
    prompt_metadata: list[dict] | None = None  # per prompt, from a .jsonl prompt file (empty dicts otherwise)
    eval_rewards: list = field(default_factory=list)  # the [[eval_reward]] rewards (train/evaluation.py)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def encode(self, prompts: list[str], sources: list[str] | None = None):
        """The prompts' conditioning (with their source images' for editing models: `sources` are the paths of
        the `.jsonl` lines' `image` fields): from the per-run cache (`data.cache_embeddings`) or encoded now."""
        if self.prompt_cache is not None:
            return self.prompt_cache(prompts, sources)
        with self.text_encoders_ready():
            return self.encode_with_encoders_ready(prompts, sources)

    def encode_with_encoders_ready(self, prompts: list[str], sources: list[str] | None = None):
        """Encode with the run's settings; the caller has the text encoders where they run (`text_encoders_ready`)."""
        image = None if sources is None else load_source_images(sources)
        return self.rollout.encode(prompts, image=image, **self.sampling.as_kwargs())

    def text_encoders_ready(self):
        """With `model.offload_text_encoders`, the text encoders on the accelerator inside this block and back in CPU
        memory after it (anything that encodes prompts, the stock pipeline's sample grids included, runs inside)."""
        encoders = text_encoders(self.pipe) if self.recipe.model.offload_text_encoders else []
        return on_accelerator_inside(lambda: encoders, self.accelerator.device)

    def rewards_ready(self):
        """With `model.offload_rewards`, the reward models on the accelerator inside this block (scoring) and back in
        CPU memory after it. A reward that loads lazily loads inside the block, on its own device (the accelerator),
        and leaves it on the way out like the others."""
        rewards = [*self.rewards, *self.eval_rewards] if self.recipe.model.offload_rewards else []
        return on_accelerator_inside(lambda: [m for reward in rewards for m in reward.modules()],
                                     self.accelerator.device)


@contextmanager
def on_accelerator_inside(modules, device):
    """`modules()` on `device` inside the block and in CPU memory after it; `modules` is called again on the way out,
    so modules made inside the block (a lazy reward's first load) leave too. A plain `.to()`, not accelerate's
    `cpu_offload_with_hook`: that hook moves a module when its `forward` runs, and rewards call other methods
    (`get_image_features`), and text encoders are called through the pipeline's own code, which reads their device
    first; one move per block is also what costs least (no move per forward)."""
    for module in modules():
        module.to(device)
    try:
        yield
    finally:
        for module in modules():
            module.to("cpu")


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders (`text_encoder`, `text_encoder_2`, ...; the components diffusers names so)."""
    return [module for name, module in pipe.components.items()
            if is_text_encoder(name) and isinstance(module, torch.nn.Module)]


def make_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.model.dtype]
    out_dir = Path(recipe.output.dir)
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs"))
    log_with = None if recipe.output.log_with == "none" else recipe.output.log_with
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision, log_with=log_with,
                       project_config=project)


def setup(recipe: Recipe, reporter: Reporter, recorded_threads: int | None = None) -> Run:
    """Everything a run needs, loaded once, in the order a failure is cheapest to report: the accelerator and its
    threads, what needs no model (Hub login, prompts), the rewards, the model with its LoRA, the tree scheduler and
    rollout, the optimizer. `recorded_threads`: the CPU thread count a resumed run started with."""
    accelerator = make_accelerator(recipe)
    if accelerator.device.type == "cpu":
        _setup_cpu_threads(accelerator, recipe.train.cpu_threads, recorded_threads, reporter)
    prompts, prompt_metadata = _setup_data(recipe, accelerator.num_processes)
    rewards = _setup_rewards(recipe, accelerator.device, reporter)
    # evaluation judges with the [[eval_reward]] tables, else with the training rewards themselves (no second load)
    eval_rewards = [] if not recipe.evaluation.enabled else \
        _setup_rewards(recipe, accelerator.device, reporter, "eval_reward") if recipe.eval_reward else rewards
    from treegrpo.rewards.registry import share_models

    share_models([*rewards, *(eval_rewards if eval_rewards is not rewards else [])])  # one detector, not three
    loaded = _setup_model(recipe, accelerator.device, reporter)
    pipe, name = loaded.pipe, loaded.denoiser_name
    denoiser = getattr(pipe, name)
    rollout = _setup_rollout(recipe, pipe)
    dropped = align_fsdp_wrap_classes(getattr(accelerator.state, "fsdp_plugin", None), denoiser)
    if dropped:
        reporter.info(f"FSDP: {type(denoiser).__name__} has no {', '.join(dropped)}; wrapping the blocks it has")
    model, optimizer, params, ema = prepare_training(accelerator, denoiser, recipe.train)
    rollout.adapter.model = model
    s, t = recipe.sampling, recipe.tree
    window = WindowPolicy(s.num_inference_steps, t.window_width, kind=t.window_policy, ratio=t.window_ratio,
                          start=t.window_start, shift_step=t.shift_step, shift_every=t.shift_every) \
        if t.algorithm != "flat" else None
    sampling = SamplingSettings(
        guidance_scale=s.guidance_scale if s.guidance_scale is not None
        else loaded.defaults.get("guidance_scale", rollout.adapter.default_guidance_scale),
        height=s.height, width=s.width, negative_prompt=s.negative_prompt,
        max_sequence_length=s.max_sequence_length or loaded.defaults.get("max_sequence_length"),
        num_frames=s.num_frames,
        auto_resize=s.auto_resize if s.auto_resize is not None else loaded.defaults.get("_auto_resize", True))
    _check_sources(recipe, prompt_metadata, type(pipe).__name__)
    run = Run(recipe=recipe, accelerator=accelerator, pipe=pipe, denoiser_name=name, rollout=rollout, model=model,
              optimizer=optimizer, params=params, rewards=rewards, prompts=prompts, window=window,
              sampling=sampling, out_dir=Path(recipe.output.dir), reporter=reporter, ema=ema,
              prompt_metadata=prompt_metadata, eval_rewards=eval_rewards)
    if recipe.data.cache_embeddings:
        run.prompt_cache = PromptEmbeddingCache(run.encode_with_encoders_ready, accelerator.device,
                                                encoders_ready=run.text_encoders_ready)
    return run


def _check_sources(recipe: Recipe, metadata: list[dict], pipeline_class: str) -> None:
    """The prompt files' source images against the loaded model (`check` judges them only for models on disk)."""
    from treegrpo.sources import SourceImageError, check_sources_for

    files = [("data.prompts", recipe.data.prompts, metadata)]
    if recipe.data.eval_prompts:
        files.append(("data.eval_prompts", recipe.data.eval_prompts,
                      read_prompt_records(recipe.data.eval_prompts, "data.eval_prompts")[1]))
    try:
        for key, path, lines in files:
            check_sources_for(lines, pipeline_class, f"{key} = {path!r}")
    except SourceImageError as err:
        raise SetupError(str(err)) from None


def _setup_cpu_threads(accelerator, recipe_threads: int | None, recorded: int | None, reporter: Reporter) -> None:
    from treegrpo.run.threads import apply_cpu_threads

    choice = apply_cpu_threads(recipe_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), recorded=recorded)
    if accelerator.num_processes > 1:  # each process measured the load itself: all take the smallest count
        threads = torch.tensor([torch.get_num_threads()], device=accelerator.device)
        torch.set_num_threads(int(accelerator.gather(threads).min()))
    reporter.info(f"CPU: {torch.get_num_threads()} intra-op thread(s) per process ({choice.reason})")


def _setup_data(recipe: Recipe, world: int) -> tuple[list[str], list[dict]]:
    """The Hub login a final push needs (judged before training, not after it) and the prompts."""
    if recipe.output.push_to_hub:
        from treegrpo.hub.push import check_can_push
        from treegrpo.hub.summary import HubError

        try:
            check_can_push(recipe.output.push_to_hub)
        except HubError as err:
            raise SetupError(f"output.push_to_hub = {recipe.output.push_to_hub!r}: {err}") from None
    prompts, prompt_metadata = read_prompt_records(recipe.data.prompts)
    if recipe.data.prompts_per_epoch % world:
        raise SetupError(f"data.prompts_per_epoch={recipe.data.prompts_per_epoch} must be divisible by the "
                         f"{world} processes (a prompt's trees stay on one process).")
    return prompts, prompt_metadata


def _setup_rewards(recipe: Recipe, device, reporter: Reporter, table: str = "reward") -> list:
    """The rewards of the recipe's [[reward]] (or [[eval_reward]]) tables, named as the metrics name them."""
    from treegrpo.rewards import build_reward

    specs = recipe.reward if table == "reward" else recipe.eval_reward
    if specs:
        reporter.info(f"loading {table.replace('_', ' ')}s: {', '.join(spec.name or spec.kind for spec in specs)} ...")
    rewards = []
    for spec in specs:
        try:
            reward = build_reward(spec.kind, device=device, dtype=DTYPES[recipe.model.dtype], **spec.options())
        except (ValueError, TypeError) as err:
            raise SetupError(f"[[{table}]] kind={spec.kind!r}: {err}") from None
        reward.name = spec.name or spec.kind
        reward.frame_reduction = spec.frame_reduction  # how it scores video leaves (epoch_outputs.score_reward)
        rewards.append(reward)
    return rewards


def _setup_model(recipe: Recipe, device, reporter: Reporter):
    """The pipeline on `device` (text encoders in CPU memory when offloaded), its size rule checked, LoRA added
    with the family's default targets (or the whole denoiser trainable), gradient checkpointing."""
    reporter.info(f"loading {recipe.model.pretrained} ({recipe.model.dtype}) on {device} ...")
    loaded = load_pipeline(recipe.model.pretrained, dtype=recipe.model.dtype, revision=recipe.model.revision,
                           device=device, text_encoders_on_cpu=recipe.model.offload_text_encoders)
    pipe, name = loaded.pipe, loaded.denoiser_name
    denoiser = getattr(pipe, name)
    check_image_size(pipe, recipe.sampling.height, recipe.sampling.width)
    if recipe.model.lora is not None:
        lora = recipe.model.lora
        add_lora(denoiser, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                 seed=lora_init_seed(recipe.train.seed, lora.init_seed), denoiser_name=name,
                 default_targets=default_lora_targets(pipe))
    else:
        denoiser.requires_grad_(True)
        denoiser.float()
    if recipe.model.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return loaded


def _setup_rollout(recipe: Recipe, pipe) -> TreeRolloutPipeline:
    """The tree scheduler the recipe describes (its window start is replaced every epoch) and the rollout."""
    s, t = recipe.sampling, recipe.tree
    scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, sde_type=s.sde_type, eta=s.eta,
                                                branch_factor=t.branch_factor, window_width=t.window_width,
                                                window_start=0, window_ratio=t.window_ratio, algorithm=t.algorithm,
                                                tail_steps=s.tail_steps, tail_solver_order=s.tail_solver_order)
    if recipe.train.kl_beta > 0 and recipe.train.kl_scale == "flow_grpo" and scheduler.family != "flow":
        raise SetupError(f"train.kl_scale = 'flow_grpo' needs a flow-matching model; {recipe.model.pretrained} "
                         f"samples with a {scheduler.family} schedule. Use train.kl_scale = 'exact'.")
    rollout = TreeRolloutPipeline(pipe, scheduler)
    if s.num_frames is not None and not makes_videos(rollout.adapter):
        raise SetupError(f"sampling.num_frames = {s.num_frames}: {type(pipe).__name__} makes images, not videos; "
                         "remove sampling.num_frames.")
    rollout.set_progress_bar_config(disable=True)
    return rollout


def align_fsdp_wrap_classes(plugin, denoiser: torch.nn.Module) -> list[str]:
    """Keeps only the FSDP wrap classes (`fsdp_transformer_layer_cls_to_wrap`) that `denoiser` contains; returns the
    names dropped. accelerate raises "Could not find the transformer layer class" for any configured class the model
    lacks, so one accelerate config could not serve SD3, FLUX and UNet models (found on the first GPU run). With no
    class left, accelerate's own default applies: the model's `_no_split_modules` (what diffusers declares as its
    blocks), which is what our shipped fsdp.yaml relies on."""
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if not names:
        return []
    present = {type(module).__name__ for module in denoiser.modules()}
    kept = [name for name in names if name in present]
    plugin.transformer_cls_names_to_wrap = kept or None
    return [name for name in names if name not in present]


def prepare_training(accelerator, denoiser: torch.nn.Module, train: TrainRecipe
                     ) -> tuple[torch.nn.Module, torch.optim.Optimizer, list, EMA | None]:
    """AdamW over the trainable weights, `accelerator.prepare`, then the parameter list that gradient clipping and
    EMA act on, taken AFTER `prepare`: FSDP2's `fully_shard` replaces the module's parameters with sharded DTensors
    (accelerate re-points the optimizer at them). A list taken before would hold the unsharded originals, which get
    no gradient (clipping would see a zero norm) and never change (EMA would stand still).
    Returns `(model, optimizer, params, ema)`."""
    optimizer = torch.optim.AdamW(trainable_parameters(denoiser), lr=train.learning_rate, betas=train.adam_betas,
                                  weight_decay=train.weight_decay)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    params = trainable_parameters(model)
    ema = EMA(params, train.ema_decay) if train.ema_decay is not None else None  # checkpointed as safetensors
    return model, optimizer, params, ema


def check_image_size(pipe, height: int, width: int) -> None:
    """Height and width must be multiples of the family's `pixels_per_patch` (its adapter knows the rule)."""
    from diffusers_tree.adapters import adapter_for
    from treegrpo.recipe.preflight import size_problem

    problem = size_problem(type(pipe).__name__, adapter_for(pipe).pixels_per_patch, height, width)
    if problem:
        raise SetupError(problem)


def read_prompt_records(path: str, key: str = "data.prompts") -> tuple[list[str], list[dict]]:
    """Prompts and their metadata (`.jsonl` files; empty for text files), see `preflight.prompt_records`."""
    from treegrpo.recipe.preflight import PreflightError, prompt_records

    try:
        return prompt_records(path, key)
    except PreflightError as err:
        raise SetupError(str(err)) from None


def read_prompts(path: str, key: str = "data.prompts") -> list[str]:
    """A prompt file (see `preflight.prompts_from_file`); `key` names the recipe key in messages."""
    from treegrpo.recipe.preflight import PreflightError, prompts_from_file

    try:
        return prompts_from_file(path, key)
    except PreflightError as err:
        raise SetupError(str(err)) from None
