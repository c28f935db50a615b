"""The memory plan of `treegrpo check --gpu-memory`: held to every point measured on a GPU (SD3.5-Medium size on one
H200, docs/benchmarks.md "GPU"), parameter counts read from weight-file headers equal the model's, and the command's
verdict and advice."""

import pytest
from typer.testing import CliRunner

from treegrpo.app import app
from treegrpo.recipe.memory import Denoiser, gpu_gib, plan_memory, safetensors_params, source_tokens

from .conftest import write_recipe

# the measured run (benchmarks/gpu_check_setup.py, size "sd35m"): stored elements per component (state dict:
# parameters and the MMDiT's 226M-element position-embedding buffer), counted from those configs on the meta device
# (the MMDiT and VAE at full size, small text encoders of the real widths)
SD35M = {"transformer": 2_469_663_936, "vae": 83_819_683, "text_encoder": 151_680, "text_encoder_2": 184_448,
         "text_encoder_3": 14_495_872}
SD35M_SHAPE = Denoiser(layers=24, hidden=1536, tokens_per_pixel=1 / 256, text_tokens=77 + 64)
MEASURED_TRAINING = {1: 10.05, 2: 14.74, 4: 24.10, 8: 42.75, 13: 66.20}  # GiB, peak of scoring + training
MEASURED_ROLLOUT = 18.7  # GiB, 64-row forwards


def sd35m_plan(micro_batch_size: int, **change):
    settings = dict(dtype="bf16", height=512, width=512, cfg=True, micro_batch_size=micro_batch_size,
                    max_batch_size=64, lora_params=24 * 8 * 32 * 2 * 1536, rewards=["python"],
                    offload_text_encoders=False, offload_rewards=False, gradient_checkpointing=False,
                    gpu_memory_gib=141)
    return plan_memory(SD35M, SD35M_SHAPE, **{**settings, **change})


@pytest.mark.parametrize("micro_batch_size", list(MEASURED_TRAINING))
def test_the_plan_is_within_2_percent_of_every_measured_gpu_point(micro_batch_size):
    plan = sd35m_plan(micro_batch_size)
    assert plan.training_gib == pytest.approx(MEASURED_TRAINING[micro_batch_size], rel=0.02)
    assert plan.rollout_gib == pytest.approx(MEASURED_ROLLOUT, rel=0.02)


def test_what_does_not_fit_says_what_to_change():
    on_24 = sd35m_plan(13, gpu_memory_gib=24)
    assert not on_24.fits
    assert on_24.suggestions[0] == "train.micro_batch_size = 3 (the most parents that fit)"
    assert "model.gradient_checkpointing = true" in on_24.suggestions
    assert sd35m_plan(3, gpu_memory_gib=24).fits
    checkpointed = sd35m_plan(13, gpu_memory_gib=24, gradient_checkpointing=True)
    assert checkpointed.training_gib < on_24.training_gib / 3
    offloaded = sd35m_plan(1, offload_text_encoders=True)
    assert offloaded.training_gib == pytest.approx(sd35m_plan(1).training_gib - 14_832_000 * 2 / 2**30)


def test_parameter_counts_come_from_the_weight_files_headers(tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir / "transformer")
    stored = sum(tensor.numel() for tensor in model.state_dict().values())  # parameters and persistent buffers
    assert safetensors_params(tiny_sd3_dir / "transformer") == stored > sum(p.numel() for p in model.parameters())
    assert safetensors_params(tiny_sd3_dir / "scheduler") == 0


def test_gpu_memory_values():
    assert gpu_gib("24") == 24 and gpu_gib("80GB") == 80 and gpu_gib("H100") == 80 and gpu_gib("rtx4090") == 24
    with pytest.raises(ValueError, match="give GiB .* or a card: "):
        gpu_gib("banana")


