"""Sharing trained LoRAs on the Hugging Face Hub: `treegrpo push` (LoRA + model card + samples + recipe + metrics)
and loading a LoRA from a Hub repo id or a local folder into any stock diffusers pipeline.

Importing this module is cheap (no torch, no diffusers): `treegrpo push` only needs `huggingface_hub`.

Example:

```py
>>> from treegrpo.hub import push_run, load_lora_into
>>> url = push_run("runs/sd35m_hps", "me/sd35m-hps-treegrpo")  # needs `hf auth login` or HF_TOKEN
>>> load_lora_into(pipe, "me/sd35m-hps-treegrpo")  # or a folder, a run folder, or a .safetensors file
'default_0'
```
"""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .hub_card import model_card

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

# Same as `treegrpo.models.LORA_WEIGHT_NAME` (not imported from there: that module loads torch).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(ValueError):
    """A Hub operation cannot proceed; the message says why and what to do (the CLI exits with code 2)."""


class PushError(HubError):
    """`treegrpo push` cannot proceed: not logged in, no run folder, no LoRA in it, the Hub refused."""


class LoraLoadError(HubError):
    """`--lora` names nothing loadable: no such folder/file/repo, or a file diffusers does not recognize."""


@dataclass(frozen=True)
class Family:
    """A pipeline family as the card presents it."""

    name: str  # the diffusers_tree adapter name: sd, sdxl, sd3, flux
    pipeline_class: str
    tags: tuple[str, ...]  # Hub tags, the family's first (diffusers' own training scripts use the same)
    task: str = "text-to-image"  # the Hub's pipeline_tag


