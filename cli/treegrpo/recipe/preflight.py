"""What `treegrpo check` and `treegrpo run` judge before loading any model: the files a recipe names (prompt
files, a local model folder, python reward modules) and the output folder. The recipe validator judges the values;
this judges what is on disk. Each problem is one line naming the recipe key, the value and what to do."""

from __future__ import annotations

import json
from pathlib import Path

from treegrpo.errors import UsageError
from treegrpo.recipe.schema import Recipe
from treegrpo.sources import SOURCE_KEY, resolve_source

# Text encoders read at most a few hundred tokens (CLIP 77, T5 256-512); a longer line is a mistake (a wrong file),
# and a multi-megabyte one would stall the tokenizer for minutes.
MAX_PROMPT_CHARS = 4000


class PreflightError(UsageError):
    """A file or folder named in the recipe is unusable; exit code 2."""


def prompts_from_file(path: str, key: str = "data.prompts") -> list[str]:
    """Prompts of a text file, one a line (blank lines and `#` comments skipped), or of a `.jsonl` file."""
    return prompt_records(path, key)[0]


def prompt_records(path: str, key: str = "data.prompts") -> tuple[list[str], list[dict]]:
    """(prompts, metadata): a `.jsonl` file holds one JSON object a line with a `prompt` string and any other
    fields (GenEval's `tag`/`include`, an OCR target text, an editing prompt's source `image`), which reach the
    rewards that take metadata (python, http, vlm); a text file holds one prompt a line and gives empty metadata.
    An `image` path is resolved against the file's folder and checked readable (`sources.resolve_source`)."""
    prompts = _prompt_lines(path, key)
    if not str(path).endswith(".jsonl"):
        return prompts, [{} for _ in prompts]
    records = []
    for number, line in enumerate(prompts, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PreflightError(f"{key} = {path!r}: line {number} is not JSON ({err.msg}); a .jsonl prompt file "
                                 'holds one object a line, like {"prompt": "a red cat", "tag": "color"}.') from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise PreflightError(f"{key} = {path!r}: line {number} has no \"prompt\" string; each line needs one "
                                 'besides any metadata, like {"prompt": "a red cat", "tag": "color"}.')
        if len(record["prompt"]) > MAX_PROMPT_CHARS:
            raise PreflightError(f"{key} = {path!r}: the prompt of line {number} has {len(record['prompt'])} "
                                 f"characters; prompts over {MAX_PROMPT_CHARS} are refused.")
        if SOURCE_KEY in record:  # an editing prompt's source image: an absolute path from here on
            record[SOURCE_KEY] = resolve_source(record[SOURCE_KEY], path, key, number)
        records.append(record)
    return [r["prompt"] for r in records], [{k: v for k, v in r.items() if k != "prompt"} for r in records]


def _prompt_lines(path: str, key: str) -> list[str]:
    file = Path(path)
    if file.is_dir():
        raise PreflightError(f"{key} = {path!r} is a folder; give a text file with one prompt per line.")
    if not file.is_file():
        rule = (" (a relative path in a recipe is read from the current folder, else from the recipe's folder)"
                if key.startswith("data.") else "")
        raise PreflightError(f"{key} = {str(file.resolve())!r}: no such file{rule}; give a text file with one "
                             "prompt per line.")
    raw = file.read_bytes()
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), raw.index(b"\x00") + 1, "NUL byte")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PreflightError(f"{key} = {path!r} is not a UTF-8 text file (byte {err.start}: {err.reason}); "
                             "give a text file with one prompt per line.") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PreflightError(f"{key} = {path!r} has no prompts (one prompt per line).")
    if str(path).endswith(".jsonl"):
        return prompts  # lines of JSON: the prompt's own length is checked in `prompt_records`
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PreflightError(f"{key} = {path!r}: prompt {number} has {len(prompt)} characters; prompts over "
                                 f"{MAX_PROMPT_CHARS} are refused (text encoders read a few hundred tokens). Is this "
                                 "the right file?")
    return prompts


def _local_folder(pretrained: str) -> Path | None:
    if pretrained.startswith("builtin:"):
        from treegrpo.builtin import BUILTIN_MODELS

        return BUILTIN_MODELS.get(pretrained.removeprefix("builtin:"))
    path = Path(pretrained).expanduser()
    return path if (path / "model_index.json").is_file() else None


def offline_not_cached(repo_id: str) -> str:
    """Why a Hub model cannot load on an offline machine (HF_HUB_OFFLINE=1) that has not cached it."""
    from huggingface_hub import constants

    return (f"not in the local Hub cache ({constants.HF_HUB_CACHE}) and the Hub is offline (HF_HUB_OFFLINE=1). "
            f"Download it on a machine with network (`hf download {repo_id}`, into the same cache), or unset "
            "HF_HUB_OFFLINE.")


