"""The geneval reward's OWLv2 detector on a tiny random-weight `Owlv2ForObjectDetection` saved to disk in the real
layout (model + processor), loaded as a user's checkpoint would be; checked against the model's raw outputs."""

import json

import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

from treegrpo.rewards import build_reward
from treegrpo.rewards.detectors import Owlv2Detector


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("owlv2")
    vocab = {"!": 0}  # OWLv2 treats a query whose first id is 0 as padding: BOS must not be id 0 (CLIP's is 49406)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    bos, eos = vocab.setdefault("<|startoftext|>", len(vocab)), vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=64)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def scene() -> Image.Image:
    image = Image.new("RGB", (48, 40), "white")
    image.paste((200, 30, 30), (8, 8, 24, 24))
    return image


def test_detections_are_the_models_boxes_above_the_threshold(tiny_owlv2):
    classes = ["circle", "square"]
    processor = Owlv2Processor.from_pretrained(tiny_owlv2)
    model = Owlv2ForObjectDetection.from_pretrained(tiny_owlv2).eval()
    with torch.no_grad():
        inputs = processor(text=[[f"a photo of a {c}" for c in classes]], images=scene(), return_tensors="pt")
        outputs = model(**inputs)
    logits, labels = outputs.logits[0].max(-1)  # per patch: the best query (argmax of logits: sigmoids tie at 1)
    scores = logits.sigmoid()
    threshold = scores.median().item()
    keep = scores > threshold
    side = 48  # OWLv2 pads to a square: boxes are relative to the longer side
    expected_x = (outputs.pred_boxes[0, keep, 0] * side).tolist()

    detector = Owlv2Detector(pretrained=tiny_owlv2, threshold=threshold)
    found = detector.detect(scene(), classes)
    assert len(found) == int(keep.sum()) > 0
    assert sorted(d.x for d in found) == pytest.approx(sorted(expected_x), abs=1e-4)
    assert sorted(d.score for d in found) == pytest.approx(sorted(scores[keep].tolist()), abs=1e-5)
    assert sorted(d.cls for d in found) == sorted(classes[i] for i in labels[keep].tolist())
    assert detector.modules() and not any(p.requires_grad for p in detector.modules()[0].parameters())


def test_geneval_reward_runs_on_the_owlv2_detector(tiny_owlv2):
    reward = build_reward("geneval", detector="owlv2", pretrained=tiny_owlv2, threshold=0.0).load()
    metadata = [{"tag": "single_object", "include": [{"class": "square", "count": 1}]}]
    scores, accuracy = reward.score_and_accuracy([scene()], ["a photo of a square"], metadata)
    verdict = reward.last_verdicts[0]
    assert scores.tolist() == [pytest.approx(verdict.partial)] and accuracy == float(verdict.correct)
    with pytest.raises(ValueError, match="the shapes detector has no weights"):
        build_reward("geneval", detector="shapes", pretrained=tiny_owlv2)


def test_a_batch_equals_one_image_at_a_time_with_mixed_class_lists(tiny_owlv2):
    detector = Owlv2Detector(pretrained=tiny_owlv2, threshold=0.5)
    other = Image.new("RGB", (40, 40), "white")
    other.paste((30, 60, 200), (20, 4, 36, 20))
    images, classes = [scene(), other, scene()], [["circle", "square"], ["square"], ["circle", "square"]]
    batched = detector.detect_batch(images, classes)
    single = [detector.detect(image, names) for image, names in zip(images, classes, strict=True)]
    assert len(batched) == 3 and any(batched)
    for got, want in zip(batched, single, strict=True):
        assert [(d.cls, d.color) for d in got] == [(d.cls, d.color) for d in want]
        flat = [v for d in got for v in (d.x, d.y, d.size, d.score)]
        assert flat == pytest.approx([v for d in want for v in (d.x, d.y, d.size, d.score)], abs=1e-4)
    assert all(d.cls == "square" for d in batched[1])  # never the label of another image's query list


def test_owlv2_without_scipy_or_torchvision_names_the_extra(tiny_owlv2, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("scipy", "torchvision") else real(name, *a))
    with pytest.raises(ImportError, match=r"needs scipy .* \[owlv2\] extra"):
        Owlv2Detector(pretrained=tiny_owlv2).load()


def test_owlv2_looks_for_the_vocabulary_besides_each_prompts_classes(tiny_owlv2, monkeypatch):
    """`vocabulary` reaches OWLv2's queries (after the prompt's own classes, without repeats), so an object of
    another class counts as an extra; without it only the prompt's classes are searched."""
    asked = []

    def record(self, images, classes):
        asked.extend(classes)
        return [[] for _ in images]

    monkeypatch.setattr(Owlv2Detector, "detect_batch", record)
    metadata = [{"include": [{"class": "square", "count": 1}]}]
    build_reward("geneval", detector="owlv2", pretrained=tiny_owlv2)([scene()], ["a square"], metadata=metadata)
    build_reward("geneval", detector="owlv2", pretrained=tiny_owlv2, vocabulary=["circle", "square", "dog"])(
        [scene()], ["a square"], metadata=metadata)
    assert asked == [["square"], ["square", "circle", "dog"]]
    with pytest.raises(ValueError, match=r"vocabulary = \[\] must be a non-empty list of class names"):
        build_reward("geneval", detector="owlv2", pretrained=tiny_owlv2, vocabulary=[])
