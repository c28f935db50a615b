"""Loading the pipeline, adding LoRA, and exporting LoRAs in the diffusers format stock pipelines load."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusers_tree.adapters import adapter_for

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Only these keys go into the LoRA metadata: extra keys from a newer peft break loading with an older one.
LORA_METADATA_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias")


class ModelLoadError(ValueError):
    """The model named in the recipe cannot be loaded; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    """A pipeline ready for tree rollouts, with what the run needs to know about it."""

    pipe: object
    denoiser_name: str  # "transformer" or "unet"
    defaults: dict  # sampling defaults stored with the model (builtin models), e.g. max_sequence_length


def load_pipeline(pretrained: str, *, dtype: str = "fp32", revision: str | None = None,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """Load `pretrained` (hub id, local diffusers folder, or `builtin:<name>`) in `dtype` onto `device`."""
    torch_dtype = DTYPES[dtype]
    defaults: dict = {}
    if pretrained.startswith("builtin:"):
        from treegrpo.builtin import digits_metadata, resolve_pretrained

        try:
            folder = resolve_pretrained(pretrained)
        except (ValueError, FileNotFoundError) as err:
            raise ModelLoadError(f"model.pretrained = {pretrained!r}: {err}") from None
        pipe = _from_pretrained(folder, torch_dtype, None)
        if pretrained == "builtin:digits":
            defaults = dict(digits_metadata().get("pipeline_kwargs", {}))
    else:
        pipe = _from_pretrained(pretrained, torch_dtype, revision)
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


def _from_pretrained(pretrained: str, torch_dtype, revision):
    from diffusers import DiffusionPipeline

    path = Path(pretrained).expanduser()
    looks_local = path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1
    if looks_local and not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"model.pretrained = {pretrained!r} is neither a diffusers folder (no model_index.json there) nor a hub "
            "id like 'org/name'. Point it at a folder saved with save_pretrained, a hub id, or 'builtin:digits'.")
    try:
        return DiffusionPipeline.from_pretrained(str(path) if looks_local else pretrained, dtype=torch_dtype,
                                                 revision=revision)
    except OSError as err:
        raise ModelLoadError(f"Could not load model.pretrained = {pretrained!r}: {err}") from None


def add_lora(denoiser: torch.nn.Module, *, rank: int, alpha: float, target_modules: list[str] | None, seed: int,
             denoiser_name: str) -> list[str]:
    """Add a LoRA adapter (peft) to the denoiser, freeze everything else, keep LoRA weights in fp32.
    Returns the target module names used."""
    from peft import LoraConfig

    targets = target_modules or (UNET_TARGETS if denoiser_name == "unet" else TRANSFORMER_TARGETS)
    present = {name.split(".")[-1] for name, _ in denoiser.named_modules()} | {
        ".".join(name.split(".")[-2:]) for name, _ in denoiser.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ModelLoadError(f"model.lora.target_modules: {missing} not found in the {denoiser_name}; "
                             f"choose module names it has (default: {targets}).")
    denoiser.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # identical initialisation on every process
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                        init_lora_weights="gaussian"))
    for name, param in denoiser.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()
    return targets


def trainable_parameters(denoiser: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in denoiser.parameters() if p.requires_grad]


def lora_state_dict(denoiser: torch.nn.Module, full_state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's naming; pass `full_state_dict` (gathered by accelerate) for sharded models."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, state_dict=full_state_dict)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def lora_metadata(denoiser: torch.nn.Module) -> dict:
    config = denoiser.peft_config["default"].to_dict()
    metadata = {k: config[k] for k in LORA_METADATA_KEYS if k in config}
    if isinstance(metadata.get("target_modules"), set):
        metadata["target_modules"] = sorted(metadata["target_modules"])
    return metadata


def save_lora(pipe, denoiser: torch.nn.Module, denoiser_name: str, directory: str | Path,
              full_state_dict: dict | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the diffusers format (`<Pipeline>.save_lora_weights`, with the
    LoRA metadata so that alpha ≠ rank loads correctly). Returns the file path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = lora_state_dict(denoiser, full_state_dict)
    metadata = lora_metadata(denoiser)
    type(pipe).save_lora_weights(str(directory), **{f"{denoiser_name}_lora_layers": layers,
                                                   f"{denoiser_name}_lora_adapter_metadata": metadata})
    return directory / "pytorch_lora_weights.safetensors"
