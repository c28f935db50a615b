"""Loading a trained LoRA (a Hub repo id, a folder, a run folder or a file) into a stock diffusers pipeline, checked
before any model loads (`lora_source`) and after (`load_lora_into`: the adapter really arrived).

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


def lora_source(lora: str, *, revision: str | None = None, weight_name: str | None = None) -> tuple[str, dict]:
    """Where `load_lora_weights` finds `lora` (see `load_lora_into`), checked without loading anything, so a wrong
    `--lora` fails before any model loads. Returns `(source, load_lora_weights kwargs)`; raises `LoraLoadError`."""
    path = Path(lora).expanduser()
    kwargs: dict = {}
    if path.is_file():
        source, kwargs["weight_name"] = str(path.parent), path.name
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
