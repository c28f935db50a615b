"""Hub ids go through huggingface_hub/transformers, so a hub cache works offline: the tiny checkpoints are put in
a hand-made cache under hub ids and scored in a fresh process with HF_HUB_OFFLINE=1 (read at import time), and the
scores must equal those loaded from the folders."""

import json
import os
import shutil
import subprocess
import sys

import torch

from treegrpo.rewards import build_reward

SHA = "0123456789abcdef0123456789abcdef01234567"
SCRIPT = """
import json
from PIL import Image
from treegrpo.rewards import build_reward

images = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (20, 12), (10, 200, 30))]
prompts = ["red", "a photo of a cat"]
rewards = {
    "pickscore": build_reward("pickscore", pretrained="tiny/clip", processor="tiny/clip"),
    "clipscore": build_reward("clipscore", pretrained="tiny/clip"),
    "hpsv2": build_reward("hpsv2", pretrained="tiny/hps", processor="tiny/hps", clip_config="tiny/hps"),
    "imagereward": build_reward("imagereward", pretrained="tiny/ir", processor="tiny/ir", vision_config="tiny/ir"),
    "aesthetic": build_reward("aesthetic", pretrained="tiny/aesthetic", clip_pretrained="tiny/clip"),
}
result = {kind: reward(images, prompts).tolist() for kind, reward in rewards.items()}
try:
    build_reward("aesthetic", pretrained="tiny/not-cached", clip_pretrained="tiny/clip").load()
except Exception as error:
    result["uncached"] = type(error).__name__
print(json.dumps(result))
"""


def _cache(cache, repo_id, folder):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(folder, repo / "snapshots" / SHA)


def test_hub_ids_load_from_an_offline_cache(tmp_path, clip_dir, hps_dir, imagereward_dir, aesthetic_file, color_pairs):
    from PIL import Image

    cache = tmp_path / "hub"
    for repo_id, folder in [
        ("tiny/clip", clip_dir),
        ("tiny/hps", hps_dir),
        ("tiny/ir", imagereward_dir),
        ("tiny/aesthetic", aesthetic_file),
    ]:
        _cache(cache, repo_id, folder)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "home"),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from_cache = json.loads(run.stdout.strip().splitlines()[-1])

    images = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (20, 12), (10, 200, 30))]
    prompts = ["red", "a photo of a cat"]
    local = {
        "pickscore": build_reward("pickscore", pretrained=clip_dir, processor=clip_dir),
        "clipscore": build_reward("clipscore", pretrained=clip_dir),
        "hpsv2": build_reward("hpsv2", pretrained=hps_dir, processor=hps_dir, clip_config=hps_dir),
        "imagereward": build_reward(
            "imagereward", pretrained=imagereward_dir, processor=imagereward_dir, vision_config=imagereward_dir
        ),
        "aesthetic": build_reward("aesthetic", pretrained=aesthetic_file, clip_pretrained=clip_dir),
    }
    for kind, reward in local.items():
        torch.testing.assert_close(torch.tensor(from_cache[kind]), reward(images, prompts), msg=kind)
    assert from_cache["uncached"] == "LocalEntryNotFoundError"  # fails fast offline, no retries
