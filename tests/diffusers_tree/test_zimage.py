"""Z-Image: rows at the denoiser, leaves equal to the stock `ZImagePipeline` (its CFG `pos + g·(pos - neg)`, negated
velocity, variable-length captions), `cfg_normalization`, per-prompt encoding, the schedule's `mu`, save/load."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402

from diffusers_tree import TreeRolloutPipeline, TreeSDEScheduler, unique_rows  # noqa: E402
from diffusers_tree.adapters import Conditioning, adapter_for  # noqa: E402
from diffusers_tree.testing.zimage import tiny_zimage_pipeline  # noqa: E402

# captions of different lengths; the long one is over 32 tokens with the chat template, so its caption pads to 64
# tokens and the transformer batch needs attention masks
LONG = " ".join(["a photo of a small red cat on the table"] * 4)
PROMPTS = ["a red cat", LONG]
SIZE = {"height": 32, "width": 32}
LENGTH = {"max_sequence_length": 64}


class count_rows:  # noqa: N801
    """Samples through the transformer, counted at the module (its input is a list of per-sample latents)."""

    def __init__(self, module):
        self.module, self.rows = module, 0

    def _hook(self, module, args, kwargs):
        self.rows += len(args[0] if args else kwargs["x"])

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def stock_leaves(pipe, tree_kwargs, roots, **kwargs):
    """The stock pipeline with a tree scheduler of the same shape swapped in, every leaf computed (a fresh prompt
    list: the pipeline writes the chat-templated prompts back into the list it is given)."""
    pipe.scheduler = TreeSDEScheduler.from_scheduler(pipe.scheduler, **tree_kwargs).manual_seed(11)
    leaves = pipe.scheduler.config.branch_factor ** pipe.scheduler.config.window_width
    return pipe(list(PROMPTS), num_images_per_prompt=leaves, latents=roots.repeat_interleave(leaves, dim=0),
                **SIZE, **LENGTH, **kwargs).images


@pytest.mark.parametrize("guidance", [0.0, 5.0])  # 0: no CFG (Z-Image-Turbo); CFG is on whenever g > 0
def test_rows_and_leaves_equal_stock_pipeline(guidance):
    pipe = tiny_zimage_pipeline()
    k, w, s, T = 2, 2, 1, 5
    shape = dict(branch_factor=k, window_width=w, window_start=s)
    tree = TreeRolloutPipeline.from_pipe(pipe, **shape)
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32)
    with count_rows(tree.denoiser) as counter:
        out = tree(PROMPTS, num_inference_steps=T, latents=roots, guidance_scale=guidance, output_type="pt",
                   generator=torch.Generator().manual_seed(11), **SIZE, **LENGTH)
    cfg = 2 if guidance > 0 else 1
    assert counter.rows == out.rows == cfg * len(PROMPTS) * unique_rows(T, k, w, s)

    stock = stock_leaves(pipe, shape, roots, num_inference_steps=T, guidance_scale=guidance, output_type="pt")
    assert stock.shape == out.images.shape == (len(PROMPTS) * k**w, 3, 32, 32)
    torch.testing.assert_close(out.images, stock, rtol=1e-4, atol=1e-4)  # decoded: the VAE's scale and shift too


def test_negative_prompt_and_cfg_normalization_match_stock():
    """The pipeline's `cfg_normalization=c` (off by default) is `adapter.cfg_normalization = c`; c = 1 clips every
    guided output to the conditional output's norm, so the leaves move."""
    pipe = tiny_zimage_pipeline()
    shape = dict(branch_factor=2, window_width=2, window_start=1)
    tree = TreeRolloutPipeline.from_pipe(pipe, **shape)
    roots = tree.prepare_roots(len(PROMPTS), 32, 32, torch.Generator().manual_seed(5), torch.float32)
    call = dict(num_inference_steps=4, guidance_scale=4.0, output_type="latent")
    # one negative prompt for all (the stock pipeline wants a list as long as the prompts)
    plain = tree(PROMPTS, latents=roots, generator=torch.Generator().manual_seed(11), negative_prompt="blue dog",
                 **call, **SIZE, **LENGTH)
    tree.adapter.cfg_normalization = 1.0
    clipped = tree(PROMPTS, latents=roots, generator=torch.Generator().manual_seed(11), negative_prompt="blue dog",
                   **call, **SIZE, **LENGTH)
    stock = stock_leaves(pipe, shape, roots, cfg_normalization=1.0, negative_prompt=["blue dog"] * 2, **call)
    torch.testing.assert_close(clipped.images, stock, rtol=1e-4, atol=1e-4)
    assert (clipped.images - plain.images).abs().max() > 1e-2


def test_captions_padded_per_prompt_concatenate():
    """Caption features are padded to `max_sequence_length` with their lengths, so prompts encoded one at a time
    (the trainer's prompt cache) concatenate into the conditioning of a joint encode."""
    pipe = tiny_zimage_pipeline()
    adapter = adapter_for(pipe)
    encode = dict(negative_prompt=None, guidance_scale=5.0, **SIZE, **LENGTH)
    with torch.no_grad():
        joint = adapter.encode(PROMPTS, **encode)
        parts = Conditioning.concat([adapter.encode([p], **encode) for p in PROMPTS])
        features, _ = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False, **LENGTH)
    lengths = [f.shape[0] for f in features]
    assert joint.cond["cap_lengths"].tolist() == parts.cond["cap_lengths"].tolist() == lengths
    assert lengths[0] < 32 < lengths[1] <= 64
    assert joint.cond["cap_feats"].shape == (2, 64, 32) and joint.uncond["cap_feats"].shape == (2, 64, 32)
    for p, feature in enumerate(features):
        torch.testing.assert_close(joint.cond["cap_feats"][p, : lengths[p]], feature)
        assert not joint.cond["cap_feats"][p, lengths[p]:].any()
    torch.testing.assert_close(parts.cond["cap_feats"], joint.cond["cap_feats"], rtol=1e-5, atol=1e-6)
    assert adapter.encode(PROMPTS, **{**encode, "guidance_scale": 0.0}).uncond is None


@pytest.mark.parametrize("dynamic", [False, True])
def test_schedule_equals_stock(dynamic):
    """Sigmas `linspace(1, 1/T, T)` and `mu` from the image token count, as the pipeline sets them (a static-shift
    scheduler, Z-Image-Turbo's, ignores `mu`)."""
    pipe = tiny_zimage_pipeline()
    if dynamic:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                         max_image_seq_len=256)
    tree = TreeRolloutPipeline.from_pipe(pipe, window_start=1)
    roots = tree.prepare_roots(1, 32, 32, torch.Generator().manual_seed(0), torch.float32)
    tree.adapter.set_timesteps(tree.scheduler, 6, roots)
    pipe("a red cat", num_inference_steps=6, output_type="latent", **SIZE, **LENGTH)
    torch.testing.assert_close(tree.scheduler.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(tree.scheduler.timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)


def test_adapter_attributes_and_save_load_round_trip(tmp_path):
    pipe = tiny_zimage_pipeline()
    adapter = adapter_for(pipe)
    assert adapter.pixels_per_patch == 4  # VAE factor 2 × the 2×2 patch
    assert TreeRolloutPipeline.from_pipe(pipe)._size(None, None) == (1024, 1024)  # the pipeline's default size
    names = [name for name, _ in pipe.transformer.named_modules()]
    for target in adapter.lora_target_modules:
        assert any(name.endswith("." + target) for name in names), target

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is type(pipe) and loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
    images = [p(["a red cat"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                **SIZE, **LENGTH).images for p in (pipe, loaded)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
