"""`kind = "geneval"`: scores an image against its prompt's GenEval metadata (`tag`, `include`, `exclude`), the way
GenEval does, with a pluggable detector (`treegrpo.rewards.detectors`).

GenEval's rules (Ghosh et al., 2023), which `judge` follows: for each `include` item, the `count` most confident
detections of its class must exist; if the item names a `color`, all of them must have it; if it names a
`position` [relation, j], each must lie that way of every detection of include j. No `exclude` item may be
detected `count` times or more. A prompt is correct only if every rule holds (the binary score GenEval reports).

For training, the binary score gives no gradient between "nearly" and "not at all", so the default reward is the
dense partial credit: the mean over rules of how much of each holds (found / count for an include, the share of
its `count` objects found with the right colour, or found in the right relation to every object they are placed
against, (count - 1) / found for a broken exclude). Every rule is a term whether its object was found or not, so all
images of a prompt are scored on the same terms. It equals 1 exactly when the binary score does.

GenEval's rules let a picture hold objects nobody asked for (only a counting prompt's `exclude` forbids more of its
own class), and a policy trained on them learns to fill the picture: on `builtin:shapes` without the KL term, 3.7
objects an image, 92 % with extras, while the learned judge, applying the same rules, approves (docs/benchmarks.md,
"Objects nobody asked for"). So every verdict also counts the objects beyond the prompt's (`extra`: all detections of
every class the detector looks for, less the count the prompt asks for), reported as the sub-scores `with_extra` and
`extra_objects`; `extras = "forbid"` makes them a rule: the binary verdict fails on any extra object and the dense
credit gains the term asked / found.

A relation holds GenEval's way: the centre offset, shrunk on each axis by a tenth of both objects' sizes, must point
within 60 degrees of the relation's direction (its normalised component along that axis above 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from treegrpo.rewards.base import RewardBase, check_batch
from treegrpo.rewards.detectors import Detection, Detector, Owlv2Detector, ShapesDetector
from treegrpo.rewards.shapes_judge import ShapesJudgeDetector

POSITION_SHRINK = 0.1  # GenEval's threshold: a tenth of the two objects' sizes
DETECTORS = ("shapes", "shapes_judge", "owlv2")
SCORES = ("dense", "binary")
EXTRAS = ("allow", "forbid")


def relations(a: Detection, b: Detection) -> set[str]:
    """The relations ("left of", "right of", "above", "below") in which `a` lies to `b`, by GenEval's rule."""
    dx, dy = a.x - b.x, a.y - b.y
    norm = math.hypot(dx, dy)
    shrink = POSITION_SHRINK * (a.size + b.size)
    rx = math.copysign(max(abs(dx) - shrink, 0.0), dx)
    ry = math.copysign(max(abs(dy) - shrink, 0.0), dy)
    if norm == 0 or (abs(rx) < 1e-3 and abs(ry) < 1e-3):
        return set()
    rx, ry = rx / norm, ry / norm
    return {name for name, holds in (("left of", rx < -0.5), ("right of", rx > 0.5), ("above", ry < -0.5),
                                     ("below", ry > 0.5)) if holds}


@dataclass(frozen=True)
class Verdict:
    """GenEval's binary verdict on one image, the dense partial credit in [0, 1], and the first rule broken."""

    correct: bool
    partial: float
    failure: str = ""
    extra: int = 0  # objects found beyond the count the prompt asks for (all classes the detector was asked about)