def test_editing_sources_add_their_tokens_to_every_row():
    """Each family's sources at the size it encodes them (1/256 tokens a pixel: FLUX's 8× VAE and 2×2 packing)."""
    # Kontext: its preferred resolution for 2:3 is 832×1248 (diffusers' PREFERRED_KONTEXT_RESOLUTIONS)
    assert source_tokens("FluxKontextPipeline", [(512, 768)], 1 / 256) == 832 * 1248 / 256
    assert source_tokens("FluxKontextPipeline", [(512, 768)], 1 / 256, auto_resize=False) == 1536
    assert source_tokens("Flux2Pipeline", [(2048, 2048), (512, 512)], 1 / 256) == 4096 + 1024  # capped at 1024²
    # 3000×1000 shrinks to 1773×591 pixels (sqrt(1024² / 3e6) = 0.5912), cropped to 1760×576
    assert source_tokens("Flux2Pipeline", [(3000, 1000)], 1 / 256) == 1760 * 576 / 256
    assert source_tokens("QwenImageEditPipeline", [(512, 512)], 1 / 256) == pytest.approx(4096 + 1024**2 / 784)
    assert source_tokens("QwenImageEditPlusPipeline", [(512, 512)] * 2, 1 / 256) == pytest.approx(
        2 * (4096 + 384**2 / 784))
    assert source_tokens("StableDiffusion3Pipeline", [], 1 / 256) == 0
    # activations scale with the tokens: 1,024 image + 141 text tokens, then 1,024 source tokens more
    plain, edit = sd35m_plan(4), sd35m_plan(4, source_tokens=1024)
    activations = {name: value for name, value in plain.rows if "activations" in name}
    edited = {name.split(" tokens")[0]: value for name, value in edit.rows if "activations" in name}
    for name, value in activations.items():
        assert edited[name.split(" tokens")[0].replace("1165", "2189")] == pytest.approx(value * 2189 / 1165)


def test_check_counts_an_edit_recipes_source_tokens():
    """recipes/shapes_edit.toml: 16 image + 12 text tokens, and its 32×32 sources kept as given: 16 more."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "shapes_edit.toml"
    result = CliRunner().invoke(app, ["check", str(recipe), "--gpu-memory", "24"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "44 tokens, 16 of them the sources'" in " ".join(result.output.split()), result.output


def test_check_prints_the_plan_and_its_verdict(workdir, tiny_sd3_dir):
    recipe = write_recipe(workdir, tiny_sd3_dir)
    result = CliRunner().invoke(app, ["check", str(recipe), "--gpu-memory", "24"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "memory plan: fits." in result.output, result.output
    assert "training activations, 4 parent(s) × 2 row(s)" in result.output
    small = CliRunner().invoke(app, ["check", str(recipe), "--gpu-memory", "1.6"], env={"COLUMNS": "200"})
    assert "memory plan: does NOT fit; to fit, try:" in " ".join(small.output.split()), small.output
    bad = CliRunner().invoke(app, ["check", str(recipe), "--gpu-memory", "banana"], env={"COLUMNS": "200"})
    assert bad.exit_code != 0 and "--gpu-memory 'banana'" in bad.output


@pytest.mark.parametrize(("where", "phase", "knob"), [
    ("treegrpo.train.trainer.train_on_record", "training", "Lower train.micro_batch_size, or set "
                                                           "model.gradient_checkpointing"),
    ("treegrpo.train.overlap.score_frames", "scoring", "Lower the reward's batch_size"),
    ("treegrpo.train.judge.evaluate_policy", "evaluation", "Lower sampling.max_batch_size or "
                                                           "evaluation.images_per_prompt"),
])
def test_out_of_memory_is_one_line_naming_the_phase_and_what_to_lower(workdir, tiny_sd3_dir, monkeypatch, where,
                                                                      phase, knob):
    import torch

    from treegrpo.errors import TrainingError
    from treegrpo.recipe.loading import load_recipe
    from treegrpo.run.reporting import Reporter
    from treegrpo.train.trainer import train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total)")

    monkeypatch.setattr(where, out_of_memory)
    with pytest.raises(TrainingError) as error:
        recipe = write_recipe(workdir, tiny_sd3_dir, evaluation={} if phase == "evaluation" else None)
        train(load_recipe(recipe), reporter=Reporter(enabled=False))
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        f"out of memory during {phase} (train.micro_batch_size = 4, sampling.max_batch_size = 64): CUDA out of "
        "memory. Tried to allocate 2.00 GiB")
    assert knob in message and "treegrpo check RECIPE --gpu-memory" in message
    assert message.endswith("The run: no checkpoint has been written yet.")
