"""SANA: the checkpoints' DPM-Solver flow schedule, the Gemma prompt (complex human instruction, attention mask),
the transformer's timesteps, learned sigma and the DC-AE decode, each against the stock `SanaPipeline`.

Stock calls pass `use_resolution_binning=False`: with the default, SANA samples 32x32 requests at the nearest
512-px aspect-ratio bin (see `diffusers_tree.testing.sana`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, SanaTransformer2DModel  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows  # noqa: E402
from diffusers_tree.adapters.sana import SanaAdapter  # noqa: E402
from diffusers_tree.search import count_rows  # noqa: E402
from diffusers_tree.testing.sana import SANA_SCHEDULER_CONFIG, tiny_sana_pipeline  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]
CALL = {"height": 32, "width": 32, "max_sequence_length": 16}
STOCK = {**CALL, "use_resolution_binning": False}


@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_checkpoint_scheduler_keeps_its_sigmas_and_timesteps(steps):
    """SANA's scheduler wrapped by TreeSDEScheduler: a flow schedule on DPM-Solver's own grid (σ from ≈ 0.9997 to 0,
    integer timesteps ⌊1000 σ⌋), set as the pipeline sets it: `set_timesteps(n, device=...)`."""
    stock = DPMSolverMultistepScheduler(**SANA_SCHEDULER_CONFIG)
    tree = TreeSDEScheduler.from_scheduler(stock, window_start=0, window_width=1)
    assert tree.family == "flow" and tree.init_noise_sigma == stock.init_noise_sigma == 1.0
    SanaAdapter(tiny_sana_pipeline()).set_timesteps(tree, steps, torch.zeros(1, 4, 16, 16))
    stock.set_timesteps(steps, device="cpu")
    assert torch.equal(tree.sigmas, stock.sigmas) and torch.equal(tree.timesteps, stock.timesteps)
    assert tree.timesteps.dtype == torch.int64 and len(tree.sigmas) == steps + 1 and tree.sigmas[-1] == 0
    shift = SANA_SCHEDULER_CONFIG["flow_shift"]
    first = shift * 0.999 / (1 + (shift - 1) * 0.999)  # σ = 1 - 1/1000 shifted: shift·σ / (1 + (shift - 1)·σ)
    assert float(tree.sigmas[0]) == pytest.approx(first, abs=1e-6)


def test_denoiser_sees_the_stock_timesteps():
    """The tree rollout calls the transformer at the stock pipeline's timesteps × `timestep_scale` (1 for SANA;
    0.5 here, so a missing factor shows)."""
    pipe = tiny_sana_pipeline()
    pipe.transformer.register_to_config(timestep_scale=0.5)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0].item()),
                                               with_kwargs=True)
    pipe(PROMPTS[0], num_inference_steps=6, guidance_scale=1.0, output_type="latent", **STOCK)
    stock, seen[:] = list(seen), []
    tree = TreeRolloutPipeline.from_pipe(pipe, window_start=1, branch_factor=2, window_width=2)
    tree(PROMPTS[0], num_inference_steps=6, guidance_scale=1.0, output_type="latent", **CALL)
    assert seen == stock == (0.5 * tree.scheduler.timesteps.float()).tolist()


def test_encode_is_the_stock_prompt_encoding():
    """The conditional prompt carries the pipeline's default complex human instruction, the negative ("") does not;
    both come with their attention masks, which are needed: the short prompts are padded."""
    pipe = tiny_sana_pipeline()
    tree = TreeRolloutPipeline.from_pipe(pipe, window_start=1)
    cond = tree.encode(PROMPTS, guidance_scale=4.5, **CALL)
    default = SanaAdapter(pipe).complex_human_instruction
    assert default[-1] == "User Prompt: "  # the pipeline's own list, read from its signature
    embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(PROMPTS, True, negative_prompt="", max_sequence_length=16,
                                                            complex_human_instruction=default)
    torch.testing.assert_close(cond.cond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.uncond["encoder_hidden_states"], neg_embeds, rtol=0, atol=0)
    assert torch.equal(cond.cond["encoder_attention_mask"], mask)
    assert torch.equal(cond.uncond["encoder_attention_mask"], neg_mask)
    assert mask.shape == (2, 16) and 0 < int(mask.sum(1).min()) < 16  # padded, so the mask matters
    assert int(neg_mask.sum()) == 2  # "" is <bos> alone, per prompt
    tree.adapter.complex_human_instruction = None
    plain = tree.encode(PROMPTS, guidance_scale=1.0, **CALL)
    assert plain.uncond is None
    assert not torch.equal(plain.cond["encoder_hidden_states"], embeds)


@pytest.mark.parametrize("learned_sigma", [False, True], ids=["velocity", "learned-sigma"])
def test_leaves_and_images_equal_stock_pipeline(learned_sigma):
    """Leaves equal the stock pipeline's with TreeSDEScheduler swapped in (CFG, mask, timestep scaling, the
    learned-sigma halving), and so do the decoded images (the DC-AE's scaling factor)."""
    pipe = tiny_sana_pipeline()
    if learned_sigma:  # out_channels = 2 · in_channels: the pipeline keeps the first half
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe.transformer = SanaTransformer2DModel.from_config(pipe.transformer.config, out_channels=8).eval()
    k, w, s, T = 2, 2, 1, 4
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=k, window_width=w, window_start=s)
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32)
    cond = tree.encode(PROMPTS, **CALL)  # the family's default guidance, 4.5: CFG
    out = tree(PROMPTS, num_inference_steps=T, latents=roots, conditioning=cond,
               generator=torch.Generator().manual_seed(11), output_type="latent", max_batch_size=6)
    images = tree.decode(out.images, cond)

    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)
    stock = pipe(PROMPTS, num_images_per_prompt=k**w, num_inference_steps=T,
                 latents=roots.repeat_interleave(k**w, dim=0), output_type="latent", **STOCK).images
    assert stock.shape == out.images.shape == (2 * k**w, 4, 16, 16)
    torch.testing.assert_close(out.images, stock, rtol=1e-4, atol=1e-4)
    pipe.scheduler.manual_seed(11)
    stock_images = pipe(PROMPTS, num_images_per_prompt=k**w, num_inference_steps=T,
                        latents=roots.repeat_interleave(k**w, dim=0), output_type="pt", **STOCK).images
    assert images.shape == stock_images.shape == (2 * k**w, 3, 32, 32)
    torch.testing.assert_close(images, stock_images, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_rows_equal_unique_node_count(guidance):
    tree = TreeRolloutPipeline.from_pipe(tiny_sana_pipeline(), window_start=1)
    T, cfg = 5, 2 if guidance > 1 else 1
    with count_rows(tree.denoiser) as counter:
        out = tree(PROMPTS, num_inference_steps=T, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **CALL)
    assert counter.rows == out.rows == len(PROMPTS) * unique_rows(T, 3, 3, 1) * cfg  # (1 + 13 + 27) per tree


def test_latents_stay_float32_and_sizes():
    """The pipeline draws and steps latents in float32 whatever the text encoder's dtype; sizes are multiples of 32
    (the stock check), the default size is the transformer's sample size × the VAE factor."""
    tree = TreeRolloutPipeline.from_pipe(tiny_sana_pipeline(), window_start=1)
    roots = tree.prepare_roots(2, 64, 32, torch.Generator().manual_seed(0), torch.bfloat16)
    assert roots.dtype == torch.float32 and roots.shape == (2, 4, 32, 16)
    assert tree.adapter.pixels_per_patch == 32 and tree._size(None, None) == (32, 32)
    names = [name for name, _ in tree.denoiser.named_modules()]
    for target in SanaAdapter.lora_target_modules:  # in both attentions of every block
        assert sum(n.endswith("." + target) for n in names) == 2 * tree.denoiser.config.num_layers


def test_tiny_pipeline_round_trips_on_disk(tmp_path):
    """`save_pretrained` + `DiffusionPipeline.from_pretrained` (what the CLI loads) give the same pipeline, the
    tokenizer's <bos> included."""
    pipe = tiny_sana_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "SanaPipeline" and loaded.tokenizer("a red cat").input_ids[0] == 0
    images = [p(PROMPTS[0], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                **STOCK).images for p in (pipe, loaded)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
