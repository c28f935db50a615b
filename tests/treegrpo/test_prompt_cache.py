"""Prompt embeddings encoded once per unique prompt per run (`data.cache_embeddings`), with the same results as
encoding every epoch."""

import json

import torch
from safetensors.torch import load_file

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler
from diffusers_tree.testing import tiny_sd3_pipeline
from treegrpo.recipe.loading import load_recipe
from treegrpo.run.prompt_cache import PromptEmbeddingCache
from treegrpo.run.reporting import Reporter
from treegrpo.run.setup import setup
from treegrpo.train.trainer import run_epoch, train

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
    from treegrpo.train.grpo import epoch_prompt_indices

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
    from treegrpo.run.setup import text_encoders
    from treegrpo.train.epoch_outputs import save_samples

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
    visits = 0
    for epoch in range(4):
        before = run.prompt_cache.encoded_prompts
        run_epoch(run, epoch)
        visits += run.prompt_cache.encoded_prompts > before
    # every encoder to the accelerator and back once per epoch that draws new prompts (both devices are the CPU
    # here, so the moves are counted), not once per new prompt (24 moves for 4 prompts before), none for cached ones
    encodes = run.prompt_cache.encoded_prompts
    assert encodes > visits >= 1, (encodes, visits)  # several new prompts share a visit in some epoch
    assert len(moves) == 3 * 2 * visits
    save_samples(run, workdir / "grid.png", ["a red cat"], seed=0)  # the stock pipeline encodes too
    assert len(moves) == 3 * 2 * (visits + 1)
    assert (workdir / "grid.png").is_file()


def test_what_every_prompt_shares_is_stored_once_on_the_cpu():
    """The negative prompt's rows are the same for every prompt and the `shared` tensors (FLUX's ids) the same for
    every encode: one stored copy each (one per prompt before, the ids on the accelerator), and the returned
    conditioning equals encoding every prompt alone."""
    from diffusers_tree.testing import tiny_flux_pipeline

    pipe = tiny_sd3_pipeline()
    rollout = TreeRolloutPipeline(pipe, TreeSDEScheduler.from_scheduler(pipe.scheduler))
    cache = PromptEmbeddingCache(lambda p: rollout.encode(p, guidance_scale=3.0, max_sequence_length=16), "cpu")
    prompts = ["a cat", "a big red dog", "a tree"]
    got = cache(prompts)
    assert cache._common_uncond is not None and all(cache._rows[p, None].uncond is None for p in prompts)
    for row, prompt in enumerate(prompts):
        alone = rollout.encode([prompt], guidance_scale=3.0, max_sequence_length=16)
        for name in ("cond", "uncond"):
            for key, value in getattr(alone, name).items():
                assert torch.equal(getattr(got, name)[key][row], value[0])

    flux = tiny_flux_pipeline()
    flux_rollout = TreeRolloutPipeline(flux, TreeSDEScheduler.from_scheduler(flux.scheduler))
    flux_cache = PromptEmbeddingCache(
        lambda p: flux_rollout.encode(p, max_sequence_length=16, height=32, width=32), "cpu")
    out = flux_cache(prompts)
    assert set(out.shared) and all(not cache_part.shared for cache_part in flux_cache._rows.values())
    alone = flux_rollout.encode(prompts[:1], max_sequence_length=16, height=32, width=32)
    for key, value in alone.shared.items():
        assert torch.equal(out.shared[key], value) if isinstance(value, torch.Tensor) else out.shared[key] == value


def test_offloaded_text_encoders_never_visit_the_accelerator_at_load(tiny_sd3_dir):
    """The whole pipeline went to the accelerator first and the encoders left afterwards, so the load-time peak was
    the whole pipeline (FLUX.2 dev ≈ 64 + 48 GB on an 80 GB card). "meta" stands in for the accelerator: whatever
    visits it loses its values, so the encoders must still hold real CPU tensors."""
    from treegrpo.model.loading import load_pipeline
    from treegrpo.run.setup import text_encoders

    pipe = load_pipeline(str(tiny_sd3_dir), device="meta", text_encoders_on_cpu=True).pipe
    assert len(text_encoders(pipe)) == 3
    for encoder in text_encoders(pipe):
        assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}
    assert {p.device.type for p in pipe.vae.parameters()} == {"meta"}
    everything = load_pipeline(str(tiny_sd3_dir), device="meta").pipe
    assert {p.device.type for p in text_encoders(everything)[0].parameters()} == {"meta"}