FAMILIES = {f.pipeline_class: f for f in (
    Family("sd", "StableDiffusionPipeline", ("stable-diffusion", "stable-diffusion-diffusers")),
    Family("sdxl", "StableDiffusionXLPipeline", ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")),
    Family("sd3", "StableDiffusion3Pipeline", ("sd3", "sd3-diffusers")),
    Family("flux", "FluxPipeline", ("flux", "flux-diffusers")),
    Family("flux2", "Flux2Pipeline", ("flux2", "flux2-diffusers")),
    Family("flux2", "Flux2KleinPipeline", ("flux2", "flux2-diffusers")),
    Family("qwenimage", "QwenImagePipeline", ("qwen-image", "qwen-image-diffusers")),
    Family("zimage", "ZImagePipeline", ("z-image", "z-image-diffusers")),
    Family("sana", "SanaPipeline", ("sana", "sana-diffusers")),
    Family("wan", "WanPipeline", ("wan", "wan-diffusers"), task="text-to-video"),
)}
GENERIC = Family("", "DiffusionPipeline", ())  # unknown class: `DiffusionPipeline.from_pretrained` picks it


@dataclass
class RunSummary:
    """What the model card says about a run, read from its folder (`read_run`)."""

    run_dir: Path
    lora_file: Path
    recipe: dict  # recipe.resolved.toml, as parsed TOML, local paths made public (`public_paths`)
    pretrained: str  # model.pretrained as in the recipe (made public)
    base_model: str | None  # Hub id of the base model, if there is one
    family: Family
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl
    images: dict[str, Path] = field(default_factory=dict)  # path in the repo → local file
    lora_rank: int | None = None
    example_prompt: str = "a photo of a cat"  # the first training prompt (read from the local prompt file)


def read_run(run_dir: str | Path, *, base_model: str | None = None) -> RunSummary:
    """Check that `run_dir` is a finished LoRA run and collect what the card needs. Raises `PushError`."""
    run_dir = Path(run_dir).expanduser()
    if run_dir.name == "final" and (run_dir.parent / "recipe.resolved.toml").is_file():
        run_dir = run_dir.parent  # `runs/x/final` given: the run is its parent
    if not run_dir.is_dir():
        raise PushError(f"{run_dir}: no such run folder. Pass the output.dir of a `treegrpo run` (the folder with "
                        "final/, metrics.jsonl and recipe.resolved.toml).")
    recipe_file = run_dir / "recipe.resolved.toml"
    if not recipe_file.is_file():
        raise PushError(f"{run_dir} is not a treegrpo run folder (no recipe.resolved.toml). Pass the output.dir of "
                        "a `treegrpo run`.")
    lora_file = run_dir / "final" / LORA_WEIGHT_NAME
    if not lora_file.is_file():
        raise PushError(f"no LoRA in {run_dir}: {lora_file} is missing. Finish the run first (`treegrpo run RECIPE "
                        "--resume`); full fine-tunes (no [model.lora]) are not pushed as LoRAs.")
    try:
        recipe = tomllib.loads(recipe_file.read_text())
        pretrained = recipe["model"]["pretrained"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as err:
        raise PushError(f"{recipe_file} is unreadable ({err}); it should be the recipe written by `treegrpo run`.") \
            from None
    revision = recipe["model"].get("revision")
    header = _safetensors_header(lora_file)
    # what is uploaded names local files by their place in the run or by their name only, never by a local path
    summary = RunSummary(run_dir=run_dir, lora_file=lora_file, recipe=public_paths(recipe, run_dir),
                         pretrained=public_path(pretrained, run_dir), base_model=base_model or _hub_id(pretrained),
                         family=_family(pretrained, revision, header), lora_rank=_lora_rank(header),
                         example_prompt=_example_prompt(recipe, run_dir))
    summary.metrics = _read_metrics(run_dir / "metrics.jsonl")
    for in_repo, local in (("samples/final.png", run_dir / "samples" / "final.png"),
                           ("samples/before.png", run_dir / "samples" / "before.png"),
                           ("reward_curve.png", run_dir / "reward_curve.png")):
        if local.is_file():
            summary.images[in_repo] = local
    return summary


def public_path(value, run_dir: Path):
    """A value as it may be published: an absolute or home-relative path becomes relative to the run folder when
    inside it, else `<local>/<its name>` (no user names, home or cluster paths on the Hub); other values unchanged."""
    if not isinstance(value, str) or not value.startswith(("/", "~")):
        return value
    path = Path(value).expanduser()
    try:
        return path.resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return f"<local>/{path.name}"


def public_paths(data, run_dir: Path):
    """`public_path` applied to every string in a nested recipe dict."""
    if isinstance(data, dict):
        return {key: public_paths(value, run_dir) for key, value in data.items()}
    if isinstance(data, list):
        return [public_paths(value, run_dir) for value in data]
    return public_path(data, run_dir)


def check_can_push(repo_id: str, *, token: str | None = None) -> str:
    """Fail fast (no network): `repo_id` looks like `user/name` and a token is available. Returns the token.
    The trainer calls this before training when `output.push_to_hub` is set."""
    _check_repo_id(repo_id)
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError("not logged in to the Hugging Face Hub: run `hf auth login` with a write token (or set "
                        "HF_TOKEN), then push again.")
    return token


def _check_repo_id(repo_id: str) -> None:
    if not REPO_ID.fullmatch(repo_id or ""):
        raise PushError(f"repo {repo_id!r}: expected a Hub repo id like 'user/name' (or 'org/name').")


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
             token: str | None = None, base_model: str | None = None) -> str:
    """Upload a finished run to the Hub in one commit and return the repo URL.

    Creates `repo_id` if needed (`private` only applies then) and, with `revision`, that branch. Uploads
    `pytorch_lora_weights.safetensors`, a model card (README.md: base model, `base_model_relation: adapter`, how it
    was trained, samples, reward curve, a usage snippet), the sample grids, the reward curve, `recipe.resolved.toml`
    and `metrics.jsonl`. Pushing again updates all of them. `base_model` names the Hub id of the base model when
    the run used a local folder. Raises `PushError` with what to do.
    """
    _check_repo_id(repo_id)
    summary = read_run(run_dir, base_model=base_model)
    token = check_can_push(repo_id, token=token)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    card = model_card(summary, repo_id)
    from treegrpo.recipe import dict_to_toml

    files = {"README.md": str(card).encode(), LORA_WEIGHT_NAME: summary.lora_file,
             "recipe.resolved.toml": dict_to_toml(summary.recipe).encode(), **summary.images}
    if (summary.run_dir / "metrics.jsonl").is_file():
        files["metrics.jsonl"] = summary.run_dir / "metrics.jsonl"
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=value if isinstance(value, bytes)
                                     else str(value)) for name, value in files.items()]
    api = HfApi(token=token)
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=_commit_message(summary), revision=revision)
    except HfHubHTTPError as err:
        raise PushError(_http_message(err, repo_id, api.endpoint)) from None
    except (OSError, ValueError, *_http_library_errors()) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(f"could not push to {api.endpoint}: {first}. Check the network (and HF_ENDPOINT / "
                        "HF_HUB_OFFLINE), then push again.") from None
    return f"{url.rstrip('/')}/tree/{revision}" if revision else url