def model_folder(pretrained: str) -> Path | None:
    """The diffusers folder of a local, built-in or cached Hub model (the cache's snapshot folder); None when it is
    not on this machine (a Hub id not downloaded yet)."""
    folder = _local_folder(pretrained)
    if folder is None and not looks_local(pretrained):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "model_index.json")
        folder = Path(cached).parent if isinstance(cached, str) else None
    return folder


def pipeline_config(pretrained: str) -> dict | None:
    """The pipeline's model_index.json (class name and config) without loading it: from a local or built-in folder,
    or from the local Hub cache for a Hub id; None when it is not at hand (a Hub id not downloaded yet)."""
    folder = model_folder(pretrained)
    try:
        config = json.loads((folder / "model_index.json").read_text()) if folder is not None else None
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def looks_local(pretrained: str) -> bool:
    """Whether `model.pretrained` names a local folder rather than a Hub id `org/name`."""
    return Path(pretrained).expanduser().exists() or pretrained.startswith((".", "/", "~")) \
        or pretrained.count("/") != 1


def check_pretrained(pretrained: str, key: str = "model.pretrained", *, about_to_load: bool = False) -> None:
    """A local diffusers folder must exist with a readable model_index.json that lists its components, each present.
    Hub ids cannot be checked offline and pass; `builtin:` names are checked by name. `key` names the setting in
    messages (`MODEL` for the command line's argument). `about_to_load`: also refuse a Hub id that an offline
    machine (HF_HUB_OFFLINE=1) has not cached."""
    if pretrained.startswith("builtin:"):
        from treegrpo.builtin import BUILTIN_MODELS, resolve_pretrained

        if pretrained.removeprefix("builtin:") not in BUILTIN_MODELS:
            known = ", ".join(f"builtin:{n}" for n in sorted(BUILTIN_MODELS))
            raise PreflightError(f"{key} = {pretrained!r}: unknown built-in model; known: {known}.")
        try:
            resolve_pretrained(pretrained)  # shipped, but missing from a broken install
        except FileNotFoundError as err:
            raise PreflightError(f"{key} = {pretrained!r}: {err}") from None
        return
    path = Path(pretrained).expanduser()
    if not looks_local(pretrained):
        from huggingface_hub import constants

        # `run`, `sample` and `eval` would fail to load it after the heavy imports: say so now (`check` does not:
        # a recipe may be validated offline for another machine)
        if about_to_load and constants.HF_HUB_OFFLINE and pipeline_config(pretrained) is None:
            raise PreflightError(f"{key} = {pretrained!r}: {offline_not_cached(pretrained)}")
        return
    index = path / "model_index.json"
    if not index.is_file():
        raise PreflightError(f"{key} = {pretrained!r} is neither a diffusers folder (no model_index.json "
                             "there) nor a hub id like 'org/name'. Point it at a folder saved with save_pretrained, "
                             "a hub id, or 'builtin:digits'.")
    try:
        config = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PreflightError(f"{key}: {index} is not valid JSON ({err}).") from None
    components = [name for name, value in (config.items() if isinstance(config, dict) else [])
                  if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0]]
    if not components:
        raise PreflightError(f"{key}: {index} lists no components (expected entries like "
                             '"transformer": ["diffusers", "SD3Transformer2DModel"]).')
    missing = [name for name in components if not (path / name).is_dir()]
    if missing:
        raise PreflightError(f"{key}: {path} lacks the component folders {missing} that "
                             "model_index.json lists.")


def latent_patch_pixels(pipeline_class: str, vae_scale_factor: int, patch_size: int | None) -> int:
    """Pixels per latent patch: image sizes must be multiples of it (VAE factor × the denoiser's patch size; FLUX
    packs 2×2 latents)."""
    patch = patch_size or 1
    if pipeline_class.startswith("Flux"):
        patch = max(patch, 2)
    return vae_scale_factor * patch


def image_size_problem(pipeline_class: str, vae_scale_factor: int, patch_size: int | None, height: int,
                       width: int) -> str | None:
    factor = latent_patch_pixels(pipeline_class, vae_scale_factor, patch_size)
    return size_problem(pipeline_class, factor, height, width,
                        f" (VAE factor {vae_scale_factor} × patch {factor // vae_scale_factor})")


def size_problem(pipeline_class: str, multiple: int, height: int, width: int, why: str = "") -> str | None:
    """The message for a height or width that is not a multiple of `multiple` pixels; None when both are."""
    bad = [f"sampling.{key}={value}" for key, value in (("height", height), ("width", width)) if value % multiple]
    if not bad:
        return None
    return f"{', '.join(bad)}: this {pipeline_class} needs multiples of {multiple} pixels{why}."


