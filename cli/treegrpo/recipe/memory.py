"""A memory plan before loading (`treegrpo check --gpu-memory 80`): per process, what the recipe's model needs on the
accelerator while it rolls out and while it trains, from the weight files' headers and the denoiser's config, with no
torch import and no weights read.

The plan, in GiB (`MemoryPlan.rows`):
- weights: every component's stored tensors (parameters and persistent buffers) × the recipe's dtype (text
  encoders and reward models left out when the recipe offloads them), the LoRA's trainable fp32 weights with their
  gradients and two Adam moments (16 B each);
- training: `FIXED_GIB` + weights + per training parent `rows × layers × tokens × hidden × TRAIN_BYTES` (the
  activations a transformer block keeps for its backward), or with gradient checkpointing one block's activations
  plus every block's bf16 input (`CHECKPOINT_BYTES`, an estimate, not measured yet);
- rollout: `FIXED_GIB` + weights + `sampling.max_batch_size` rows × tokens × hidden × `ROLLOUT_BYTES`.

Editing models add their sources' tokens to every row's sequence (`source_tokens`: the first prompt line's sources
at the size the family encodes them, plus Qwen-Image-Edit's vision tokens in the text): never denoised, never rows,
but in every forward's activations.

The constants are calibrated on the one model measured at real size: SD3.5-Medium's MMDiT (2.24B parameters)
in bf16 at 512 px (1,024 image + 77 + 64 text tokens) with CFG on one H200 (docs/benchmarks.md, "GPU": 10.05 /
14.74 / 24.10 / 42.75 / 66.20 GiB at 1 / 2 / 4 / 8 / 13 parents; rollout 18.7 GiB at 64-row forwards): a line
through the five training points, the weights counted from the parameters. The test that holds the plan to those
numbers is `tests/treegrpo/test_memory_plan.py`. Other families are estimates from their own sizes with the same
constants.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1 << 30
TRAIN_BYTES = 58.5  # per row · layer · token · hidden kept for backward (fit: 4.68 GiB a parent, 2 rows, 1,165 tokens)
ROLLOUT_BYTES = 124.9  # per row · token · hidden of a sampling forward (fit: 18.7 GiB at 64-row forwards)
CHECKPOINT_BYTES = 2.0  # per row · layer · token · hidden with checkpointing: a block's bf16 input (estimate)
FIXED_GIB = 0.31  # the rollout record, decoded leaves, allocator slack (the fit's intercept minus the weights)
RESERVE_GIB = 1.5  # the CUDA context and fragmentation: not usable by the run
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CARDS = {"h200": 141, "h100": 80, "a100": 80, "a100-40": 40, "l40s": 48, "a6000": 48, "rtx6000": 48, "4090": 24,
         "3090": 24, "a10": 24, "l4": 24, "4080": 16, "t4": 16}
# parameters of the reward models the kinds load by default (their published checkpoints)
REWARD_PARAMS = {"pickscore": 986e6, "hpsv2": 986e6, "imagereward": 447e6, "aesthetic": 428e6, "clipscore": 428e6}
TEXT_ENCODERS = re.compile(r"^text_encoder(_\d)?$")


def gpu_gib(text: str) -> float:
    """GiB of one accelerator from `--gpu-memory`: a number with an optional GB/GiB suffix ("24", "80GB") or a card
    name (H100, A100-40, 4090, ...). ValueError listing the card names otherwise."""
    value = text.strip().lower().replace(" ", "")
    number = re.fullmatch(r"(\d+(?:\.\d+)?)(gb|gib|g)?", value)
    if number:
        return float(number.group(1))
    if value.removeprefix("rtx") in CARDS or value in CARDS:
        return float(CARDS.get(value, CARDS.get(value.removeprefix("rtx"), 0)))
    raise ValueError(f"--gpu-memory {text!r}: give GiB (24, 80GB) or a card: {', '.join(sorted(CARDS))}.")


def safetensors_params(folder: Path) -> int:
    """Elements stored in a folder's `*.safetensors` files (parameters and persistent buffers, all on the GPU in a
    run), read from their headers (no weights are read)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total


@dataclass(frozen=True)
class Denoiser:
    """What sets a denoiser's activation memory: blocks, width, and tokens per image (None: not a transformer)."""

    layers: int | None
    hidden: int | None
    tokens_per_pixel: float  # image tokens per pixel (1 / (vae scale · patch)²)
    text_tokens: int