def judge(detections: list[Detection], metadata: dict, extras: str = "allow") -> Verdict:
    """One image's verdict against its prompt's metadata (see the module docstring for the rules); `detections` are
    all the objects found, of any class; `extras = "forbid"` adds the rule "nothing beyond what is asked"."""
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(d.cls, []).append(d)
    include = metadata.get("include") or []
    credits, failures = [], []
    for item in include:  # every rule gives one credit term, found or not: a prompt's images score on one scale
        count = item["count"]
        found = by_class.get(item["class"], [])[:count]
        credits.append(len(found) / count)
        if len(found) < count:
            failures.append(f"{len(found)} of {count} {item['class']}")
        if "color" in item:
            credits.append(sum(d.color == item["color"] for d in found) / count)
            if len(found) == count and credits[-1] < 1:
                failures.append(f"{item['class']} not {item['color']}")
        if "position" in item:
            relation, j = item["position"]
            targets = by_class.get(include[j]["class"], [])[: include[j]["count"]]
            placed = [bool(targets) and all(relation in relations(d, t) for t in targets) for d in found]
            credits.append(sum(placed) / count)
            if len(found) == count and credits[-1] < 1:
                failures.append(f"{item['class']} not {relation} {include[j]['class']}")
    for item in metadata.get("exclude") or []:
        found = len(by_class.get(item["class"], []))
        credits.append(1.0 if found < item["count"] else (item["count"] - 1) / found)
        if found >= item["count"]:
            failures.append(f"{found} {item['class']} (fewer than {item['count']} asked)")
    asked = sum(item["count"] for item in include)
    extra = max(0, len(detections) - asked)
    if extras == "forbid":
        credits.append(asked / max(asked, len(detections), 1))
        if extra:
            failures.append(f"{extra} object{'s' if extra > 1 else ''} not asked for")
    partial = sum(credits) / len(credits) if credits else 0.0
    return Verdict(not failures and bool(credits), partial, failures[0] if failures else "", extra)


def classes_of(metadata: dict) -> list[str]:
    """The class names a prompt's metadata asks about, in order, without repeats."""
    names = [item["class"] for key in ("include", "exclude") for item in metadata.get(key) or []]
    return list(dict.fromkeys(names))


def check_metadata(metadata: dict | None, index: int) -> dict:
    if not isinstance(metadata, dict) or not isinstance(metadata.get("include"), list) or not metadata["include"]:
        raise ValueError(
            f"the geneval reward needs GenEval metadata for every prompt; image {index} has {metadata!r}. Use a "
            '.jsonl prompt file whose lines hold "include": [{"class": ..., "count": ...}] (GenEval\'s schema).')
    return metadata