def _check_size_from_config(folder: Path, height: int, width: int) -> None:
    """The image-size rule read from a local folder's JSON configs (no weights loaded)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        blocks = json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]
        denoiser = folder / "transformer" / "config.json"
        patch = json.loads(denoiser.read_text()).get("patch_size") if denoiser.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return  # judged when the model loads
    problem = image_size_problem(str(index.get("_class_name", "")), 2 ** (len(blocks) - 1), patch, height, width)
    if problem:
        raise PreflightError(problem)


def preflight(recipe: Recipe, *, about_to_load: bool = False) -> None:
    """Everything about the recipe's files that can be judged without loading a model. Raises `PreflightError`.
    `about_to_load` (`run`): also whether the model can load on this machine (see `check_pretrained`)."""
    _check_prompt_files(recipe, about_to_load)
    check_pretrained(recipe.model.pretrained, about_to_load=about_to_load)
    folder = _local_folder(recipe.model.pretrained)
    if folder is not None:
        _check_size_from_config(folder, recipe.sampling.height, recipe.sampling.width)
    for table, specs in (("reward", recipe.reward), ("eval_reward", recipe.eval_reward)):
        for index, spec in enumerate(specs):
            if spec.kind == "python" and spec.function:
                from treegrpo.rewards.python import import_function

                try:
                    import_function(spec.function)
                except ValueError as err:
                    raise PreflightError(f"{table}.{index}.function = {spec.function!r}: {err}") from None
    _check_vlm_templates(recipe)
    out = Path(recipe.output.dir)
    if out.exists() and not out.is_dir():
        raise PreflightError(f"output.dir = {recipe.output.dir!r} is a file, not a folder; set output.dir to a "
                             "folder.")


def _check_prompt_files(recipe: Recipe, about_to_load: bool) -> None:
    """Both prompt files readable, and their source images (editing) what the model takes, when its class is known
    here (a local, built-in or cached model). The model's adapter imports torch and diffusers: `run` (about to load
    them anyway) asks it only when a line names a source, so its other early errors stay instant; an editing model
    given no sources is then found at setup, `check` finds it here."""
    from treegrpo.sources import SOURCE_KEY, check_sources_for

    config = pipeline_config(recipe.model.pretrained)
    pipeline_class = str(config.get("_class_name", "")) if config else ""
    for key, path in (("data.prompts", recipe.data.prompts), ("data.eval_prompts", recipe.data.eval_prompts)):
        if not path:
            continue
        _, metadata = prompt_records(path, key)
        if pipeline_class and (not about_to_load or any(SOURCE_KEY in m for m in metadata)):
            check_sources_for(metadata, pipeline_class, f"{key} = {path!r}")


def _check_vlm_templates(recipe: Recipe) -> None:
    """Every field a vlm reward's template fills in is on every line of the prompt file it will read: found by
    `check` and before the model loads, not at the first batch that lacks it."""
    read_by = {"reward": ("data.prompts", recipe.data.prompts),
               "eval_reward": ("data.eval_prompts", recipe.data.eval_prompts) if recipe.data.eval_prompts
               else ("data.prompts", recipe.data.prompts)}
    for table, specs in (("reward", recipe.reward), ("eval_reward", recipe.eval_reward)):
        for index, spec in enumerate(specs):
            if spec.kind != "vlm":
                continue
            from treegrpo.rewards.vlm import TEMPLATES, template_fields

            template = (spec.model_extra or {}).get("template") or "yes_no"
            try:
                fields = template_fields(TEMPLATES.get(template, template)) - {"prompt"}
            except ValueError as err:
                raise PreflightError(f"{table}.{index}.template: {err}") from None
            if not fields:
                continue
            key, path = read_by[table]
            for number, metadata in enumerate(prompt_records(path, key)[1], 1):
                missing = sorted(fields - set(metadata))
                if missing:
                    raise PreflightError(f"{table}.{index}.template needs {{{missing[0]}}}, but prompt {number} of "
                                         f"{key} = {path!r} has no {missing[0]!r} field (it has {sorted(metadata)}).")


def branch_factor_argument(text: str) -> int | list[int]:
    """`--branch-factor 3`, or a shape per window step `9,3` / `[9, 3]` (as `tree.branch_factor` in a recipe)."""
    parts = [part.strip() for part in text.strip().strip("[]").split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise PreflightError(f"--branch-factor {text!r}: give a whole number (children per node, e.g. 3) or one per "
                             "window step, e.g. 9,3.")
    counts = [int(part) for part in parts]
    if counts[0] < 2 or any(count < 1 for count in counts):
        raise PreflightError(f"--branch-factor {text!r}: the first window step needs at least 2 children and every "
                             "step at least 1 (e.g. 3, or 9,3).")
    return counts[0] if len(counts) == 1 else counts
