"""Prompt embeddings encoded once per unique prompt per run (`data.cache_embeddings`), with the same results as
encoding every epoch."""

import json

import torch
from safetensors.torch import load_file

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler
from diffusers_tree.testing import tiny_sd3_pipeline
from treegrpo.prompt_cache import PromptEmbeddingCache
from treegrpo.recipe import load_recipe
from treegrpo.reporting import Reporter
from treegrpo.trainer import run_epoch, setup, train

from .conftest import write_recipe

QUIET = Reporter(enabled=False)


def test_cache_returns_what_encoding_returns_and_encodes_each_prompt_once():
    pipe = tiny_sd3_pipeline()
    rollout = TreeRolloutPipeline(pipe, TreeSDEScheduler.from_scheduler(pipe.scheduler))
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return rollout.encode(prompts, guidance_scale=3.0, max_sequence_length=16)

    cache = PromptEmbeddingCache(encode, "cpu")
    first = cache(["a cat", "a dog", "a cat"])
    second = cache(["a dog", "a tree", "a cat"])
    assert calls == [["a cat"], ["a dog"], ["a tree"]] and cache.encoded_prompts == 3 and len(cache) == 3
    alone = {p: rollout.encode([p], guidance_scale=3.0, max_sequence_length=16) for p in ("a cat", "a dog", "a tree")}
    for got, prompts in ((first, ["a cat", "a dog", "a cat"]), (second, ["a dog", "a tree", "a cat"])):
        batched = rollout.encode(prompts, guidance_scale=3.0, max_sequence_length=16)
        assert got.do_cfg and got.num_prompts == 3
        for name in ("cond", "uncond"):
            for key, value in getattr(batched, name).items():
                # a prompt's rows do not depend on the prompts drawn with it: exactly its own encoding...
                for row, prompt in enumerate(prompts):
                    assert torch.equal(getattr(got, name)[key][row], getattr(alone[prompt], name)[key][0])
                # ...which a batched encode matches up to the rounding of batched matmuls
                torch.testing.assert_close(getattr(got, name)[key], value, rtol=1e-5, atol=1e-6)


def test_training_encodes_each_prompt_once_and_matches_encoding_every_epoch(workdir, tiny_sd3_dir):
    # 4 prompts, 2 per epoch, 4 epochs: every prompt is drawn (several twice) but encoded once
    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=4))
    run = setup(recipe, QUIET)
    drawn = set()
    for epoch in range(4):
        run_epoch(run, epoch)
    from treegrpo.grpo import epoch_prompt_indices

    for epoch in range(4):
        drawn |= set(epoch_prompt_indices(len(run.prompts), epoch, 2, recipe.train.seed))
    assert run.prompt_cache.encoded_prompts == len(drawn) < 2 * 4

    train(load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=3), [f"output.dir={json.dumps(str(workdir / 'a'))}"]),
          reporter=QUIET)
    train(load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=3),
                      [f"output.dir={json.dumps(str(workdir / 'b'))}", "data.cache_embeddings=false"]),
          reporter=QUIET)
    cached = load_file(workdir / "a" / "final" / "pytorch_lora_weights.safetensors")
    fresh = load_file(workdir / "b" / "final" / "pytorch_lora_weights.safetensors")
    assert cached.keys() == fresh.keys()
    for key in cached:
        # the same run up to the embeddings' float rounding (batched vs one-prompt encodes, ~1e-7), which Adam's
        # first steps amplify on near-zero-gradient weights (see test_trainer's micro-batch test): compare norms
        assert float((cached[key] - fresh[key]).norm()) <= 1e-2 * float(fresh[key].norm()) + 1e-6, key


def test_offloaded_text_encoders_visit_the_accelerator_only_to_encode_new_prompts(workdir, tiny_sd3_dir):
    from treegrpo.epoch_outputs import save_samples
    from treegrpo.trainer import text_encoders

    recipe = load_recipe(write_recipe(workdir, tiny_sd3_dir, epochs=4),
                         ["model.offload_text_encoders=true", "output.samples=true"])
    run = setup(recipe, QUIET)
    encoders = text_encoders(run.pipe)
    assert len(encoders) == 3  # SD3: two CLIPs and a T5
    moves = []
    for index, encoder in enumerate(encoders):
        original = encoder.to

        def spy(*args, _original=original, _index=index, **kwargs):
            moves.append((_index, str(args[0]) if args else str(kwargs.get("device"))))
            return _original(*args, **kwargs)

        encoder.to = spy
    for epoch in range(4):
        run_epoch(run, epoch)
    encodes = run.prompt_cache.encoded_prompts  # one encoder visit per new prompt, none for cached ones
    # each new prompt: every encoder to the accelerator and back (both are the CPU here, so only counts are checked)
    assert len(moves) == 3 * 2 * encodes and 0 < encodes <= 4
    save_samples(run, workdir / "grid.png", ["a red cat"], seed=0)  # the stock pipeline encodes too
    assert len(moves) == 3 * 2 * (encodes + 1)
    assert (workdir / "grid.png").is_file()