class GenEvalReward(RewardBase):
    """GenEval's judgement as a reward: the dense partial credit (`score = "dense"`, default) or GenEval's binary
    verdict (`score = "binary"`); `score_and_accuracy` also returns the binary accuracy (what GenEval reports).

    Args:
        detector (`str`, defaults to "shapes"): "shapes" (the deterministic detector of `builtin:shapes`),
            "shapes_judge" (the learned judge shipped with it, an independent method no run should train on) or
            "owlv2" (transformers' open-vocabulary detector, for real models).
        score (`str`, defaults to "dense"): "dense" or "binary".
        pretrained (`str`, *optional*): the OWLv2 checkpoint (hub id or folder) for `detector = "owlv2"`, or a
            judge folder for `detector = "shapes_judge"` (default: the shipped one).
        threshold (`float`, defaults to 0.3): OWLv2's box confidence (GenEval's value).
        extras (`str`, defaults to "allow"): "allow" (GenEval's rules: objects nobody asked for are counted and
            reported, not judged) or "forbid" (any such object fails the verdict and costs dense credit).
        vocabulary (`list[str]`, *optional*): OWLv2 only: the classes it looks for besides each prompt's own, so
            extras of other classes are found (e.g. GenEval's 80 COCO names); the shapes detectors know theirs.

    `last_subscores` after each call: `with_extra` (1 where an image holds an object not asked for) and
    `extra_objects` (how many), per image.
    """

    takes_metadata = True
    subscore_names = ("with_extra", "extra_objects")  # always returned: evaluation reduces them across processes

    def __init__(self, *, detector: str = "shapes", score: str = "dense", pretrained: str | None = None,
                 threshold: float = 0.3, extras: str = "allow", vocabulary: list[str] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if detector not in DETECTORS:
            raise ValueError(f"geneval: detector = {detector!r} is not known; use one of {', '.join(DETECTORS)}.")
        if score not in SCORES:
            raise ValueError(f"geneval: score = {score!r} is not known; use one of {', '.join(SCORES)}.")
        if extras not in EXTRAS:
            raise ValueError(f"geneval: extras = {extras!r} is not known; use one of {', '.join(EXTRAS)}.")
        if detector == "shapes" and pretrained is not None:
            raise ValueError("geneval: `pretrained` names an OWLv2 checkpoint or a shapes judge folder; the shapes "
                             "detector has no weights.")
        if vocabulary is not None and detector != "owlv2":
            raise ValueError(f"geneval: `vocabulary` is for the owlv2 detector; the {detector} detector looks for "
                             f"every class of its world ({', '.join(ShapesDetector.vocabulary)}).")
        if vocabulary is not None and (not isinstance(vocabulary, list | tuple) or not vocabulary
                                       or not all(isinstance(c, str) and c for c in vocabulary)):
            raise ValueError(f"geneval: vocabulary = {vocabulary!r} must be a non-empty list of class names.")
        self.score_kind, self.extras = score, extras
        # what makes two geneval rewards' detectors the same one (`share_from`)
        self.detector_settings = (detector, pretrained, threshold, tuple(vocabulary or ()), str(device), dtype)
        # named by its detector, so `treegrpo eval --reward geneval --reward geneval:detector=shapes_judge` keeps both
        self.name = {"shapes": "geneval", "shapes_judge": "geneval_judge"}.get(detector, f"geneval_{detector}")
        self.detector: Detector
        if detector == "shapes":
            self.detector = ShapesDetector()
        elif detector == "shapes_judge":
            self.detector = ShapesJudgeDetector(pretrained)
        else:
            self.detector = Owlv2Detector(**({"pretrained": pretrained} if pretrained else {}), threshold=threshold,
                                          device=str(device), dtype=dtype)
            self.detector.vocabulary = tuple(vocabulary or ())
        self.last_verdicts: list[Verdict] = []
        self.last_subscores: dict[str, torch.Tensor] = {}

    def load(self) -> GenEvalReward:
        self.detector.load()
        return self

    def modules(self) -> list[torch.nn.Module]:
        return self.detector.modules()

    def share_from(self, earlier: list) -> None:
        """The detector of an earlier geneval reward with the same detector settings: one copy of OWLv2 (or the
        judge) in memory, and one detection pass over a batch both score (`Detector.detect_batch_once`)."""
        for other in earlier:
            if isinstance(other, GenEvalReward) and other.detector_settings == self.detector_settings:
                self.detector = other.detector
                return

    def verdicts(self, images: list[Image.Image], prompts: list[str], metadata: list[dict] | None) -> list[Verdict]:
        n = check_batch(images, prompts, "geneval")
        metadata = metadata if metadata is not None else [None] * n
        checked = [check_metadata(m, i) for i, m in enumerate(metadata)]
        vocabulary = list(self.detector.vocabulary)
        found = self.detector.detect_batch_once(list(images), [list(dict.fromkeys(classes_of(m) + vocabulary))
                                                               for m in checked])
        return [judge(detections, m, self.extras) for detections, m in zip(found, checked, strict=True)]

    def __call__(self, images, prompts, metadata: list[dict] | None = None) -> torch.Tensor:
        return self.score_and_accuracy(images, prompts, metadata)[0]

    def score_and_accuracy(self, images, prompts, metadata=None) -> tuple[torch.Tensor, float | None]:
        self.last_verdicts = self.verdicts(images, prompts, metadata)
        correct = torch.tensor([float(v.correct) for v in self.last_verdicts])
        partial = torch.tensor([v.partial for v in self.last_verdicts], dtype=torch.float32)
        extra = torch.tensor([float(v.extra) for v in self.last_verdicts])
        self.last_subscores = {"with_extra": (extra > 0).float(), "extra_objects": extra}
        scores = correct if self.score_kind == "binary" else partial
        return scores, (correct.mean().item() if len(correct) else None)
