"""Loading a trained LoRA (a Hub repo id, a folder, a run folder or a file) into a stock diffusers pipeline, checked
before any model loads (`lora_source`) and after (`load_lora_into`: the adapter really arrived). A peft adapter
folder (`adapter_config.json` + `adapter_model.safetensors`, what `PeftModel.save_pretrained` writes: Flow-GRPO's and
Flow-Factory's checkpoints) is converted on the way (`peft_folder_state_dict`), so another trainer's LoRA is judged
with the same command as ours.

Example:

```py
>>> from treegrpo.hub.lora import load_lora_into
>>> load_lora_into(pipe, "me/sd35m-hps-treegrpo")  # or a folder, a run folder, or a .safetensors file
'default_0'
```
"""

from __future__ import annotations

from pathlib import Path

from treegrpo.hub.summary import LORA_WEIGHT_NAME, REPO_ID, LoraLoadError

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def lora_source(lora: str, *, revision: str | None = None, weight_name: str | None = None) -> tuple[str, dict]:
    """Where `load_lora_weights` finds `lora` (see `load_lora_into`), checked without loading anything, so a wrong
    `--lora` fails before any model loads. Returns `(source, load_lora_weights kwargs)`; raises `LoraLoadError`."""
    path = Path(lora).expanduser()
    kwargs: dict = {}
    if path.is_file():
        source, kwargs["weight_name"] = str(path.parent), path.name
    elif path.is_dir() and is_peft_folder(path) and not weight_name:
        source, kwargs["weight_name"] = str(path), PEFT_WEIGHTS
    elif path.is_dir():
        folder = path / "final" if (path / "final" / LORA_WEIGHT_NAME).is_file() else path
        source, kwargs["weight_name"] = str(folder), weight_name or _local_weight_name(folder, lora)
    elif REPO_ID.fullmatch(lora) and not lora.startswith((".", "~")):
        source, kwargs["weight_name"] = lora, weight_name or LORA_WEIGHT_NAME
        if revision:
            kwargs["revision"] = revision
    else:
        raise LoraLoadError(f"--lora {lora!r}: no such file or folder, and not a Hub repo id like 'user/name'.")
    return source, kwargs


def load_lora_into(pipe, lora: str, *, revision: str | None = None, weight_name: str | None = None,
                   adapter_name: str | None = None) -> str:
    """Load a LoRA into a stock diffusers pipeline with `pipe.load_lora_weights` and check it really arrived.

    `lora` is a Hub repo id (`user/name`), a folder holding `pytorch_lora_weights.safetensors`, a treegrpo run
    folder (its `final/` is used) or a `.safetensors` file. For repo ids `weight_name` defaults to
    `pytorch_lora_weights.safetensors`, which also lets `HF_HUB_OFFLINE=1` load from the local cache. Returns the
    adapter name. Raises `LoraLoadError`.
    """
    source, kwargs = lora_source(lora, revision=revision, weight_name=weight_name)
    if adapter_name:
        kwargs["adapter_name"] = adapter_name
    before = _adapters(pipe)
    if kwargs["weight_name"] == PEFT_WEIGHTS and is_peft_folder(Path(source)):
        from diffusers_tree.adapters import adapter_for

        source = peft_folder_state_dict(Path(source), adapter_for(pipe).denoiser_name, lora)
        kwargs.pop("weight_name")
    try:
        pipe.load_lora_weights(source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # RuntimeError: shapes of another base model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoraLoadError(f"--lora {lora!r}: could not load {kwargs['weight_name']} into "
                            f"{type(pipe).__name__}: {first} (is it a LoRA for this base model?)") from None
    added = sorted(_adapters(pipe) - before)
    if not added:
        raise LoraLoadError(
            f"--lora {lora!r}: {kwargs['weight_name']} holds no LoRA weights that {type(pipe).__name__} recognizes "
            "(wrong model family, or a file from save_lora_adapter / PeftModel.save_pretrained). Export with "
            "treegrpo or <Pipeline>.save_lora_weights.")
    return added[0]


def is_peft_folder(folder: Path) -> bool:
    return (folder / PEFT_CONFIG).is_file() and (folder / PEFT_WEIGHTS).is_file()


def peft_folder_state_dict(folder: Path, denoiser_name: str, lora: str) -> dict:
    """A peft LoRA folder as the state dict `load_lora_weights` takes: keys `<denoiser>.<module>.lora_A/B.weight`
    (peft's `base_model.model.` prefix and adapter names dropped) and each module's scale `lora_alpha / r` (√r with
    rsLoRA; `alpha_pattern` / `rank_pattern` per module, matched as peft matches them) baked into `lora_B`, since a
    bare state dict loads at scale 1. DoRA and LoRA biases have no diffusers equivalent and are refused."""
    import json
    import math
    import re

    from safetensors.torch import load_file

    config = json.loads((folder / PEFT_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise LoraLoadError(f"--lora {lora!r}: a peft {config.get('peft_type', '?')} adapter"
                            f"{' with DoRA' if config.get('use_dora') else ''}"
                            f"{' with LoRA biases' if config.get('lora_bias') else ''}; only plain LoRA converts to "
                            "the diffusers format.")

    def pattern_value(module: str, patterns: dict, default):
        # peft: the first pattern that matches the module name's end (`(.*\.)?pattern$`) wins
        return next((value for pattern, value in patterns.items() if re.match(rf"(.*\.)?({pattern})$", module)),
                    default)

    converted = {}
    for key, value in load_file(folder / PEFT_WEIGHTS).items():
        name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key.removeprefix("base_model.model."))
        name = name.removeprefix(f"{denoiser_name}.")
        module = name.rsplit(".lora_", 1)[0]
        if ".lora_B." in name:
            rank = pattern_value(module, config.get("rank_pattern") or {}, config["r"])
            alpha = pattern_value(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", rank))
            value = value * (alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
        converted[f"{denoiser_name}.{name}"] = value
    return converted


def _local_weight_name(folder: Path, lora: str) -> str:
    if (folder / LORA_WEIGHT_NAME).is_file():
        return LORA_WEIGHT_NAME
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise LoraLoadError(f"--lora {lora!r}: no {LORA_WEIGHT_NAME} in {folder}"
                        + (f" and several .safetensors files ({', '.join(found)}); name the file instead."
                           if found else "; pass a folder written by `treegrpo run` (final/) or save_lora_weights."))


def _adapters(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}
