"""Qwen-Image: the prompt template, padded prompt embeddings, true CFG with its norm rescale, decoding, round trips.

The generic tests (parametrized over TINY_PIPELINES) cover rows = the unique-node formula with CFG (guidance 4)
and without (guidance 1), and leaves = the stock pipeline with `TreeSDEScheduler` swapped in without CFG; the
stock comparison with CFG is here, since the stock pipeline guides only when given a negative prompt.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler  # noqa: E402
from diffusers_tree.adapters import Conditioning  # noqa: E402
from diffusers_tree.testing import TINY_PIPELINES, rescoring_ratio_error  # noqa: E402
from diffusers_tree.testing.qwenimage import tiny_qwen_tokenizer, tiny_qwenimage_pipeline  # noqa: E402

PROMPTS = ["a red cat", "a photo of a big blue dog on the street"]  # 3 and 10 words: different lengths
SIZE = {"height": 32, "width": 32}
LENGTH = TINY_PIPELINES["qwenimage"][1]["max_sequence_length"]


@pytest.fixture(scope="module")
def tree():
    return TreeRolloutPipeline.from_pipe(tiny_qwenimage_pipeline(), window_start=1)


def test_template_prefix_is_the_dropped_token_count(tree):
    """The tiny tokenizer splits the template as Qwen2's does: 34 prefix tokens (dropped), then the prompt and the
    5 suffix tokens `<|im_end|> \\n <|im_start|> assistant \\n`, which the pipeline keeps."""
    pipe, tokenizer = tree.pipe, tiny_qwen_tokenizer()
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert tokenizer.unk_token_id not in tokenizer(pipe.prompt_template_encode.format("a red cat")).input_ids
    cond = tree.encode(PROMPTS, max_sequence_length=LENGTH, **SIZE).cond
    assert cond["encoder_hidden_states"].shape == (2, LENGTH, 32)
    mask = cond["encoder_hidden_states_mask"]
    assert mask.sum(dim=1).tolist() == [3 + 5, 10 + 5]
    assert torch.equal(cond["encoder_hidden_states"].abs().sum(dim=-1) > 0, mask.bool())  # zeros where masked


def test_guidance_scale_alone_turns_cfg_on(tree):
    """Above 1, CFG runs against the negative prompt, `" "` by default; cond and uncond share one padded length."""
    assert not tree.encode(PROMPTS, max_sequence_length=LENGTH, **SIZE).do_cfg  # default 1: the stock default call
    cond = tree.encode(PROMPTS, guidance_scale=4.0, max_sequence_length=LENGTH, **SIZE)
    explicit = tree.encode(PROMPTS, guidance_scale=4.0, negative_prompt=" ", max_sequence_length=LENGTH, **SIZE)
    assert cond.do_cfg
    for key, value in cond.uncond.items():
        assert value.shape[:2] == cond.cond[key].shape[:2] == (2, LENGTH)
        torch.testing.assert_close(value, explicit.uncond[key])
    stock, _ = tree.pipe.encode_prompt(" ", max_sequence_length=LENGTH)
    torch.testing.assert_close(cond.uncond["encoder_hidden_states"][:, :stock.shape[1]], stock.expand(2, -1, -1))
    assert (cond.uncond["encoder_hidden_states"][:, stock.shape[1]:] == 0).all()
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        tree.encode(PROMPTS, guidance_scale=4.0, negative_prompt=["blue"], max_sequence_length=LENGTH, **SIZE)


def test_masked_padding_changes_outputs_by_rounding_only(tree):
    """A short prompt padded to a longer one's length (any values at the masked positions) and batched with it
    gives the outputs each prompt gives alone, unpadded and unmasked, as the stock pipeline runs them."""
    transformer, cond = tree.denoiser, tree.encode(PROMPTS, max_sequence_length=LENGTH, **SIZE).cond
    embeds, mask = cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]
    lengths = mask.sum(dim=1).tolist()
    latents = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([0.7, 0.7])
    noisy = embeds.clone()
    noisy[mask == 0] = torch.randn(int((mask == 0).sum()), 32)  # masked positions must not matter

    def forward(rows, hidden, hidden_mask):
        return transformer(hidden_states=latents[rows], timestep=timestep[rows], encoder_hidden_states=hidden,
                           encoder_hidden_states_mask=hidden_mask, img_shapes=[[(1, 8, 8)]] * len(rows),
                           return_dict=False)[0]

    with torch.no_grad():
        batched = forward([0, 1], noisy, mask)
        alone = torch.cat([forward([p], embeds[p:p + 1, :n], None) for p, n in enumerate(lengths)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert not torch.equal(batched[0], batched[1])


def test_combine_guidance_rescales_to_the_conditional_norm(tree):
    # u = (1, 0), c = (0, 1), g = 2: u + g·(c - u) = (-1, 2), rescaled to |c| = 1: (-1, 2) / √5
    conditioning = Conditioning(cond={}, uncond=None, guidance_scale=2.0, **SIZE)
    guided = tree.adapter.combine_guidance(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]]), conditioning)
    torch.testing.assert_close(guided, torch.tensor([[[-1.0, 2.0]]]) / 5**0.5)
    u, c = torch.randn(2, 3, 64, 16).unbind(0)
    conditioning.guidance_scale = 4.0
    torch.testing.assert_close(tree.adapter.combine_guidance(u, c, conditioning).norm(dim=-1), c.norm(dim=-1))


def test_cfg_leaves_equal_stock_pipeline_with_tree_scheduler():
    """True CFG with prompts and negative prompts of different lengths: the stock pipeline runs cond and uncond as
    separate forwards, the tree one padded [uncond; cond] batch; equal up to float rounding. The stock call gets
    each prompt repeated rather than `num_images_per_prompt`: with that and prompts of different lengths, diffusers
    0.42.1's `encode_prompt` pairs the masks with the wrong prompts (huggingface/diffusers#13581)."""
    pipe = tiny_qwenimage_pipeline()
    k, w, s, T, negative = 2, 2, 1, 5, ["blue", "a small green tree"]
    tree = TreeRolloutPipeline.from_pipe(pipe, branch_factor=k, window_width=w, window_start=s)
    roots = tree.prepare_roots(2, 32, 32, torch.Generator().manual_seed(5), torch.float32)
    out = tree(PROMPTS, num_inference_steps=T, latents=roots, guidance_scale=4.0, negative_prompt=negative,
               generator=torch.Generator().manual_seed(11), output_type="latent", max_batch_size=6,
               max_sequence_length=LENGTH, **SIZE)
    assert out.rows == 2 * 2 * (s + 1 + k + k**w * (T - s - w))  # CFG halves counted

    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, branch_factor=k, window_width=w,
                                                     window_start=s).manual_seed(11)

    def repeat(texts):
        return [text for text in texts for _ in range(k**w)]

    stock = pipe(repeat(PROMPTS), negative_prompt=repeat(negative), true_cfg_scale=4.0, num_inference_steps=T,
                 latents=roots.repeat_interleave(k**w, dim=0), output_type="latent", max_sequence_length=LENGTH,
                 **SIZE).images
    torch.testing.assert_close(out.images, stock, rtol=1e-4, atol=1e-4)
    assert (out.images - stock).abs().max() < 1e-3 * stock.abs().max()


