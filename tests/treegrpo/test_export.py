"""LoRA export (`treegrpo.model.loading.save_lora`) for all four families: a fresh stock pipeline + `load_lora_weights`
really holds the adapter and reproduces the trained denoiser and pipeline; fuse/unfuse; the same file without its
metadata (diffusers < 0.34) loads identically; rank/alpha patterns and rsLoRA; merged export."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from diffusers_tree.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa
from treegrpo.model.loading import (  # noqa: E402
    LORA_METADATA_KEYS,
    LORA_WEIGHT_NAME,
    add_lora,
    default_lora_targets,
    save_lora,
)

# family → (builder, denoiser attribute, call kwargs besides the shared ones; see diffusers_tree/testing.py)
FAMILIES = {
    "sd": (tiny_sd_pipeline, "unet", {"guidance_scale": 7.5}),
    "sdxl": (tiny_sdxl_pipeline, "unet", {"guidance_scale": 5.0}),
    "sd3": (tiny_sd3_pipeline, "transformer", {"guidance_scale": 7.0, "max_sequence_length": 16}),
    "flux": (tiny_flux_pipeline, "transformer", {"max_sequence_length": 16}),
}
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and 2 threads spin-wait badly on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def call(pipe, family):
    kwargs = dict(height=32, width=32, num_inference_steps=3, output_type="pt", **FAMILIES[family][2])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a red cat", generator=torch.Generator().manual_seed(0), **kwargs).images


def first_denoiser_call(pipe, family):
    """The (args, kwargs) of the denoiser's first forward in a pipeline call: fixed, realistic inputs."""
    denoiser, seen = getattr(pipe, FAMILIES[family][1]), []

    def hook(module, args, kwargs):
        if not seen:
            seen.append((_clone(list(args)), _clone(kwargs)))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    call(pipe, family)
    handle.remove()
    return seen[0]


def _clone(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def forward(pipe, family, inputs):
    args, kwargs = inputs
    with torch.no_grad():
        return getattr(pipe, FAMILIES[family][1])(*args, **{**kwargs, "return_dict": False})[0]


def randomize_lora_b(denoiser, seed=1):
    """LoRA B starts at zero; give it values so the adapter changes the outputs (as training would)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in denoiser.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


class Exported:
    def __init__(self, family, tmp_path, config=None):
        builder, name, _ = FAMILIES[family]
        self.family, self.name = family, name
        trained = builder()
        denoiser = getattr(trained, name)
        if config is None:  # what the trainer does: alpha ≠ rank
            add_lora(denoiser, rank=4, alpha=16, target_modules=None, seed=0, denoiser_name=name,
                     default_targets=default_lora_targets(trained))
        else:
            denoiser.add_adapter(config)
        randomize_lora_b(denoiser)
        self.lora_layers = sum(1 for n, _ in denoiser.named_modules() if n.endswith(".lora_A"))
        self.file = save_lora(trained, denoiser, name, tmp_path / "lora")
        self.inputs = first_denoiser_call(trained, family)
        self.expected = forward(trained, family, self.inputs)
        self.expected_images = call(trained, family)

    def stock(self):
        """A fresh stock pipeline with the base weights (the builders are deterministic in their seed)."""
        return FAMILIES[self.family][0]()

    def check_loaded(self, pipe):
        denoiser = getattr(pipe, self.name)
        assert denoiser.peft_config, "load_lora_weights silently ignored the file"
        loaded = sum(1 for n, _ in denoiser.named_modules() if n.endswith(".lora_A"))
        assert loaded == self.lora_layers
        torch.testing.assert_close(forward(pipe, self.family, self.inputs), self.expected, **TOL)
        torch.testing.assert_close(call(pipe, self.family), self.expected_images, rtol=1e-4, atol=1e-4)


@pytest.fixture(params=sorted(FAMILIES))
def exported(request, tmp_path):
    return Exported(request.param, tmp_path)


def test_stock_pipeline_loads_export_and_reproduces_trained_model_fuse_unfuse(exported):
    pipe = exported.stock()
    base = forward(pipe, exported.family, exported.inputs)
    base_images = call(pipe, exported.family)
    assert (exported.expected - base).abs().max() > 1e-3  # the adapter matters, so the comparison means something
    assert (exported.expected_images - base_images).abs().max() > 1e-3

    pipe.load_lora_weights(exported.file.parent)
    exported.check_loaded(pipe)

    pipe.fuse_lora()
    torch.testing.assert_close(forward(pipe, exported.family, exported.inputs), exported.expected, **TOL)
    pipe.unfuse_lora()
    pipe.disable_lora()  # unfused and disabled: the base model again
    torch.testing.assert_close(forward(pipe, exported.family, exported.inputs), base, **TOL)
    pipe.enable_lora()  # unfused but enabled: the adapter path again
    torch.testing.assert_close(forward(pipe, exported.family, exported.inputs), exported.expected, **TOL)


def test_metadata_is_minimal_with_r_equal_alpha(exported):
    with safe_open(exported.file, "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
        keys = list(handle.keys())
    prefix = f"{exported.name}."
    assert {k.removeprefix(prefix) for k in metadata} == set(LORA_METADATA_KEYS)
    assert metadata[prefix + "r"] == metadata[prefix + "lora_alpha"] == 4  # alpha 16 / r 4 is baked into lora_B
    assert keys and all(k.startswith(prefix) for k in keys)


def test_file_without_metadata_loads_identically(exported, tmp_path):
    """What a diffusers without metadata support (< 0.34) sees: alpha = rank is assumed, and right."""
    with safe_open(exported.file, "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(state, bare / LORA_WEIGHT_NAME, metadata={"format": "pt"})
    pipe = exported.stock()
    pipe.load_lora_weights(bare)
    exported.check_loaded(pipe)


def test_rank_and_alpha_patterns_and_rslora_are_baked(tmp_path):
    """Per-module ranks are zero-padded to the largest and per-module scalings multiplied in: r = alpha = 4."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_rslora=True,
                        rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 3})
    exported = Exported("sd3", tmp_path, config)
    with safe_open(exported.file, "pt") as handle:
        assert {handle.get_slice(k).get_shape()[0] for k in handle.keys() if ".lora_A." in k} == {4}
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    q_a = next(v for k, v in state.items() if k.endswith("attn.to_q.lora_A.weight"))
    assert q_a[2:].abs().max() == 0  # rank-2 module padded with zero rows
    for metadata in (True, False):
        folder = tmp_path / f"meta-{metadata}"
        folder.mkdir()
        if metadata:
            folder = exported.file.parent
        else:
            save_file(state, folder / LORA_WEIGHT_NAME, metadata={"format": "pt"})
        pipe = exported.stock()
        pipe.load_lora_weights(folder)
        exported.check_loaded(pipe)


def test_merged_export_is_a_plain_model(tmp_path):
    """load → fuse → unload → save_pretrained gives a LoRA-free denoiser with the trained outputs."""
    from diffusers import SD3Transformer2DModel

    exported = Exported("sd3", tmp_path)
    pipe = exported.stock()
    pipe.load_lora_weights(exported.file.parent)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not getattr(pipe.transformer, "peft_config", None)
    pipe.transformer.save_pretrained(tmp_path / "merged")
    pipe.transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(forward(pipe, "sd3", exported.inputs), exported.expected, **TOL)