def denoiser_shape(folder: Path, max_sequence_length: int | None) -> Denoiser:
    """From `transformer/config.json` (or a UNet's, which has no activation model here yet)."""
    config_file = folder / "transformer" / "config.json"
    if not config_file.is_file():
        return Denoiser(None, None, 0.0, 77)
    config = json.loads(config_file.read_text())
    name = str(config.get("_class_name", ""))
    layers = int(config.get("num_layers", 0)) + int(config.get("num_single_layers", 0))
    hidden = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
    vae_config = folder / "vae" / "config.json"
    blocks = len(json.loads(vae_config.read_text()).get("block_out_channels", [0] * 4)) if vae_config.is_file() else 4
    patch = 2 if name.startswith("Flux") else int(config.get("patch_size", 1) or 1)  # FLUX packs 2×2 latents
    sequence = max_sequence_length or (512 if name.startswith("Flux") else 256)
    text = sequence + (77 if name.startswith("SD3") else 0)  # SD3 joins CLIP's 77 tokens to T5's
    return Denoiser(layers or None, hidden or None, 1.0 / (2 ** (blocks - 1) * patch) ** 2, text)


@dataclass
class MemoryPlan:
    """GiB per process: `rows` (what, GiB) for the report, the two peaks, and what to change when they do not fit."""

    rows: list[tuple[str, float]] = field(default_factory=list)
    rollout_gib: float = 0.0
    training_gib: float = 0.0
    usable_gib: float = 0.0
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return max(self.rollout_gib, self.training_gib) <= self.usable_gib


