"""A run whose reward lives behind HTTP (the reference server on the loopback interface) and whose prompts come
from a `.jsonl` file with metadata: it trains end to end, the metadata reaches the reward, sub-scores reach the
metrics; and `.jsonl` mistakes are one line."""

import json
import threading

import numpy as np
import pytest
import torch

from treegrpo.commands.reward_server import make_server
from treegrpo.recipe.loading import load_recipe
from treegrpo.recipe.preflight import PreflightError, prompt_records
from treegrpo.rewards.base import RewardBase  # noqa: E402
from treegrpo.run.reporting import Reporter
from treegrpo.train.trainer import train

from .conftest import write_recipe

RECORDS = [{"prompt": "a red cat", "target": 0.2, "tag": "colors"},
           {"prompt": "a blue dog", "target": 0.8, "tag": "colors"},
           {"prompt": "a green tree", "target": 0.5, "tag": "counting", "objects": ["tree"]}]


class TargetBrightness(RewardBase):
    """Closeness of the image's brightness to its prompt's metadata target; records what it was sent."""

    name, takes_metadata = "target", True

    def __init__(self):
        self.requests = []

    def __call__(self, images, prompts, metadata=None):
        self.requests.append((list(prompts), list(metadata)))
        brightness = torch.tensor([float(np.asarray(image.convert("L"), dtype=np.float64).mean()) / 255
                                   for image in images])
        self.last_subscores = {"brightness": brightness}
        return -(brightness - torch.tensor([m["target"] for m in metadata])).abs()


def test_http_reward_and_jsonl_prompts_train_end_to_end(workdir, tiny_sd3_dir):
    (workdir / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    reward = TargetBrightness()
    server = make_server(reward, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = write_recipe(workdir, tiny_sd3_dir, epochs=2)
        text = path.read_text().replace('kind = "python"\nfunction = "test_rewards:brightness"',
                                        f'kind = "http"\nurl = "http://127.0.0.1:{server.server_address[1]}/score"'
                                        '\nbatch_size = 3')
        path.write_text(text.replace('prompts = "prompts.txt"', 'prompts = "prompts.jsonl"'))
        final = train(load_recipe(path), reporter=Reporter(enabled=False))
    finally:
        server.shutdown()
        server.server_close()
    metrics = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1] and (final / "pytorch_lora_weights.safetensors").is_file()
    # every scored image came with its own prompt's metadata, the prompt itself removed from it
    by_prompt = {r["prompt"]: {k: v for k, v in r.items() if k != "prompt"} for r in RECORDS}
    sent = [(p, m) for prompts, metadata in reward.requests for p, m in zip(prompts, metadata, strict=True)]
    assert sent and all(by_prompt[p] == m for p, m in sent)
    assert len(sent) == 2 * 2 * 4  # 2 epochs × 2 prompts × 4 leaves (k = 2, w = 2)
    # the server's sub-score reaches the metrics, as the mean over the epoch's leaves
    assert all(0 <= m["reward/http/brightness"] <= 1 for m in metrics)
    assert all(m["reward/http/mean"] <= 0 for m in metrics)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a cat"', "line 2 is not JSON"),
    ('{"text": "a cat"}', 'line 2 has no "prompt" string'),
    ('["a cat"]', 'line 2 has no "prompt" string'),
])
def test_jsonl_mistakes_are_one_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a dog", "tag": "animals"}\n' + line + "\n")
    with pytest.raises(PreflightError, match=message):
        prompt_records(str(path))


def test_text_files_keep_working_with_empty_metadata(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a dog\n# a comment\na cat\n")
    assert prompt_records(str(path)) == (["a dog", "a cat"], [{}, {}])
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a dog", "objects": ["dog"], "count": 1}\n\n')
    assert prompt_records(str(jsonl)) == (["a dog"], [{"objects": ["dog"], "count": 1}])


def test_check_says_whether_each_reward_server_accepts_connections(workdir, tiny_sd3_dir):
    from typer.testing import CliRunner

    from treegrpo.app import app

    server = make_server(TargetBrightness(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = f"http://127.0.0.1:{server.server_address[1]}/score"
        path = write_recipe(workdir, tiny_sd3_dir)
        path.write_text(path.read_text().replace('kind = "python"\nfunction = "test_rewards:brightness"',
                                                 f'kind = "http"\nurl = "{up}"'))
        result = CliRunner().invoke(app, ["check", str(path)], env={"COLUMNS": "250"})
        assert result.exit_code == 0 and f"{up}: accepts connections" in result.output, result.output
    finally:
        server.shutdown()
        server.server_close()
    result = CliRunner().invoke(app, ["check", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and f"{up}: NOT reachable now" in result.output, result.output


def test_recipe_names_the_missing_server_options():
    from pydantic import ValidationError

    from treegrpo.recipe.schema import RewardRecipe

    with pytest.raises(ValidationError, match=r"reward kind 'http' needs url \(e\.g\. url = "):
        RewardRecipe(kind="http")
    with pytest.raises(ValidationError, match="reward kind 'vlm' needs base_url, model"):
        RewardRecipe(kind="vlm", template="quality")
