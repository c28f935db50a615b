"""Source images of editing prompts: a `.jsonl` prompt line's `image`, a path relative to the `.jsonl` file.

Editing models (FLUX.1 Kontext, ...) take a source image and an instruction. The prompt file names the source on
each line (`{"prompt": "make the circle blue", "image": "scenes/0001.png"}`), or a list of them for the families
that take several (FLUX.2's references, Qwen-Image-Edit-Plus: `"image": ["person.png", "hat.png"]`, the first
being the image edited); `prompt_records` resolves the paths to absolute ones in the line's metadata, so the
rewards that take metadata see them, the prompt-embedding cache keys on them, and `check` judges every file before
a model loads. Rewards that take sources see each line's first. Pillow only: `check` imports no torch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from treegrpo.errors import UsageError

SOURCE_KEY = "image"  # the `.jsonl` field that names a prompt's source image
MIN_SOURCE_PIXELS = 16  # a side shorter than one latent patch (8 px VAE × 2 px packing) encodes to nothing


class SourceImageError(UsageError):
    """A prompt line's source image is missing, unreadable or unusable; exit code 2."""


def resolve_source(value, prompt_file: str | Path, key: str, line: int | None) -> str | list[str]:
    """The absolute path of a line's `image` value (relative to the prompt file's folder), checked readable, or the
    paths of a list of them. With `line` None, `value` is a command-line argument `key`, relative to the current
    folder (`prompt_file`)."""
    where = f"{key} = {str(prompt_file)!r}: line {line}" if line is not None else key
    if isinstance(value, list) and line is not None and value:
        return [resolve_source(item, prompt_file, key, line) for item in value]
    if not isinstance(value, str) or not value:
        raise SourceImageError(f'{where} has "image": {value!r}; give the source image as a path string, relative '
                               'to the .jsonl file, like "image": "sources/cat.png" (or a list of them, like '
                               '["person.png", "hat.png"], for a model that takes several).')
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (Path(prompt_file).resolve().parent if line is not None else Path(prompt_file).resolve()) / path
    if not path.is_file():
        rule = "image paths are relative to the .jsonl file's folder" if line is not None else \
            "a relative path is read from the current folder"
        raise SourceImageError(f"{where}: source image {value!r} ({path}) does not exist; {rule}.")
    width, height = source_size(str(path), where)
    if min(width, height) < MIN_SOURCE_PIXELS:
        raise SourceImageError(f"{where}: source image {value!r} is {width}x{height} pixels; sources need at least "
                               f"{MIN_SOURCE_PIXELS} pixels a side.")
    return str(path)


def source_size(path: str, where: str) -> tuple[int, int]:
    """(width, height) of an image file; one line naming the file when Pillow cannot read it."""
    stat = Path(path).stat()
    try:
        return _verified_size(path, stat.st_mtime_ns, stat.st_size)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise SourceImageError(f"{where}: source image {path!r} is not a readable image ({err}).") from None


@lru_cache(maxsize=65536)
def _verified_size(path: str, mtime_ns: int, size: int) -> tuple[int, int]:
    """Each file verified once per process (keyed by its modification time and size): `check`, the run's setup and
    its evaluation prompts all read the same files."""
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # the whole file, not only the header: a truncated PNG fails here, not in epoch 40
        return image.size


def source_paths(metadata: list[dict] | None) -> list[str | list[str] | None] | None:
    """Each prompt's source image path (a list of them for a line naming several), or None when no prompt has one
    (text-to-image data)."""
    if not metadata or not any(SOURCE_KEY in m for m in metadata):
        return None
    return [m.get(SOURCE_KEY) for m in metadata]


def load_source_images(paths: list) -> list:
    """The source images as RGB PIL images, one per path, a list of them per list of paths (each file decoded once
    per process): the `image` argument of the rollout's `encode`."""
    # a copy: a reward that draws on its image changes no other's
    return [[_load(p).copy() for p in path] if isinstance(path, (list, tuple)) else _load(path).copy()
            for path in paths]


def first_sources(paths: list) -> list[str]:
    """Each line's first source (the image edited): what rewards compare an edit with."""
    return [path[0] if isinstance(path, (list, tuple)) else path for path in paths]


def sources_of_line(path) -> list[str]:
    """A line's source paths as a list (one or several)."""
    return list(path) if isinstance(path, (list, tuple)) else [path]


