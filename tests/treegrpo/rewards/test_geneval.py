"""The shapes world (GenEval-schema prompts, scenes), its deterministic detector, GenEval's rules and the reward."""

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from treegrpo.builtin.shapes_world import (
    CATEGORIES,
    COLORS,
    SHAPES,
    Thing,
    all_prompts,
    lies,
    render,
    scene_for,
    split_prompts,
)
from treegrpo.rewards import build_reward
from treegrpo.rewards.detectors import Detection, ShapesDetector, box_color, connected_components, nearest_color
from treegrpo.rewards.geneval import GenEvalReward, classes_of, judge, relations


def fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "prompt"}


def scenes(count: int, seed: int) -> list[tuple[dict, list[Thing]]]:
    rng, records = random.Random(seed), all_prompts()
    return [(r, scene_for(r, rng)) for r in (records[rng.randrange(len(records))] for _ in range(count))]


# ---- the world ------------------------------------------------------------------------------------------------------
def test_prompts_follow_geneval_schema_and_splits_are_disjoint_with_every_category():
    records = all_prompts()
    assert len(records) == len({r["prompt"] for r in records}) == 3 + 6 + 9 + 12 + 24 + 72
    for r in records:
        assert r["tag"] in CATEGORIES and set(r) <= {"prompt", "tag", "include", "exclude"}
        assert all(set(item) <= {"class", "count", "color", "position"} for item in r["include"])
    counting = next(r for r in records if r["prompt"] == "a photo of three triangles")
    assert counting["include"] == [{"class": "triangle", "count": 3}]
    assert counting["exclude"] == [{"class": "triangle", "count": 4}]
    position = next(r for r in records if r["prompt"] == "a photo of a circle left of a square")
    assert position["include"] == [{"class": "square", "count": 1},
                                   {"class": "circle", "count": 1, "position": ["left of", 0]}]
    split = split_prompts()
    train, test = ({r["prompt"] for r in split[k]} for k in ("train", "test"))
    assert not train & test and len(train) + len(test) == len(records)
    for part in split.values():
        assert {r["tag"] for r in part} == set(CATEGORIES)
    assert 0.3 < len(test) / len(records) < 0.4


def test_scenes_hold_exactly_what_the_prompt_names():
    for record, scene in scenes(200, seed=3):
        wanted = sorted((item["class"], item.get("color")) for item in record["include"]
                        for _ in range(item["count"]))
        got = sorted((t.shape, t.color if any("color" in i for i in record["include"]) else None) for t in scene)
        assert got == wanted, record["prompt"]
        for a, b in ((a, b) for i, a in enumerate(scene) for b in scene[i + 1:]):  # no two objects touch
            assert max(abs(a.x - b.x), abs(a.y - b.y)) > (a.size + b.size) / 2
        for item in record["include"]:
            if "position" in item:
                assert lies(item["position"][0], scene[1], scene[0])


# ---- the detector ---------------------------------------------------------------------------------------------------
def test_detector_finds_every_rendered_object_with_its_shape_colour_and_place():
    detector = ShapesDetector()
    for _, scene in scenes(150, seed=5):
        found = detector.detect(render(scene))
        assert sorted((d.cls, d.color) for d in found) == sorted((t.shape, t.color) for t in scene)
        for thing in scene:
            nearest = min(found, key=lambda d: (d.x - thing.x) ** 2 + (d.y - thing.y) ** 2)
            assert abs(nearest.x - thing.x) <= 1.0 and abs(nearest.y - thing.y) <= 1.0
            assert abs(nearest.size - thing.size) <= 1.5


def test_detector_counts_no_blob_smear_or_merged_pair():
    detector = ShapesDetector()
    blob = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(blob)
    draw.line((3, 5, 28, 9), fill=COLORS["red"], width=3)  # a stroke
    draw.polygon([(4, 20), (14, 18), (9, 30), (6, 24)], fill=COLORS["blue"])  # an irregular blob
    draw.rectangle((18, 18, 30, 23), fill=COLORS["green"])  # two squares touching: one 12x5 bar
    assert detector.detect(blob) == []
    smeared = render([Thing("circle", "red", 16, 16, 10)]).filter(ImageFilter.GaussianBlur(4))
    assert detector.detect(smeared) == []
    assert [d.cls for d in detector.detect(render([Thing("circle", "red", 16, 16, 10)]))] == ["circle"]


