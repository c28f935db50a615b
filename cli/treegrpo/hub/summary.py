"""What a finished run folder holds, as the model card and `treegrpo push` present it: the run summary, the base
model's family (read from the recipe, the base model's model_index.json or the LoRA file's keys), and the errors of
the Hub commands. Imports no torch."""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from treegrpo.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

# Same as `treegrpo.model.loading.LORA_WEIGHT_NAME` (not imported from there: that module loads torch).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(UsageError):
    """A Hub operation cannot proceed; the message says why and what to do (the CLI exits with code 2)."""


class PushError(HubError):
    """`treegrpo push` cannot proceed: not logged in, no run folder, no LoRA in it, the Hub refused."""


class LoraLoadError(HubError):
    """`--lora` names nothing loadable: no such folder/file/repo, or a file diffusers does not recognize."""


@dataclass(frozen=True)
class Family:
    """A pipeline family as the card presents it; what each family says lives in its adapter (`hub_tags`,
    `hub_task`, `claims_lora_keys`)."""

    pipeline_class: str
    tags: tuple[str, ...] = ()  # Hub tags, the family's first (diffusers' own training scripts use the same)
    name: str = ""  # the family: its adapter's file in diffusers_tree/adapters (sd, sdxl, sd3, flux, flux2, ...)
    task: str = "text-to-image"  # the Hub's pipeline_tag
    sequence_length: bool = False  # the pipeline's call takes `max_sequence_length` (T5 / LLM text encoders)


GENERIC = Family("DiffusionPipeline")  # unknown class: `DiffusionPipeline.from_pretrained` picks it


def family_of(pipeline_class: str) -> Family:
    """The card's view of a pipeline class: its adapter's Hub tags and task, and whether its call takes a token
    length (read from the diffusers class's signature)."""
    import inspect

    import diffusers

    from diffusers_tree.adapters import adapter_class

    adapter = adapter_class(pipeline_class)
    pipeline = getattr(diffusers, pipeline_class, None)
    call = inspect.signature(pipeline.__call__).parameters if isinstance(pipeline, type) else {}
    takes_length = "max_sequence_length" in call
    if adapter is None:
        return Family(pipeline_class, sequence_length=takes_length)
    return Family(pipeline_class, adapter.hub_tags, name=adapter.__module__.rsplit(".", 1)[-1],
                  task=adapter.hub_task, sequence_length=takes_length)


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
    evaluations: list[dict] = field(default_factory=list)  # eval.jsonl: ODE samples judged during training
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
    summary.evaluations = _read_metrics(run_dir / "eval.jsonl")
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
    """The first training prompt (a `.jsonl` line's `prompt`); a relative prompt path is tried from here, then from
    the run folder and its parent (where `treegrpo run` usually ran)."""
    given = Path(recipe.get("data", {}).get("prompts", ""))
    for prompts in (given, run_dir / given, run_dir.parent / given):
        try:
            lines = [line.strip() for line in prompts.read_text().splitlines() if line.strip()
                     and not line.startswith("#")]
        except (OSError, UnicodeDecodeError):
            continue
        if lines and prompts.suffix == ".jsonl":  # a line of JSON: its "prompt", not the line itself
            try:
                record = json.loads(lines[0])
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                return record["prompt"]
            continue
        if lines:
            return lines[0]
    return "a photo of a cat"


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
    if pretrained.startswith("builtin:"):  # a shipped model: its folder's model_index.json like any local one
        from treegrpo.builtin import resolve_pretrained

        try:
            pretrained = resolve_pretrained(pretrained)
        except (ValueError, FileNotFoundError):
            pass  # unknown or missing: the LoRA keys decide below
    index = _model_index(pretrained, revision)
    if index and index.get("_class_name"):
        return family_of(index["_class_name"])
    from diffusers_tree.adapters import registered_adapters

    keys = [k for k in header if k != "__metadata__"]
    claims = [name for name, adapter in registered_adapters().items() if adapter.claims_lora_keys(keys)]
    return family_of(claims[0]) if len(claims) == 1 else GENERIC


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


