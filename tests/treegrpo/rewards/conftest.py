"""Session fixtures: tiny reward checkpoints saved to temporary folders in their real layouts."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from treegrpo.rewards.base import ScoreMLP


def _load_helpers():
    """tiny_rewards.py by path: the suite runs with --import-mode=importlib, so test folders are not on sys.path."""
    spec = importlib.util.spec_from_file_location("treegrpo_tiny_rewards", Path(__file__).with_name("tiny_rewards.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tiny_rewards = _load_helpers()


@pytest.fixture(scope="session")
def tiny():
    """The builders and constants of tiny_rewards.py (colours, features, converters)."""
    return tiny_rewards


@pytest.fixture(name="noise_images", scope="session")
def noise_images_fixture():
    """``tiny_rewards.noise_images(n, size=24, seed=0)``: n uniform-noise RGB images."""
    return tiny_rewards.noise_images


@pytest.fixture(name="color_pairs")
def color_pairs_fixture():
    """Flat red, blue, red, blue images with prompts red, red, blue, blue: pairs 0 and 3 match."""
    return tiny_rewards.color_pairs()


# ---- fixtures: folders built once per session -----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: thread start-up and spin-waiting cost far more than they save (10x on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    model, tokenizer = tiny_rewards.tiny_clip()
    return tiny_rewards.save_clip(tmp_path_factory.mktemp("clip"), model, tokenizer)


@pytest.fixture(scope="session")
def arranged_clip_dir(tmp_path_factory):
    model, tokenizer = tiny_rewards.tiny_clip()
    return tiny_rewards.save_clip(
        tmp_path_factory.mktemp("clip_arranged"), tiny_rewards.arrange_clip(model, tokenizer), tokenizer
    )


@pytest.fixture(scope="session")
def hps_dir(tmp_path_factory):
    model, tokenizer = tiny_rewards.tiny_clip()
    return tiny_rewards.save_hps(tmp_path_factory.mktemp("hps"), model, tokenizer)


@pytest.fixture(scope="session")
def arranged_hps_dir(tmp_path_factory):
    model, tokenizer = tiny_rewards.tiny_clip()
    return tiny_rewards.save_hps(
        tmp_path_factory.mktemp("hps_arranged"), tiny_rewards.arrange_clip(model, tokenizer), tokenizer
    )


@pytest.fixture(scope="session")
def imagereward_dir(tmp_path_factory):
    vision, text, mlp = tiny_rewards.tiny_blip()
    return tiny_rewards.save_imagereward(
        tmp_path_factory.mktemp("ir"),
        tiny_rewards.blip_to_imagereward(vision, text, mlp),
        tiny_rewards.bert_tokenizer(),
    )


@pytest.fixture(scope="session")
def arranged_imagereward_dir(tmp_path_factory):
    vision, text, mlp = tiny_rewards.tiny_blip()
    tokenizer = tiny_rewards.bert_tokenizer()
    tiny_rewards.arrange_blip(vision, text, mlp, tokenizer)
    return tiny_rewards.save_imagereward(
        tmp_path_factory.mktemp("ir_arranged"), tiny_rewards.blip_to_imagereward(vision, text, mlp), tokenizer
    )


@pytest.fixture(scope="session")
def aesthetic_file(tmp_path_factory):
    """A random MLP head on the tiny CLIP's 32-d embedding, saved as the DDPO repo names it."""
    folder = tmp_path_factory.mktemp("aesthetic")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(ScoreMLP(tiny_rewards.HIDDEN).state_dict(), folder / "aesthetic-model.pth")
    return str(folder)


@pytest.fixture(scope="session")
def reward_paths(clip_dir, hps_dir, imagereward_dir, aesthetic_file):
    """The options that point each model reward at its tiny random checkpoint (the same options take hub ids)."""
    return {
        "pickscore": dict(pretrained=clip_dir, processor=clip_dir),
        "clipscore": dict(pretrained=clip_dir),
        "hpsv2": dict(pretrained=hps_dir, processor=hps_dir, clip_config=hps_dir),
        "imagereward": dict(pretrained=imagereward_dir, processor=imagereward_dir, vision_config=imagereward_dir),
        "aesthetic": dict(pretrained=aesthetic_file, clip_pretrained=clip_dir),
    }