def test_connected_components_against_a_hand_count():
    mask = np.zeros((6, 7), dtype=bool)
    mask[0, 0:3] = mask[1, 2] = True  # an L: one component
    mask[4:6, 5:7] = True  # a block
    mask[3, 0] = mask[5, 0] = True  # two single pixels (diagonal neighbours are not 4-connected)
    mask[4, 1] = True
    labels = connected_components(mask)
    assert labels.max() == 5 and (labels > 0).sum() == mask.sum()
    assert len(set(labels[0, 0:3]) | {labels[1, 2]}) == 1
    assert connected_components(np.zeros((3, 3), dtype=bool)).max() == 0
    groups = np.zeros((6, 7), dtype=np.int64)
    groups[0, 2] = groups[1, 2] = 1  # the L's corner in another colour: the L splits in two
    split = connected_components(mask, groups)
    assert split.max() == 6 and split[0, 1] != split[0, 2] and split[0, 2] == split[1, 2]


def test_colour_names_of_real_photos():
    assert nearest_color(np.array([250, 130, 30])) == "orange"
    assert nearest_color(np.array([30, 60, 200])) == "blue"
    array = np.full((40, 40, 3), 255, dtype=np.uint8)
    array[10:30, 10:30] = (200, 20, 30)
    assert box_color(array, [5.0, 5.0, 35.0, 35.0]) == "red"  # the box's centre, not its white margin


# ---- GenEval's rules ------------------------------------------------------------------------------------------------
def det(cls, x, y, color="red", size=10.0, score=0.9):
    return Detection(cls, color, x, y, size, score)


def test_relations_follow_genevals_rule():
    # offset (-10, 3), sizes 10 + 10: shrunk by 2 on each axis -> (-8, 1) / |(-10, 3)| = (-0.77, 0.10): left of
    assert relations(det("a", 0, 3), det("b", 10, 0)) == {"left of"}
    # offset (-5, -5): shrunk -> (-3, -3) / 7.07 = -0.42 each: neither direction passes 0.5
    assert relations(det("a", 0, 0), det("b", 5, 5)) == set()
    # offset (-12, -12): (-10, -10) / 16.97 = -0.59 each: left of AND above
    assert relations(det("a", 0, 0), det("b", 12, 12)) == {"left of", "above"}
    assert relations(det("a", 0, 20), det("b", 0, 0)) == {"below"}
    assert relations(det("a", 1, 1), det("b", 1, 1)) == set()


def test_judge_on_every_category():
    circle, square = det("circle", 5, 16, "blue"), det("square", 25, 16, "red")
    metadata = {r["prompt"]: fields(r) for r in all_prompts()}
    assert judge([circle, square], metadata["a photo of a circle"]).correct
    assert judge([circle, square], metadata["a photo of a circle and a square"]).correct
    assert not judge([circle], metadata["a photo of a circle and a square"]).correct
    assert judge([circle], metadata["a photo of a circle and a square"]).partial == pytest.approx(0.5)
    assert judge([circle, square], metadata["a photo of a blue circle"]).correct
    assert not judge([circle, square], metadata["a photo of a red circle"]).correct
    assert judge([circle, square], metadata["a photo of a circle left of a square"]).correct
    verdict = judge([circle, square], metadata["a photo of a circle right of a square"])
    assert not verdict.correct and verdict.failure == "circle not right of square"
    assert judge([circle, square], metadata["a photo of a blue circle and a red square"]).correct
    assert not judge([circle, square], metadata["a photo of a red circle and a blue square"]).correct
    two = [det("triangle", 5, 5), det("triangle", 20, 20)]
    assert judge(two, metadata["a photo of two triangles"]).correct
    assert not judge(two, metadata["a photo of three triangles"]).correct
    assert judge(two, metadata["a photo of three triangles"]).partial == pytest.approx(2 / 3 / 2 + 1 / 2)
    four = two + [det("triangle", 5, 20), det("triangle", 20, 5)]
    too_many = judge(four, metadata["a photo of three triangles"])  # 4 found, fewer than 4 allowed: (4-1)/4 credit
    assert not too_many.correct and too_many.partial == pytest.approx((1 + 3 / 4) / 2)