def _http_library_errors() -> tuple[type[Exception], ...]:
    """The base errors of the HTTP clients huggingface_hub may use (httpx in 1.x, httpx2 in 2.x, requests before):
    connection failures raise these, not `HfHubHTTPError`."""
    import importlib
    import importlib.util

    return tuple(importlib.import_module(name).HTTPError for name in ("httpx", "httpx2", "requests")
                 if importlib.util.find_spec(name) is not None)


def push_after_training(output_dir: str | Path, repo: str, *, token: str | None = None) -> str:
    """`output.push_to_hub`: push the finished run (call on the main process only). Returns the URL; a
    `PushError` says the run itself is complete and how to retry."""
    try:
        url = push_run(output_dir, repo, token=token)
    except PushError as err:
        raise PushError(f"{err} The run itself is complete; retry with `treegrpo push {output_dir} --repo "
                        f"{repo}`.") from None
    logger.info("pushed %s to %s", output_dir, url)
    return url


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


# ---- the model card -------------------------------------------------------------------------------------------------
def _read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, skipping lines that are not JSON objects (a run killed mid-write)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _example_prompt(recipe: dict, run_dir: Path) -> str:
    """The first training prompt; a relative prompt path is tried from here, then from the run folder and its
    parent (where `treegrpo run` usually ran)."""
    given = Path(recipe.get("data", {}).get("prompts", ""))
    for prompts in (given, run_dir / given, run_dir.parent / given):
        try:
            lines = [line.strip() for line in prompts.read_text().splitlines() if line.strip()
                     and not line.startswith("#")]
        except (OSError, UnicodeDecodeError):
            continue
        if lines:
            return lines[0]
    return "a photo of a cat"


def _commit_message(summary: RunSummary) -> str:
    values = [m["reward/mean"] for m in summary.metrics if "reward/mean" in m]
    detail = f", reward/mean {values[0]:.4g} -> {values[-1]:.4g}" if values else ""
    return f"treegrpo push: {summary.run_dir.name} ({len(summary.metrics)} epochs{detail})"


def _http_message(err, repo_id: str, endpoint: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return (f"the Hub at {endpoint} rejected the token (401): log in again with `hf auth login` using a token "
                "with write access (or fix HF_TOKEN), then push again.")
    if status == 403:
        return (f"no write access to {repo_id} (403): push to your own namespace, or use a token with write access "
                f"to {repo_id.split('/')[0]}.")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"the Hub at {endpoint} refused the push ({status}): {first}"


# ---- reading the base model and the LoRA file without torch ---------------------------------------------------------
def _hub_id(pretrained: str) -> str | None:
    """The Hub id behind `model.pretrained`: itself if it looks like one and is not a local path, or the repo of a
    Hub-cache snapshot folder (`.../models--org--name/snapshots/<sha>`)."""
    path = Path(pretrained).expanduser()
    if REPO_ID.fullmatch(pretrained) and not path.exists():
        return pretrained
    for part in path.parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def _family(pretrained: str, revision: str | None, header: dict) -> Family:
    if pretrained == "builtin:digits":
        return FAMILIES["StableDiffusion3Pipeline"]
    index = _model_index(pretrained, revision)
    if index and index.get("_class_name") in FAMILIES:
        return FAMILIES[index["_class_name"]]
    if index and index.get("_class_name"):
        return Family("", index["_class_name"], ())
    keys = [k for k in header if k != "__metadata__"]
    if keys and all(k.startswith("transformer.") for k in keys):  # transformer LoRAs: FLUX has single blocks
        return FAMILIES["FluxPipeline" if any(".single_transformer_blocks." in k for k in keys)
                        else "StableDiffusion3Pipeline"]
    return GENERIC  # UNet LoRAs fit SD1.5 and SDXL alike: let DiffusionPipeline pick the class


def _model_index(pretrained: str, revision: str | None) -> dict | None:
    """`model_index.json` of the base model: local folder, Hub cache, or (last) a download."""
    local = Path(pretrained).expanduser() / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if not REPO_ID.fullmatch(pretrained):
        return None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "model_index.json", revision=revision)
        found = cached if isinstance(cached, str) else hf_hub_download(pretrained, "model_index.json",
                                                                       revision=revision)
        return json.loads(Path(found).read_text())
    except Exception as err:  # the card falls back to DiffusionPipeline; the push itself may still work
        logger.warning("could not read model_index.json of %s (%s); the card uses DiffusionPipeline", pretrained,
                       type(err).__name__)
        return None


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, shapes, `__metadata__`), read without torch."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def _lora_rank(header: dict) -> int | None:
    ranks = {info["shape"][0] for key, info in header.items() if ".lora_A." in key}
    return max(ranks) if ranks else None


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