def test_decode_equals_the_stock_pipeline(tree):
    """Unpacking, the frame axis and latents_mean/std (not 0/1 in the tiny VAE) as the pipeline decodes."""
    pipe = tree.pipe
    call = dict(num_inference_steps=2, max_sequence_length=LENGTH, **SIZE)
    latents = pipe(PROMPTS, output_type="latent", generator=torch.Generator().manual_seed(0), **call).images
    images = pipe(PROMPTS, output_type="pt", generator=torch.Generator().manual_seed(0), **call).images
    conditioning = tree.encode(PROMPTS, max_sequence_length=LENGTH, **SIZE)
    torch.testing.assert_close(tree.decode(latents, conditioning), images)


def test_prompt_by_prompt_encodes_concatenate(tree):
    """The trainer's prompt cache encodes one prompt at a time and concatenates: one padded length makes that
    work, and it equals the batched encode."""
    call = dict(guidance_scale=4.0, max_sequence_length=LENGTH, **SIZE)
    joined = Conditioning.concat([tree.encode([prompt], **call) for prompt in PROMPTS])
    batched = tree.encode(PROMPTS, **call)
    for part in ("cond", "uncond"):
        for key, value in getattr(batched, part).items():
            torch.testing.assert_close(getattr(joined, part)[key], value, rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trips(tmp_path):
    pipe = tiny_qwenimage_pipeline()
    call = dict(num_inference_steps=2, output_type="latent", negative_prompt=" ", max_sequence_length=LENGTH,
                **SIZE)
    before = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **call).images
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name in ("transformer", "vae", "text_encoder"):
        state, reloaded = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(state[key], reloaded[key]) for key in state), name
    after = loaded(PROMPTS, generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # same weights; kernels may round differently


def test_record_rescoring_with_cfg_gives_stored_log_probs(tree):
    """The training recompute batches the parents otherwise than sampling did (other rows, other trimmed lengths):
    still ratio 1 before any update."""
    tree = TreeRolloutPipeline.from_pipe(tree.pipe, branch_factor=2, window_width=2, window_start=1)
    cond = tree.encode(PROMPTS, guidance_scale=4.0, negative_prompt="blue", max_sequence_length=LENGTH, **SIZE)
    out = tree(PROMPTS, num_inference_steps=4, conditioning=cond, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    assert rescoring_ratio_error(tree, out.record, cond) < 1e-4


def test_stock_call_kwargs_guide_the_stock_pipeline_as_the_tree_does():
    """The CLI's sample grids and `treegrpo sample` call the stock pipeline: its CFG scale is `true_cfg_scale`, and
    it guides only with a negative prompt."""
    from diffusers_tree.adapters import adapter_for

    adapter = adapter_for(tiny_qwenimage_pipeline())
    assert adapter.stock_call_kwargs({"guidance_scale": 4.0, "height": 32}) == {
        "true_cfg_scale": 4.0, "negative_prompt": " ", "height": 32}
    given = adapter.stock_call_kwargs({"guidance_scale": 4.0, "negative_prompt": "blurry"})
    assert given["negative_prompt"] == "blurry"
    assert adapter.stock_call_kwargs({"guidance_scale": 1.0}) == {"true_cfg_scale": 1.0}


def test_best_of_n_samples_with_the_cfg_it_is_given(tree):
    """best_of_n calls the stock pipeline through the adapter's stock_call_kwargs: guidance 4 is true CFG there too
    (two rows per sample and step), not the guidance-distilled argument the Qwen pipeline ignores."""
    from diffusers_tree.search import best_of_n

    n, steps = 2, 2
    out = best_of_n(tree.pipe, ["a red cat"], lambda images, prompts: [0.0] * len(images), n=n,
                    num_inference_steps=steps, guidance_scale=4.0, max_sequence_length=LENGTH, **SIZE)
    assert out.rows == 2 * n * steps


def test_best_of_n_with_prompts_of_different_lengths(tree):
    """Two prompts of different lengths with n = 2 each crashed ('negative_prompt' encoded once for the batch) and
    would hit diffusers' mis-tiled masks: best_of_n calls the stock pipeline one prompt at a time, and each prompt's
    candidates equal that prompt sampled alone with the same generator state."""
    from diffusers_tree.search import best_of_n

    n, steps = 2, 2
    kwargs = dict(num_inference_steps=steps, guidance_scale=4.0, max_sequence_length=LENGTH, **SIZE)
    seen = []

    def scorer(images, prompts):
        seen.append((len(images), tuple(prompts)))
        return [float(torch.from_numpy(np.asarray(image, dtype=np.float32)).mean()) for image in images]

    out = best_of_n(tree.pipe, PROMPTS, scorer, n=n, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.rows == len(PROMPTS) * 2 * n * steps and len(out.images) == 2
    assert seen == [(4, (PROMPTS[0],) * 2 + (PROMPTS[1],) * 2)]
    alone = best_of_n(tree.pipe, PROMPTS[:1], scorer, n=n, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(out.candidate_scores[0], alone.candidate_scores[0])