def source_argument(path: str | list[str] | None) -> dict:
    """`{"image": PIL image}` (a list of them for a line naming several) for a stock editing pipeline's call of ONE
    prompt, or nothing for text-to-image prompts. One prompt per call: the stock pipelines read a list of images
    differently (FLUX.2: several references for every prompt; Kontext and Qwen-Image-Edit: tiled across the prompts'
    images in the wrong order)."""
    return {} if path is None else {"image": load_source_images([path])[0]}


@lru_cache(maxsize=64)  # an epoch's prompts per process, a few dozen: 1024² sources are 3 MB each decoded
def _load(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def check_sources_for(metadata: list[dict], pipeline_class: str, key: str) -> None:
    """`check_sources` against the family adapter of `pipeline_class` (what `check`, `run`'s setup and `sample`/
    `eval` all ask); a class without an adapter is not judged here (its loader reports it unsupported). Imports
    torch and diffusers."""
    from diffusers_tree.adapters import adapter_class

    adapter = adapter_class(pipeline_class)
    if adapter is not None:
        check_sources(metadata, adapter.takes_source_image, pipeline_class, key,
                      needs_source=adapter.needs_source_image, max_sources=adapter.max_sources)


def check_sources(metadata: list[dict], takes_source: bool, pipeline_class: str, key: str,
                  needs_source: bool = True, max_sources: int | None = 1) -> None:
    """A prompt file's sources (its lines' `metadata`) against the model: an editing pipeline needs one on every line,
    a text-to-image pipeline none, one that takes them optionally (FLUX.2's references) one on every line or on none;
    at most `max_sources` on a line (None: any number), as many on every line, and one run's sources share a size (a
    batch shares their tokens' positions)."""
    paths = [m.get(SOURCE_KEY) for m in metadata]
    missing = [line for line, path in enumerate(paths, 1) if path is None]
    if takes_source and not needs_source and 0 < len(missing) < len(paths):
        raise SourceImageError(f"{key}: line {missing[0]} has no \"image\" but other lines do ({len(missing)} lines "
                               f"lack one); {pipeline_class} takes a reference image on every line of a run or on "
                               "none (one batch shares the reference tokens' positions).")
    if takes_source and needs_source and missing:
        raise SourceImageError(f"{key}: line {missing[0]} has no \"image\" ({len(missing)} lines lack one); "
                               f"{pipeline_class} edits a source image, so every line needs one, like "
                               '{"prompt": "make the circle blue", "image": "sources/0001.png"}.')
    named = [line for line, path in enumerate(paths, 1) if path is not None]
    if not takes_source and named:
        raise SourceImageError(f"{key}: line {named[0]} names a source image but "
                               f"{pipeline_class} is a text-to-image pipeline; use an editing model "
                               "(FluxKontextPipeline) or drop the \"image\" fields.")
    counts = {line: len(sources_of_line(path)) for line, path in enumerate(paths, 1) if path is not None}
    too_many = next((line for line, count in counts.items() if max_sources is not None and count > max_sources), None)
    if too_many is not None:
        raise SourceImageError(f"{key}: line {too_many} names {counts[too_many]} source images; {pipeline_class} "
                               f"takes {max_sources} per prompt{'' if max_sources == 1 else ' at most'}.")
    if len(set(counts.values())) > 1:
        (line_a, count_a), (line_b, count_b) = next(
            (first, other) for first in counts.items() for other in counts.items() if other[1] != first[1])
        raise SourceImageError(f"{key}: line {line_a} names {count_a} source image(s), line {line_b} {count_b}; one "
                               "run's lines must name as many (a batch shares their tokens' positions).")
    sizes = {}
    for line, path in enumerate(paths, 1):
        for one in sources_of_line(path) if path is not None else ():
            sizes.setdefault(source_size(one, f"{key}: line {line}"), line)
    if len(sizes) > 1:
        (first, line_a), (second, line_b) = list(sizes.items())[:2]
        raise SourceImageError(f"{key}: the source images differ in size (line {line_a}: {first[0]}x{first[1]}, "
                               f"line {line_b}: {second[0]}x{second[1]}); one run's sources must share a size (a "
                               "batch shares their tokens' positions): resize them to one size first.")
