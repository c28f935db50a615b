"""Loading the pipeline, adding LoRA, and exporting LoRAs in the diffusers format stock pipelines load."""

from __future__ import annotations

import inspect
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusers_tree.adapters import adapter_for, stock_call_kwargs
from treegrpo.dtypes import DTYPE_NAMES, torch_dtype
from treegrpo.errors import UsageError

logger = logging.getLogger(__name__)

DTYPES = {name: torch_dtype(name) for name in DTYPE_NAMES}
# Only these keys go into the LoRA metadata: extra keys from a newer peft break loading with an older one.
LORA_METADATA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and loaders look for


class ModelLoadError(UsageError):
    """The model named in the recipe cannot be loaded; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    """A pipeline ready for tree rollouts, with what the run needs to know about it."""

    pipe: object
    denoiser_name: str  # "transformer" or "unet"
    defaults: dict  # sampling defaults stored with the model (builtin models), e.g. max_sequence_length


def is_text_encoder(component_name: str) -> bool:
    """Whether a pipeline component is a text encoder (`text_encoder`, `text_encoder_2`, ...: diffusers' names)."""
    return component_name.startswith("text_encoder")


def load_pipeline(pretrained: str, *, dtype: str = "fp32", revision: str | None = None,
                  device: str | torch.device = "cpu", text_encoders_on_cpu: bool = False,
                  key: str = "model.pretrained") -> LoadedModel:
    """Load `pretrained` (hub id, local diffusers folder, or `builtin:<name>`) in `dtype` onto `device`.
    `text_encoders_on_cpu` (`model.offload_text_encoders`): the text encoders stay in CPU memory and never visit
    `device` at load, so the load-time peak is the rest of the pipeline (FLUX.2 dev: 64 GB of Mistral that would
    not fit beside its 48 GB transformer on an 80 GB card). `key` names the setting in messages."""
    torch_dtype = DTYPES[dtype]
    defaults: dict = {}
    if pretrained.startswith("builtin:"):
        from treegrpo.builtin import builtin_metadata, resolve_pretrained

        try:
            folder = resolve_pretrained(pretrained)
        except (ValueError, FileNotFoundError) as err:
            raise ModelLoadError(f"{key} = {pretrained!r}: {err}") from None
        pipe = _from_pretrained(folder, torch_dtype, None, key)
        defaults = dict(builtin_metadata(pretrained).get("pipeline_kwargs", {}))
    else:
        pipe = _from_pretrained(pretrained, torch_dtype, revision, key)
    if text_encoders_on_cpu:  # from_pretrained loaded everything to the CPU; move the rest only
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and not is_text_encoder(name):
                component.to(device)
    else:
        pipe.to(device)
    try:
        adapter_for(pipe)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    name = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", name):
        module = getattr(pipe, component, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return LoadedModel(pipe=pipe, denoiser_name=name, defaults=dict(defaults))


def _from_pretrained(pretrained: str, torch_dtype, revision, key: str = "model.pretrained"):
    from diffusers import DiffusionPipeline

    from treegrpo.recipe.preflight import PreflightError, check_pretrained, looks_local

    try:
        check_pretrained(pretrained, key)  # the same judgement `treegrpo check` makes, for callers that skip it
    except PreflightError as err:
        raise ModelLoadError(str(err)) from None
    local = looks_local(pretrained)
    try:
        source = str(Path(pretrained).expanduser()) if local else pretrained
        return DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, revision=revision)
    except OSError as err:
        if local:
            raise ModelLoadError(f"{key} = {pretrained!r}: could not load the folder: {err}") from None
        raise ModelLoadError(f"{key} = {pretrained!r}: {hub_load_problem(pretrained, revision, err)}") from None


def hub_load_problem(repo_id: str, revision: str | None, err: Exception) -> str:
    """Why a Hub model did not load, in words a user can act on. diffusers says only "not fully cached locally …
    check out the root cause in the stacktrace above" (and prints no stack trace) for a typo, a gated licence not
    accepted and an offline machine alike; ask the Hub which it is."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from treegrpo.recipe.preflight import offline_not_cached

    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        return offline_not_cached(repo_id)
    try:
        model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        return (f"a gated model: accept its licence at {constants.ENDPOINT}/{repo_id} with your Hub account, then "
                "log in here with `hf auth login` (or set HF_TOKEN).")
    except RepositoryNotFoundError:
        return ("no such model on the Hub. Check the spelling (org/name); a private model needs `hf auth login` "
                "with an account that can see it. A local folder must hold a model_index.json.")
    except RevisionNotFoundError:
        return f"the model has no revision {revision!r} (model.revision); use a branch, tag or commit it has."
    except Exception as probe:  # noqa: BLE001  (network errors of every kind: the Hub cannot be reached)
        return (f"the Hub cannot be reached ({type(probe).__name__}: {probe}) and the model is not in the local "
                f"cache ({cache}). Check the network or proxy (HF_ENDPOINT), or download it where there is network "
                f"(`hf download {repo_id}`).")
    text = str(err).replace(" Please check out the root cause in the stacktrace above.", "")
    return f"the Hub has it, but loading failed: {text}"


def stock_call(pipe, kwargs: dict) -> dict:
    """Keyword arguments for a call of the stock pipeline that samples as the tree does (the family's
    `stock_call_kwargs`: Qwen-Image's `true_cfg_scale`, SANA without resolution binning, ...), keeping only the set
    values that this pipeline's `__call__` takes (`max_sequence_length` is not one of SD1.5's)."""
    accepted = inspect.signature(pipe.__call__).parameters
    return {k: v for k, v in stock_call_kwargs(pipe, kwargs).items() if v is not None and k in accepted}


def default_lora_targets(pipe) -> list[str]:
    """The family's LoRA targets (its adapter's `lora_target_modules`)."""
    return list(adapter_for(pipe).lora_target_modules)


def add_lora(denoiser: torch.nn.Module, *, rank: int, alpha: float, target_modules: list[str] | None, seed: int,
             denoiser_name: str, default_targets: list[str]) -> list[str]:
    """Add a LoRA adapter (peft) to the denoiser, freeze everything else, keep LoRA weights in fp32.
    `default_targets` (the family's, `default_lora_targets`) apply when `target_modules` is None. Returns the
    targets used."""
    from peft import LoraConfig

    default = list(default_targets)
    targets = target_modules or default
    names = [name for name, _ in denoiser.named_modules()]
    # peft matches a target against the end of a module's dotted name
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ModelLoadError(f"model.lora.target_modules: {missing} not found in the {denoiser_name}; "
                             f"choose module names it has (the default for this family is {default}).")
    denoiser.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical initialisation on every process
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                        init_lora_weights="gaussian"))
    from diffusers.training_utils import cast_training_params

    for name, param in denoiser.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
    cast_training_params(denoiser, dtype=torch.float32)  # trainable weights in fp32 whatever model.dtype is
    return targets


def trainable_parameters(denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def lora_state_dict(denoiser: torch.nn.Module, full_state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's naming, made loader-proof: every module's scaling (alpha / r, its rank and alpha
    patterns, rsLoRA's alpha / sqrt(r)) is multiplied into `lora_B`, and modules of smaller rank are padded with zero
    rows of `lora_A` / columns of `lora_B` up to the largest rank. The file then means the same under r = alpha =
    that rank (scaling 1), which is what diffusers assumes when the metadata is missing or unsupported
    (diffusers < 0.34). Pass `full_state_dict` (gathered by accelerate) for sharded models."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, state_dict=full_state_dict)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    parts = {k: _LORA_KEY.match(k) for k in state}
    ranks = {m["module"]: state[k].shape[0] for k, m in parts.items() if m and m["kind"].endswith("A")}
    if not ranks:
        return state
    rank = max(ranks.values())
    scalings = _lora_scalings(denoiser)
    for key, match in parts.items():
        if match is None:  # e.g. DoRA's lora_magnitude_vector: unchanged
            continue
        module, kind = match["module"], match["kind"]
        pad = rank - ranks[module]
        if kind.endswith("A") and pad:
            state[key] = torch.cat([state[key], state[key].new_zeros(pad, *state[key].shape[1:])], dim=0)
        elif kind.endswith("B"):
            value = state[key] * _module_scaling(denoiser, scalings, module)
            if pad and match["param"] != "bias":
                value = torch.cat([value, value.new_zeros(value.shape[0], pad, *value.shape[2:])], dim=1)
            state[key] = value.contiguous()
    return state


# `<module>.lora_A.weight`, `<module>.lora_B.bias`, `<module>.lora_embedding_B`, ... (adapter name already removed)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?P<param>weight|bias))?$")
_WRAPPER_PREFIXES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def _lora_scalings(denoiser: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """Module name → the scaling peft multiplies its LoRA output by (what the forward really uses)."""
    from peft.tuners.lora import LoraLayer

    layers = [(name, module) for name, module in denoiser.named_modules() if isinstance(module, LoraLayer)]
    return {_WRAPPER_PREFIXES.sub("", name): float(module.scaling[adapter])
            for name, module in layers if adapter in module.scaling}


def _module_scaling(denoiser: torch.nn.Module, scalings: dict[str, float], module: str) -> float:
    if module in scalings:
        return scalings[module]
    config = denoiser.peft_config["default"]  # not found (unusual wrapping): the config's uniform scaling
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"LoRA export: no LoRA layer named {module!r} in the model, and rank/alpha patterns make "
                         "its scaling ambiguous; export from the unwrapped model.")
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def lora_metadata(denoiser: torch.nn.Module, layers: dict[str, torch.Tensor]) -> dict:
    """The LoRA metadata for `layers` from `lora_state_dict` (scaling baked in): r = lora_alpha = the stored rank,
    no patterns, and only the keys in `LORA_METADATA_KEYS` (so an older peft can build the `LoraConfig`)."""
    config = denoiser.peft_config["default"]
    rank = max((v.shape[0] for k, v in layers.items() if (m := _LORA_KEY.match(k)) and m["kind"].endswith("A")),
               default=config.r)
    targets = config.target_modules
    metadata = {"r": int(rank), "lora_alpha": int(rank),
                "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
                "rank_pattern": {}, "alpha_pattern": {}, "use_dora": bool(config.use_dora),
                "lora_bias": bool(getattr(config, "lora_bias", False))}
    return metadata


def save_lora(pipe, denoiser: torch.nn.Module, denoiser_name: str, directory: str | Path,
              full_state_dict: dict | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the diffusers format (`<Pipeline>.save_lora_weights` with
    `<denoiser>_lora_layers` and `<denoiser>_lora_adapter_metadata`): the scaling is baked into `lora_B` and the
    metadata says r = lora_alpha, so every diffusers version and `load_lora_weights` path gives the trained outputs.
    Returns the file path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = lora_state_dict(denoiser, full_state_dict)
    metadata = lora_metadata(denoiser, layers)
    type(pipe).save_lora_weights(str(directory), **{f"{denoiser_name}_lora_layers": layers,
                                                   f"{denoiser_name}_lora_adapter_metadata": metadata})
    return directory / LORA_WEIGHT_NAME