def test_colour_is_judged_on_the_most_confident_detections_as_geneval_does():
    metadata = {"include": [{"class": "circle", "count": 1, "color": "blue"}]}
    sure_red, unsure_blue = det("circle", 5, 5, "red", score=0.9), det("circle", 20, 20, "blue", score=0.5)
    assert not judge([unsure_blue, sure_red], metadata).correct
    assert judge([unsure_blue, det("circle", 5, 5, "red", score=0.1)], metadata).correct


def test_classes_of_metadata():
    record = next(r for r in all_prompts() if r["tag"] == "counting")
    assert classes_of(fields(record)) == [record["include"][0]["class"]]


# ---- the reward -----------------------------------------------------------------------------------------------------
def test_reward_scores_the_world_perfectly_and_mismatched_prompts_low():
    reward = build_reward("geneval")
    pairs = scenes(60, seed=7)
    images = [render(scene) for _, scene in pairs]
    prompts, metadata = [r["prompt"] for r, _ in pairs], [fields(r) for r, _ in pairs]
    scores, accuracy = reward.score_and_accuracy(images, prompts, metadata)
    assert scores.dtype.is_floating_point and scores.tolist() == [1.0] * 60 and accuracy == 1.0
    shifted = images[1:] + images[:1]  # each image judged against another prompt
    scores, accuracy = reward.score_and_accuracy(shifted, prompts, metadata)
    expected = [judge(ShapesDetector().detect(i), m) for i, m in zip(shifted, metadata, strict=True)]
    assert scores.tolist() == pytest.approx([v.partial for v in expected])
    assert accuracy == pytest.approx(np.mean([v.correct for v in expected])) and accuracy < 0.3
    binary = build_reward("geneval", score="binary")
    assert binary(shifted, prompts, metadata=metadata).tolist() == [float(v.correct) for v in expected]


def test_reward_errors_name_the_problem():
    with pytest.raises(ValueError, match="detector = .yolo. is not known; use one of shapes, shapes_judge, owlv2"):
        build_reward("geneval", detector="yolo")
    with pytest.raises(ValueError, match="score = 'soft' is not known"):
        build_reward("geneval", score="soft")
    image = render([Thing("circle", "red", 16, 16, 10)])
    with pytest.raises(ValueError, match="needs GenEval metadata for every prompt; image 0 has None"):
        GenEvalReward()([image], ["a photo of a circle"])
    with pytest.raises(ValueError, match="image 0 has {'tag': 'x'}"):
        GenEvalReward()([image], ["a photo of a circle"], metadata=[{"tag": "x"}])


def test_every_shape_and_colour_alone_is_detected():
    detector = ShapesDetector()
    for shape in SHAPES:
        for color in COLORS:
            found = detector.detect(render([Thing(shape, color, 16, 16, 10)]))
            assert [(d.cls, d.color) for d in found] == [(shape, color)]


def test_rewards_are_named_by_their_detector():
    assert build_reward("geneval").name == "geneval"
    assert build_reward("geneval", detector="shapes_judge").name == "geneval_judge"
    assert build_reward("ocr").name == "ocr"


def test_judge_head_decodes_cells_to_pixels_and_keeps_one_of_neighbours():
    import math

    import torch

    from treegrpo.rewards.shapes_judge import OUTPUTS, decode

    head = torch.full((1, OUTPUTS, 8, 8), -10.0)
    head[0, -3:] = 0.0  # offsets sigmoid(0) = 0.5 of a cell; size exp(0) cells
    head[0, 0, 2, 3] = 5.0  # an object at row 2, column 3 ...
    head[0, 1 + SHAPES.index("triangle"), 2, 3] = 4.0
    head[0, 1 + len(SHAPES) + list(COLORS).index("blue"), 2, 3] = 4.0
    head[0, -1, 2, 3] = math.log(10 / 4)
    head[0, 0, 2, 4] = 3.0  # ... its weaker neighbour: the same object
    head[0, 0, 6, 6] = 2.0  # a separate one
    found = decode(head, threshold=0.5)[0]
    assert [(d.cls, d.color) for d in found] == [("triangle", "blue"), ("circle", "red")]
    first = found[0]
    assert (first.x, first.y, first.size) == pytest.approx((3.5 * 4, 2.5 * 4, 10.0))
    shape_prob = math.exp(4) / (math.exp(4) + 2 * math.exp(-10))
    assert first.score == pytest.approx(1 / (1 + math.exp(-5)) * shape_prob)
    assert (found[1].x, found[1].y, found[1].size) == pytest.approx((26.0, 26.0, 4.0))


