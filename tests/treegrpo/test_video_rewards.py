"""The video reward contract (`epoch_outputs.score_reward`): image rewards score every frame and reduce per video;
`frame_reduction = "whole"` hands python rewards each video as its list of frames."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from treegrpo.recipe.schema import RewardRecipe
from treegrpo.rewards.base import RewardBase  # noqa: E402
from treegrpo.train.epoch_outputs import leaf_frames, score_reward


class FrameBrightness(RewardBase):
    """Mean pixel value of each image, and a record of what it was called with."""

    name = "brightness"

    def __init__(self, frame_reduction="mean"):
        self.frame_reduction, self.calls = frame_reduction, []

    def __call__(self, images, prompts):
        self.calls.append((images, list(prompts)))
        if isinstance(images[0], list):  # whole videos: the mean over the video's frames
            return [float(np.mean([np.asarray(f, dtype=np.float32).mean() for f in video])) for video in images]
        return [float(np.asarray(image, dtype=np.float32).mean()) for image in images]


def videos():
    """2 videos × 3 frames of 4×4 RGB, each frame one grey level, so frame scores are known exactly."""
    levels = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.2, 0.8]])  # [N, F]
    return levels[:, :, None, None, None].expand(2, 3, 3, 4, 4).clone(), (levels * 255).round()


@pytest.mark.parametrize("reduction,expected", [("mean", lambda s: s.mean(1)), ("min", lambda s: s.amin(1)),
                                                ("max", lambda s: s.amax(1))])
def test_image_rewards_score_every_frame_with_the_videos_prompt_and_reduce(reduction, expected):
    frames, levels = videos()
    reward = FrameBrightness(reduction)
    scores, accuracy = score_reward(reward, leaf_frames(frames), ["a cat", "a dog"])
    torch.testing.assert_close(scores, expected(levels))
    images, prompts = reward.calls[0]
    assert len(images) == 6 and images[0].size == (4, 4)  # one PIL image per frame
    assert prompts == ["a cat"] * 3 + ["a dog"] * 3 and accuracy is None


def test_whole_videos_reach_python_rewards_as_lists_of_frames():
    frames, levels = videos()
    reward = FrameBrightness("whole")
    scores, _ = score_reward(reward, leaf_frames(frames), ["a cat", "a dog"])
    videos_seen, prompts = reward.calls[0]
    assert [len(video) for video in videos_seen] == [3, 3] and prompts == ["a cat", "a dog"]
    torch.testing.assert_close(scores, levels.mean(1))


def test_images_are_scored_as_before():
    images = torch.full((2, 3, 4, 4), 0.5)
    reward = FrameBrightness()
    scores, _ = score_reward(reward, leaf_frames(images), ["a", "b"])
    torch.testing.assert_close(scores, torch.full((2,), 128.0))
    assert len(reward.calls[0][0]) == 2


def test_wrong_count_on_frames_names_frames_and_videos():
    frames, _ = videos()

    class Short(RewardBase):
        name = "short"

        def __call__(self, images, prompts):
            return [0.0] * 4

    short = Short()
    with pytest.raises(ValueError, match=r"returned 4 scores for 6 frames \(2 videos × 3\)"):
        score_reward(short, leaf_frames(frames), ["a", "b"])


def test_whole_videos_need_a_python_reward():
    assert RewardRecipe(kind="python", function="m:f", frame_reduction="whole").frame_reduction == "whole"
    with pytest.raises(ValidationError, match="needs a python reward"):
        RewardRecipe(kind="jpeg", frame_reduction="whole")
    with pytest.raises(ValidationError, match="frame_reduction"):
        RewardRecipe(kind="jpeg", frame_reduction="median")


def test_leaves_become_pil_images_once_for_all_rewards(monkeypatch):
    """Two rewards on a video batch: one conversion of every frame, both rewards scored from it."""

    import treegrpo.rewards
    from treegrpo.train.epoch_outputs import score_leaves

    calls, original = [], treegrpo.rewards.to_pil
    monkeypatch.setattr(treegrpo.rewards, "to_pil", lambda x: calls.append(x.shape[0]) or original(x))
    frames, levels = videos()
    first, second = FrameBrightness("mean"), FrameBrightness("max")
    second.name = "brightest"
    scores, extras = score_leaves([first, second], frames, ["a cat", "a dog"])
    assert calls == [6] and extras == {}
    torch.testing.assert_close(scores, torch.stack([levels.mean(1), levels.amax(1)]))
