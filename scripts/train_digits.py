"""Train and ship `builtin:digits`: a tiny real StableDiffusion3Pipeline for 16x16 handwritten digits, plus the
independent digit classifier that the `digits` reward and every accuracy number use.

Data: scikit-learn's `load_digits` (1,797 8x8 images, shipped inside scikit-learn: no download), upsampled to 16x16
grey (dark ink on light paper), repeated over 3 channels. Steps, all seeded (CPU; same numbers for the same torch
version and thread count):

1. classifier: a small CNN on a stratified 70/10/20 split with shift/rotate/scale/noise augmentation; its
   temperature is fit on the 10 % validation split (NLL); accuracy is reported on the untouched 20 %.
2. VAE: `AutoencoderKL` with blocks (16, 32), 4 latent channels (16x16x3 -> 4x8x8); `shift_factor` and
   `scaling_factor` are set from the latent statistics so scaled latents have mean 0 and std 1.
3. Denoiser: `SD3Transformer2DModel` (~0.3M params, 16 image tokens) trained with the rectified-flow loss
   (x_t = (1 - s) x0 + s eps, target eps - x0), batch 128, 10 % empty prompts (for CFG), text from frozen random
   CLIP + CLIP + T5 encoders, prompts "a handwritten digit <word>". Constant learning rate after warm-up, so the
   model after N steps does not depend on the total budget; the budget is chosen so that the base model follows
   its prompt only partly (30-70 % at 10 Euler steps, guidance 1), leaving room for RL.

The pipeline is saved with `save_pretrained` (fp32 safetensors) under `<out>/pipeline`, the classifier under
`<out>/classifier`, metadata (call kwargs, accuracies) in `<out>/digits.json`, a sample grid in `--grid`.

Usage (needs scikit-learn, a build-time extra):

    python scripts/train_digits.py                      # rebuilds cli/treegrpo/builtin/digits (a few minutes)
    python scripts/train_digits.py --probe-every 100    # also prints the base accuracy along the way
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from digits_data import IMAGE_SIZE, Digits, load_data, train_classifier  # noqa: E402  (a sibling script module)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusers_tree.testing import tiny_tokenizer
from treegrpo.builtin import BUILTIN_DIGITS_DIR
from treegrpo.rewards.digits import (
    DIGIT_WORDS,
    DigitClassifier,
    images_to_pixels,
    save_digit_classifier,
)

logger = logging.getLogger("train_digits")

PROMPT_TEMPLATE = "a handwritten digit {digit}"
# Digit words come last so each has the highest token id in its prompt: the tiny CLIP configs use eos_token_id 2,
# which makes CLIP pool at argmax(input_ids) (no EOS is added), i.e. at the digit word.
VOCAB = ["a", "an", "the", "of", "photo", "picture", "handwritten", "number", "digit", *DIGIT_WORDS]
TEXT_LENGTH = 8  # CLIP tokenizer length and T5 max_sequence_length, used in training and stored for every call
T5_WIDTH = 64  # = joint_attention_dim; CLIP gives 32 + 32 = 64 too, so the pipeline's F.pad neither pads nor crops
FLOW_SHIFT = 1.0  # 16 image tokens: no resolution shift needed
GUIDANCE_SCALE = 1.0
NUM_INFERENCE_STEPS = 10


def to_vae(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * 2 - 1).repeat(1, 3, 1, 1)  # [N, 3, 16, 16] in [-1, 1]


def train_vae(data: Digits, seed: int, steps: int) -> tuple[AutoencoderKL, dict]:
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=IMAGE_SIZE,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    images = to_vae(data.pixels)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for _ in range(steps):
        x = images[torch.randint(len(images), (64,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        z = posterior.sample(generator=gen)
        shift = z.mean().item()
        scale = 1.0 / (z - shift).std().item()
        recon = vae.decode(posterior.mode()).sample.clamp(-1, 1)
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    report = {"recon_mse": round(F.mse_loss(recon, images).item(), 5), "shift_factor": shift, "scaling_factor": scale}
    return vae, report


# ---------------------------------------------------------------- pipeline and denoiser


def build_pipeline(vae: AutoencoderKL, seed: int) -> StableDiffusion3Pipeline:
    """The SD3 pipeline with a fresh denoiser and frozen random text encoders (real classes, tiny configs)."""
    torch.manual_seed(seed + 2)
    clip = dict(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=64, projection_dim=32, max_position_embeddings=TEXT_LENGTH,
    )  # fmt: skip
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    t5 = T5Config(vocab_size=64, d_model=T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4, pad_token_id=1)
    text_encoder_3 = T5EncoderModel(t5)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=64,
        pooled_projection_dim=2 * clip["projection_dim"], pos_embed_max_size=8,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(VOCAB, model_max_length=TEXT_LENGTH),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_tokenizer(VOCAB, model_max_length=TEXT_LENGTH),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tiny_tokenizer(VOCAB, model_max_length=TEXT_LENGTH),
    )
    for module in (text_encoder, text_encoder_2, text_encoder_3, vae):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompts_for(labels: list[int]) -> list[str]:
    return [PROMPT_TEMPLATE.format(digit=DIGIT_WORDS[i]) for i in labels]


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the 10 digit prompts and the empty prompt (row 10), exactly as the pipeline encodes them."""
    prompts = [*prompts_for(list(range(10))), ""]
    ids = pipe.tokenizer(prompts[:10], padding="max_length", max_length=TEXT_LENGTH).input_ids
    digit_ids = [pipe.tokenizer.convert_tokens_to_ids(w) for w in DIGIT_WORDS]
    assert [max(row) for row in ids] == digit_ids, "CLIP would not pool at the digit word (see VOCAB)"
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=TEXT_LENGTH,
    )  # fmt: skip
    assert torch.cdist(pooled[:10], pooled[:10]).add(torch.eye(10)).min() > 1e-3, "pooled prompts coincide"
    return embeds, pooled  # [11, 2 * TEXT_LENGTH, 64], [11, 64]


