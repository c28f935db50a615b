"""The VLM judge reads what real servers answer, and never scores silently wrong: a yes/no answer without
log-probs (`transformers serve`), answers it cannot read (counted, neutral, and past `max_unreadable` a one-line
stop), ratings in the forms judges write them, templates with literal braces, and a metadata field missing from
one prompt line found by `check`."""

import pytest
import torch

from treegrpo.rewards import build_reward
from treegrpo.rewards.remote import RemoteRewardError
from treegrpo.rewards.vlm import parse_rating

from .test_remote import IMAGES, PROMPTS, fake_server


def chat(answers: list[str], logprob_tokens: list[list[str]] | None = None):
    """An OpenAI-compatible endpoint answering the i-th image (by its brightness: 0, 51, 255) with answers[i], and
    with top log-probs over `logprob_tokens[i]` (equal mass) when given; no `logprobs` field otherwise."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def respond(handler, request):
        content = request["messages"][0]["content"]
        data = next(p["image_url"]["url"] for p in content if p["type"] == "image_url").split(",", 1)[1]
        level = int(np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).mean())
        index = {0: 0, 51: 1, 255: 2}[level]
        choice = {"index": 0, "message": {"role": "assistant", "content": answers[index]}}
        if logprob_tokens is not None:
            top = [{"token": token, "logprob": -1.0} for token in logprob_tokens[index]]
            choice["logprobs"] = {"content": [{"token": answers[index][:3], "logprob": -1.0, "top_logprobs": top}]}
        return 200, {"choices": [choice]}

    return respond


def test_yes_no_answers_are_read_from_the_text_when_the_server_has_no_logprobs():
    with fake_server(chat(["Yes, it does.", "no", "YES"])) as url:
        vlm = build_reward("vlm", base_url=f"{url}/v1", model="judge", score="answer")
        assert vlm(IMAGES, PROMPTS).tolist() == [1.0, 0.0, 1.0]
        assert vlm.last_subscores["unreadable"].tolist() == [0.0, 0.0, 0.0]
        with pytest.raises(RemoteRewardError, match=r'returned no logprobs; .* or score = "answer"'):
            build_reward("vlm", base_url=f"{url}/v1", model="judge")(IMAGES, PROMPTS)


def test_answers_without_either_token_are_counted_neutral_and_past_the_limit_stop_the_run():
    tokens = [["Yes", "No"], ["The", "<think>"], ["No"]]
    with fake_server(chat(["Yes", "The image shows a cat", "No"], tokens)) as url:
        vlm = build_reward("vlm", base_url=f"{url}/v1", model="judge", max_unreadable=0.5)
        torch.testing.assert_close(vlm(IMAGES, PROMPTS), torch.tensor([0.5, 0.5, 0.0]))  # yes = no; unreadable; no
        assert vlm.last_subscores["unreadable"].tolist() == [0.0, 1.0, 0.0]
        with pytest.raises(RemoteRewardError) as error:
            build_reward("vlm", base_url=f"{url}/v1", model="judge")(IMAGES, PROMPTS)  # 1 of 3 > 0.1
    assert str(error.value) == ("1 of 3 answers of the judge 'judge' could not be read as 'yes' or 'no' (more than "
                                "max_unreadable = 0.1), e.g. 'The image shows a cat': make the template ask for "
                                "exactly that answer, or raise max_tokens for a judge that explains first.")


@pytest.mark.parametrize(("text", "rating"), [
    ("On a scale of 1 to 10, I'd give it a 7", 0.7),
    ("7/10", 0.7),
    ("8 out of 10 - good composition", 0.8),
    ("4/5", 0.8),  # the answer's own scale
    ("Rating: 3", 0.3),
    ("I rate this image 6. It shows 3 cats.", 0.6),
    ("Score: 4.5", 0.45),
    ("1-10: 9", 0.9),
    ("10", 1.0),
    ("85", None),  # not on a 1-10 scale: unreadable, not a clamped 1.0
    ("-3", None),
    ("12/10", None),
    ("no idea", None),
])
def test_ratings_are_read_in_the_forms_judges_write_them(text, rating):
    assert parse_rating(text, 10.0) == (pytest.approx(rating) if rating is not None else None)


def test_parse_scores_unreadable_ratings_as_neutral_and_counts_them():
    with fake_server(chat(["Rating: 8", "85", "On a scale of 1 to 10: 2"])) as url:
        vlm = build_reward("vlm", base_url=f"{url}/v1", model="judge", template="quality", max_unreadable=0.5)
        torch.testing.assert_close(vlm(IMAGES, PROMPTS), torch.tensor([0.8, 0.5, 0.2]))
        assert vlm.last_subscores["unreadable"].tolist() == [0.0, 1.0, 0.0]


def test_templates_with_literal_braces():
    with pytest.raises(ValueError, match=r"fields \['\"score\"'\], which are not names: write literal braces "
                                         r"doubled, \{\{ and \}\}"):
        build_reward("vlm", base_url="http://x/v1", model="m", template='Rate {prompt}; answer {"score": N}')
    with pytest.raises(ValueError, match=r"write literal braces doubled"):
        build_reward("vlm", base_url="http://x/v1", model="m", template="Rate {prompt")
    vlm = build_reward("vlm", base_url="http://x/v1", model="m", template='Rate {prompt}; answer {{"score": N}}')
    assert vlm.question("a cat", {}) == 'Rate a cat; answer {"score": N}'


def test_check_finds_a_template_field_missing_from_one_prompt_line(workdir, tiny_sd3_dir):
    from typer.testing import CliRunner

    from treegrpo.app import app

    from ..conftest import write_recipe

    (workdir / "prompts.jsonl").write_text('{"prompt": "a sign", "text": "OPEN"}\n{"prompt": "a mug"}\n')
    path = write_recipe(workdir, tiny_sd3_dir)
    text = path.read_text().replace('kind = "python"\nfunction = "test_rewards:brightness"',
                                    'kind = "vlm"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "judge"\n'
                                    'template = "Does the image of {prompt} read {text}? Yes or No."')
    path.write_text(text.replace('prompts = "prompts.txt"', 'prompts = "prompts.jsonl"'))
    result = CliRunner().invoke(app, ["check", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code != 0
    assert "reward.0.template needs {text}, but prompt 2 of data.prompts" in " ".join(result.output.split())


def test_edit_template_shows_the_source_then_the_edit():
    """Editing prompts: each request carries the source image first, then the edit, then the question; the "edit"
    template without sources fails with one line instead of asking about one image."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    seen = []

    def respond(handler, request):
        content = request["messages"][0]["content"]
        levels = [int(np.asarray(Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))))
                      .mean()) for p in content if p["type"] == "image_url"]
        seen.append((levels, content[-1]["text"]))
        answer = "Yes" if levels[0] != levels[1] else "No"  # an "edit" that changed nothing is refused
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}

    sources = [Image.new("RGB", (8, 8), (51, 51, 51))] * len(IMAGES)
    with fake_server(respond) as url:
        vlm = build_reward("vlm", base_url=f"{url}/v1", model="judge", template="edit", score="answer", parallel=1)
        scores = vlm(IMAGES, PROMPTS, source_images=sources)
        with pytest.raises(ValueError, match='template "edit" shows the judge each source image, but the prompts'):
            vlm(IMAGES, PROMPTS)
    assert [levels for levels, _ in seen] == [[51, 0], [51, 51], [51, 255]]
    assert scores.tolist() == [1.0, 0.0, 1.0]
    assert seen[0][1].startswith("The first image is the original; the second was edited from it for the "
                                 f'instruction "{PROMPTS[0]}"')