def plan_memory(components: dict[str, int], denoiser: Denoiser, *, dtype: str, height: int, width: int, cfg: bool,
                micro_batch_size: int, max_batch_size: int, lora_params: int, rewards: list[str],
                offload_text_encoders: bool, offload_rewards: bool, gradient_checkpointing: bool,
                gpu_memory_gib: float, source_tokens: float = 0.0) -> MemoryPlan:
    """The plan from parameter counts per component (`components`: folder name → parameters) and the denoiser's
    shape; see the module docstring for the model."""
    size = DTYPE_BYTES[dtype]
    plan = MemoryPlan(usable_gib=gpu_memory_gib - RESERVE_GIB)
    resident = {name: count for name, count in components.items()
                if not (offload_text_encoders and TEXT_ENCODERS.match(name))}
    weights = sum(resident.values()) * size / GIB
    plan.rows.append((f"weights ({', '.join(sorted(resident))}, {dtype})", weights))
    reward_gib = 0.0 if offload_rewards else sum(REWARD_PARAMS.get(kind, 0) for kind in rewards) * size / GIB
    if reward_gib:
        plan.rows.append((f"reward models ({', '.join(k for k in rewards if k in REWARD_PARAMS)})", reward_gib))
    lora = lora_params * 16 / GIB
    plan.rows.append(("LoRA: fp32 weights, gradients, Adam moments", lora))
    base = FIXED_GIB + weights + reward_gib + lora
    if denoiser.layers is None:
        plan.rows.append(("activations", float("nan")))
        plan.suggestions.append("no activation model for this denoiser (UNets): only the weights are planned")
        plan.rollout_gib = plan.training_gib = base
        return plan
    tokens = height * width * denoiser.tokens_per_pixel + denoiser.text_tokens + source_tokens
    of_sources = f", {source_tokens:.0f} of them the sources'" if source_tokens else ""
    rows_per_parent = 2 if cfg else 1
    per_element = CHECKPOINT_BYTES + TRAIN_BYTES / denoiser.layers if gradient_checkpointing else TRAIN_BYTES
    per_parent = rows_per_parent * denoiser.layers * tokens * denoiser.hidden * per_element / GIB
    plan.rows.append((f"training activations, {micro_batch_size} parent(s) × {rows_per_parent} row(s) × "
                      f"{tokens:.0f} tokens{of_sources}" + (" (checkpointed: estimate)" if gradient_checkpointing
                                                             else ""),
                      per_parent * micro_batch_size))
    rollout = max_batch_size * tokens * denoiser.hidden * ROLLOUT_BYTES / GIB
    plan.rows.append((f"rollout activations, {max_batch_size} rows a forward of {tokens:.0f} tokens", rollout))
    plan.training_gib, plan.rollout_gib = base + per_parent * micro_batch_size, base + rollout
    if plan.training_gib > plan.usable_gib:
        room = int((plan.usable_gib - base) // per_parent) if per_parent > 0 else 0
        if room >= 1:
            plan.suggestions.append(f"train.micro_batch_size = {room} (the most parents that fit)")
        if not gradient_checkpointing:
            plan.suggestions.append("model.gradient_checkpointing = true")
    if plan.rollout_gib > plan.usable_gib:
        rows = int((plan.usable_gib - base) // (rollout / max_batch_size))
        if rows >= 2:
            plan.suggestions.append(f"sampling.max_batch_size = {rows} (rows per sampling forward)")
    if not plan.fits:
        if not offload_text_encoders and any(TEXT_ENCODERS.match(n) for n in components):
            plan.suggestions.append("model.offload_text_encoders = true")
        if reward_gib:
            plan.suggestions.append("model.offload_rewards = true")
        plan.suggestions.append("FSDP (recipes/accelerate/fsdp.yaml) to shard the denoiser over the GPUs")
    return plan


def source_tokens(pipeline_class: str, sizes: list[tuple[int, int]], tokens_per_pixel: float,
                  auto_resize: bool = True) -> float:
    """Tokens one prompt's sources (`sizes`: (width, height) each) add to every row's sequence, at the size the
    family's adapter says its stock pipeline encodes them (`encoded_source_size`: FLUX.1 Kontext's preferred
    resolution with `auto_resize`, FLUX.2 at most 1024², Qwen-Image-Edit ~1024²), plus the text tokens the adapter
    says a source adds (`source_text_tokens`: Qwen-Image-Edit's vision tokens)."""
    from diffusers_tree.adapters import adapter_class

    adapter = adapter_class(pipeline_class)
    if not sizes or adapter is None:
        return 0.0
    total = 0.0
    for width, height in sizes:
        encoded_width, encoded_height = adapter.encoded_source_size(width, height, auto_resize)
        total += encoded_width * encoded_height * tokens_per_pixel + adapter.source_text_tokens(width, height)
    return total


def first_line_source_sizes(prompts: str | None) -> list[tuple[int, int]]:
    """(width, height) of the first prompt line's sources (`check` holds every line to the same number and size)."""
    from treegrpo.recipe.preflight import prompt_records
    from treegrpo.sources import SOURCE_KEY, source_size, sources_of_line

    if not prompts or not str(prompts).endswith(".jsonl"):
        return []
    _, metadata = prompt_records(prompts)
    first = metadata[0].get(SOURCE_KEY) if metadata else None
    return [] if first is None else [source_size(path, "data.prompts: line 1") for path in sources_of_line(first)]


def default_targets(folder: Path) -> int:
    """How many module names the family's adapter targets with LoRA by default (8 when the family is unknown)."""
    from diffusers_tree.adapters import adapter_class

    index = json.loads((folder / "model_index.json").read_text())
    adapter = adapter_class(str(index.get("_class_name", "")))
    return len(adapter.lora_target_modules) if adapter is not None else 8


def recipe_memory_plan(loaded, gpu_memory_gib: float) -> MemoryPlan | str:
    """The plan for a validated recipe, or why there is none (the model is not on this machine)."""
    from treegrpo.recipe.plan import cfg_rows_per_node
    from treegrpo.recipe.preflight import model_folder

    folder = model_folder(loaded.model.pretrained)
    if folder is None:
        return (f"{loaded.model.pretrained} is not on this machine: run `treegrpo check --gpu-memory` where it is "
                "downloaded (the plan reads its weight files' headers)")
    components = {sub.name: count for sub in sorted(folder.iterdir()) if sub.is_dir()
                  and (count := safetensors_params(sub))}
    sampling, model = loaded.sampling, loaded.model
    sequence = sampling.max_sequence_length
    if sequence is None:  # a shipped model's stored call defaults
        from treegrpo.builtin import builtin_metadata

        sequence = builtin_metadata(loaded.model.pretrained).get("pipeline_kwargs", {}).get("max_sequence_length")
    denoiser = denoiser_shape(folder, sequence)
    lora = model.lora
    targets = len(lora.target_modules) if lora is not None and lora.target_modules else default_targets(folder)
    lora_params = (denoiser.layers or 0) * targets * lora.rank * 2 * (denoiser.hidden or 0) if lora is not None \
        else components.get("transformer", components.get("unet", 0))  # full fine-tuning: every denoiser weight
    cfg, _ = cfg_rows_per_node(loaded)
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    auto_resize = sampling.auto_resize
    if auto_resize is None:  # the shipped model's setting, else the stock default
        from treegrpo.builtin import builtin_metadata

        auto_resize = builtin_metadata(loaded.model.pretrained).get("pipeline_kwargs", {}).get("_auto_resize", True)
    sources = source_tokens(str(index.get("_class_name", "")), first_line_source_sizes(loaded.data.prompts),
                            denoiser.tokens_per_pixel, auto_resize)
    return plan_memory(components, denoiser, dtype=model.dtype, height=sampling.height, width=sampling.width,
                       cfg=cfg == 2, micro_batch_size=loaded.train.micro_batch_size,
                       max_batch_size=sampling.max_batch_size, lora_params=lora_params,
                       rewards=[spec.kind for spec in [*loaded.reward, *loaded.eval_reward]],
                       offload_text_encoders=model.offload_text_encoders, offload_rewards=model.offload_rewards,
                       gradient_checkpointing=model.gradient_checkpointing, gpu_memory_gib=gpu_memory_gib,
                       source_tokens=sources)