def train_denoiser(
    pipe, data: Digits, seed: int, steps: int, lr: float, probe_every: int, classifier: DigitClassifier
) -> list[dict]:
    transformer = pipe.transformer
    embeds, pooled = encode_prompts(pipe)
    with torch.no_grad():
        posterior = pipe.vae.encode(to_vae(data.pixels)).latent_dist
    mean, std = posterior.mean, posterior.std  # [N, 4, 8, 8]
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed + 4)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))  # warm-up, then constant
    probes = []
    for step in range(1, steps + 1):
        transformer.train()
        idx = torch.randint(len(mean), (128,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scale
        cond = torch.where(torch.rand(128, generator=gen) < 0.1, 10, data.labels[idx])  # 10 = empty prompt
        sigma = torch.rand(128, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        pred = transformer(
            hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=embeds[cond],
            pooled_projections=pooled[cond],
        ).sample  # fmt: skip
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if probe_every and (step % probe_every == 0 or step == steps):
            transformer.eval()
            acc = evaluate(pipe, classifier, per_digit=20, seed=1234)["accuracy"]
            probes.append({"step": step, "loss": round(loss.item(), 4), "accuracy": acc})
            logger.info("step %d  loss %.4f  accuracy@T=10 %.3f", step, loss.item(), acc)
    transformer.eval()
    return probes


@torch.no_grad()
def sample(pipe, labels: list[int], seed: int, guidance_scale: float = GUIDANCE_SCALE) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    return pipe(
        prompts_for(labels), height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=guidance_scale, max_sequence_length=TEXT_LENGTH, generator=gen,
    ).images  # fmt: skip


@torch.no_grad()
def evaluate(pipe, classifier, per_digit: int, seed: int, guidance_scale: float = GUIDANCE_SCALE) -> dict:
    labels = [d for d in range(10) for _ in range(per_digit)]
    images = sample(pipe, labels, seed, guidance_scale)
    probs = classifier(images_to_pixels(images)).softmax(-1)
    target = torch.tensor(labels)
    correct = (probs.argmax(-1) == target).float()
    true_prob = probs.gather(1, target[:, None])[:, 0].view(10, per_digit)
    return {
        "accuracy": round(correct.mean().item(), 4),
        "per_digit": [round(v, 3) for v in correct.view(10, per_digit).mean(1).tolist()],
        "reward_mean": round(true_prob.mean().item(), 4),
        "reward_within_prompt_std": round(true_prob.std(dim=1).mean().item(), 4),
        "num_samples": len(labels),
    }


def save_grid(pipe, classifier, path: Path, seed: int, columns: int = 10, zoom: int = 4) -> None:
    """Rows = prompted digit 0..9, columns = seeds; a green frame where the classifier agrees with the prompt."""
    labels = [d for d in range(10) for _ in range(columns)]
    images = sample(pipe, labels, seed)
    hits = (classifier(images_to_pixels(images)).argmax(-1) == torch.tensor(labels)).tolist()
    cell = IMAGE_SIZE * zoom + 4
    grid = Image.new("RGB", (columns * cell, 10 * cell), "white")
    for i, (image, hit) in enumerate(zip(images, hits, strict=True)):
        framed = Image.new("RGB", (cell, cell), (40, 160, 60) if hit else (200, 40, 40))
        framed.paste(image.resize((IMAGE_SIZE * zoom,) * 2, Image.NEAREST), (2, 2))
        grid.paste(framed, ((i % columns) * cell, (i // columns) * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=BUILTIN_DIGITS_DIR, help="folder to (re)write")
    parser.add_argument("--grid", type=Path, default=Path("docs/img/digits_base_grid.png"), help="sample grid PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--denoiser-steps", type=int, default=1700, help="the budget that sets the base accuracy")
    parser.add_argument("--denoiser-lr", type=float, default=3e-4, help="AdamW lr (constant after 50 warm-up steps)")
    parser.add_argument("--eval-per-digit", type=int, default=100, help="samples per digit for the final accuracy")
    parser.add_argument("--probe-every", type=int, default=0, help="print the accuracy every N denoiser steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; the weights depend on it bit for bit (default 1)"
    )
    return parser.parse_args()


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, classifier: DigitClassifier, data: Digits) -> float:
    """The classifier's accuracy on VAE reconstructions of all digits: the VAE must not blur classes together."""
    recon = vae.decode(vae.encode(to_vae(data.pixels)).latent_dist.mode()).sample
    pixels = ((recon.clamp(-1, 1) + 1) / 2).mean(1, keepdim=True)
    return round((classifier(pixels).argmax(-1) == data.labels).float().mean().item(), 4)


def write_metadata(out: Path, args: argparse.Namespace, reports: dict, training: dict) -> None:
    """`digits.json`: how every caller must sample the model (`pipeline_kwargs`) and what was measured."""
    kwargs = dict(
        height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=NUM_INFERENCE_STEPS,
        guidance_scale=GUIDANCE_SCALE, max_sequence_length=TEXT_LENGTH,
    )  # fmt: skip
    metadata = {
        "name": "digits",
        "description": "Tiny SD3 pipeline: 16x16 handwritten digits (sklearn load_digits), dark ink on light paper.",
        "prompt_template": PROMPT_TEMPLATE,
        "digit_words": list(DIGIT_WORDS),
        "pipeline_kwargs": kwargs,
        **kwargs,
        **reports,
        "training": {
            "seed": args.seed,
            "classifier_epochs": args.classifier_epochs,
            "vae_steps": args.vae_steps,
            "denoiser_steps": args.denoiser_steps,
            "denoiser_lr": args.denoiser_lr,
            "denoiser_batch": 128,
            "empty_prompt_rate": 0.1,
            "flow_shift": FLOW_SHIFT,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **training,
        },
    }
    (out / "digits.json").write_text(json.dumps(metadata, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # One thread by default: the tiny ops gain little from more, the result is then the same on any machine, and
    # it does not collapse when other processes share the cores.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    timings = {}

    data = load_data(args.seed)
    classifier, classifier_report = train_classifier(data, args.seed, args.classifier_epochs)
    timings["classifier_s"] = round(time.perf_counter() - start, 1)
    logger.info("classifier: %s (%.0f s)", classifier_report, timings["classifier_s"])

    vae, vae_report = train_vae(data, args.seed, args.vae_steps)
    vae_report["classifier_accuracy_on_reconstructions"] = reconstruction_accuracy(vae, classifier, data)
    timings["vae_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    logger.info("vae: %s (%.0f s)", vae_report, timings["vae_s"])

    pipe = build_pipeline(vae, args.seed)
    num_params = sum(p.numel() for p in pipe.transformer.parameters())
    probes = train_denoiser(pipe, data, args.seed, args.denoiser_steps, args.denoiser_lr, args.probe_every, classifier)
    timings["denoiser_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    logger.info("denoiser: %d params, %d steps (%.0f s)", num_params, args.denoiser_steps, timings["denoiser_s"])

    out: Path = args.out
    for sub in ("pipeline", "classifier"):
        shutil.rmtree(out / sub, ignore_errors=True)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    save_digit_classifier(classifier, out / "classifier", extra={"training": classifier_report})

    # Judge the model as shipped: reload from disk, sample as every caller will.
    shipped = StableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    shipped.set_progress_bar_config(disable=True)
    base = evaluate(shipped, classifier, args.eval_per_digit, seed=args.seed + 100)
    at_guidance_3 = evaluate(shipped, classifier, args.eval_per_digit // 4, seed=args.seed + 100, guidance_scale=3.0)
    save_grid(shipped, classifier, args.grid, seed=args.seed + 200)
    timings["total_s"] = round(time.perf_counter() - start, 1)
    logger.info("base model at T=%d, guidance %.1f: %s", NUM_INFERENCE_STEPS, GUIDANCE_SCALE, base)
    logger.info("same at guidance 3.0: %s", at_guidance_3)

    reports = {
        "base_accuracy": {"guidance_1": base, "guidance_3": at_guidance_3, "judge": "argmax of classifier/"},
        "classifier": classifier_report,
        "vae": vae_report,
    }
    write_metadata(out, args, reports, {"transformer_params": num_params, "timings": timings, "probes": probes})
    logger.info("wrote %s (%.2f MB), %s; total %.0f s", out, folder_bytes(out) / 1e6, args.grid, timings["total_s"])


if __name__ == "__main__":
    main()