def test_dense_credit_has_the_same_terms_whether_objects_are_found_or_not():
    metadata = {"include": [{"class": "circle", "count": 1, "color": "red"},
                            {"class": "square", "count": 1, "color": "blue"}]}
    red_circle, blue_square = det("circle", 5, 5, "red"), det("square", 20, 20, "blue")
    assert judge([red_circle, blue_square], metadata).partial == 1.0
    assert judge([red_circle], metadata).partial == pytest.approx((1 + 1 + 0 + 0) / 4)  # not (1 + 1 + 0) / 3
    assert judge([], metadata).partial == 0.0
    position = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1,
                                                              "position": ["left of", 0]}]}
    assert judge([det("circle", 2, 20)], position).partial == pytest.approx((0 + 1 + 0) / 3)
    assert judge([det("circle", 25, 20), det("square", 5, 20)], position).partial == pytest.approx(2 / 3)


# ---- objects nobody asked for ---------------------------------------------------------------------------------------
def test_extra_objects_are_counted_and_forbid_fails_them():
    """GenEval's rules pass a picture full of objects nobody asked for (the no-KL shapes hack); `extra` counts them
    under either setting, and `extras = "forbid"` fails the verdict and adds the dense term asked / found."""
    one_circle = {"include": [{"class": "circle", "count": 1}]}
    circle, square, triangle = det("circle", 5, 5), det("square", 20, 20), det("triangle", 5, 25)
    allowed = judge([circle, square, triangle], one_circle)
    assert allowed.correct and allowed.partial == 1.0 and allowed.extra == 2
    forbidden = judge([circle, square, triangle], one_circle, extras="forbid")
    assert not forbidden.correct and forbidden.extra == 2 and forbidden.failure == "2 objects not asked for"
    assert forbidden.partial == pytest.approx((1 + 1 / 3) / 2)
    alone = judge([circle], one_circle, extras="forbid")
    assert alone.correct and alone.partial == 1.0 and alone.extra == 0
    # counting: 4 triangles for "two triangles": the exclude rule ((3 - 1) / 4) and the extras rule (2 / 4) both break
    two = {"include": [{"class": "triangle", "count": 2}], "exclude": [{"class": "triangle", "count": 3}]}
    four = [det("triangle", x, y) for x, y in ((5, 5), (20, 20), (5, 20), (20, 5))]
    verdict = judge(four, two, extras="forbid")
    assert verdict.extra == 2 and verdict.partial == pytest.approx((1 + 2 / 4 + 2 / 4) / 3)
    assert judge([], two, extras="forbid").partial == pytest.approx((0 + 1 + 1) / 3)  # nothing found: nothing extra


def test_reward_reports_extras_on_rendered_scenes_and_forbid_scores_them():
    metadata = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}]}] * 3
    lone = render([Thing("circle", "red", 16, 16, 10)])
    crowded = render([Thing("circle", "red", 8, 8, 10), Thing("square", "blue", 24, 24, 10)])
    very = render([Thing("circle", "red", 8, 8, 10), Thing("square", "blue", 24, 24, 10),
                   Thing("triangle", "green", 24, 8, 10)])
    prompts = ["a photo of a circle"] * 3
    allowing = build_reward("geneval", score="binary")
    assert allowing([lone, crowded, very], prompts, metadata=metadata).tolist() == [1.0, 1.0, 1.0]
    assert allowing.last_subscores["with_extra"].tolist() == [0.0, 1.0, 1.0]
    assert allowing.last_subscores["extra_objects"].tolist() == [0.0, 1.0, 2.0]
    forbidding = build_reward("geneval", score="binary", extras="forbid")
    assert forbidding([lone, crowded, very], prompts, metadata=metadata).tolist() == [1.0, 0.0, 0.0]
    dense = build_reward("geneval", extras="forbid")([lone, crowded, very], prompts, metadata=metadata)
    assert dense.tolist() == pytest.approx([1.0, (1 + 1 / 2) / 2, (1 + 1 / 3) / 2])
    with pytest.raises(ValueError, match="extras = 'none' is not known; use one of allow, forbid"):
        build_reward("geneval", extras="none")
    with pytest.raises(ValueError, match="`vocabulary` is for the owlv2 detector; the shapes detector looks for "
                                         "every class of its world"):
        build_reward("geneval", vocabulary=["dog"])
