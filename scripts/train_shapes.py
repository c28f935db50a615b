"""Train and ship `builtin:shapes`: a tiny real FluxPipeline (FLUX.1-style MMDiT, CLIP pooled + T5 text) that draws
32x32 scenes of 1-4 coloured shapes for GenEval-style prompts ("a photo of a red circle and a blue square").

Data: procedurally rendered (`treegrpo.builtin.shapes_world`: 3 shapes x 4 colours, the six GenEval categories),
no download. Every prompt of the world (train and test splits) is pretraining data, as for a real base model; the
RL recipe trains on the train split and is judged on the disjoint test split. Steps, all seeded (CPU):

1. VAE: `AutoencoderKL` with blocks (16, 32, 32), 8 latent channels (32x32x3 -> 8x8x8, packed by FLUX into 16
   tokens of 32 channels); no quant convs (FLUX's layout); `shift_factor`/`scaling_factor` from the latents.
2. Denoiser: `FluxTransformer2DModel` (2 double + 2 single blocks, no guidance embedding, like schnell) trained
   with the rectified-flow loss (x_t = (1 - s) x0 + s eps, target eps - x0), 10 % empty prompts, frozen CLIP and
   T5 encoders: CLIP random, T5 first pretrained on the prompts' words (`pretrain_t5`: each output token predicts
   its neighbours), the stand-in for a real model's pretrained T5, which binds each colour to its shape. Constant
   learning rate after warm-up; the step budget is chosen so the base model follows its prompts only partly
   (GenEval accuracy well below 70 %, counting and position weaker than single objects).

Saved with `save_pretrained` (fp32 safetensors) under `<out>/pipeline`, metadata in `<out>/shapes.json`, the prompt
splits as `recipes/prompts/shapes_train.jsonl` and `shapes_test.jsonl`, a sample grid in `--grid`.

    python scripts/train_shapes.py --probe-every 1000     # rebuilds cli/treegrpo/builtin/shapes
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffusers_tree.testing import tiny_tokenizer
from treegrpo.builtin import BUILTIN_SHAPES_DIR
from treegrpo.builtin.shapes_world import CATEGORIES, IMAGE_SIZE, VOCAB, all_prompts, split_prompts, training_pairs
from treegrpo.builtin.shapes_world import write_jsonl as write_prompts
from treegrpo.rewards.geneval import GenEvalReward

logger = logging.getLogger("train_shapes")
TEXT_LENGTH = 12  # CLIP tokenizer length and T5 max_sequence_length (the longest prompt has 10 words)
T5_WIDTH = 64
NUM_INFERENCE_STEPS = 10


def to_vae(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])  # [N, H, W, 3]
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2 - 1


def train_vae(images: torch.Tensor, seed: int, steps: int) -> tuple[AutoencoderKL, dict]:
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (32,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            logger.info("vae step %d  loss %.5f", step + 1, loss.item())
    vae.eval()
    with torch.no_grad():
        sample = images[:2048]
        posterior = vae.encode(sample).latent_dist
        z = posterior.mean
        shift, scale = z.mean().item(), 1.0 / (z - z.mean()).std().item()
        recon = vae.decode(z).sample.clamp(-1, 1)
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    return vae, {"recon_mse": round(F.mse_loss(recon, sample).item(), 5), "shift_factor": shift,
                 "scaling_factor": scale}


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, reward: GenEvalReward, seed: int) -> float:
    """GenEval accuracy of VAE reconstructions of fresh scenes: the VAE must keep shapes, colours and places."""
    records = all_prompts()
    images, index = training_pairs(records, 500, seed + 99)
    recon = vae.decode(vae.encode(to_vae(images)).latent_dist.mode()).sample
    pil = [Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for x in recon]
    metadata = [{k: v for k, v in records[i].items() if k != "prompt"} for i in index]
    return round(reward.score_and_accuracy(pil, [records[i]["prompt"] for i in index], metadata)[1], 4)


def build_pipeline(vae: AutoencoderKL, seed: int) -> FluxPipeline:
    """FluxPipeline with a fresh denoiser and random text encoders (real classes, tiny configs), all frozen."""
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=64, projection_dim=32, max_position_embeddings=TEXT_LENGTH))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=64, d_model=T5_WIDTH, d_kv=16, d_ff=128, num_layers=2,
                                             num_heads=4, pad_token_id=1))
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=[8, 12, 12],
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(VOCAB, model_max_length=TEXT_LENGTH),
        text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(VOCAB, model_max_length=TEXT_LENGTH),
        transformer=transformer,
    )  # fmt: skip
    for module in (text_encoder, text_encoder_2, vae):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_prompts(pipe: FluxPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 embeddings [P, L, 64], CLIP pooled [P, 32]) exactly as the pipeline encodes them."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=TEXT_LENGTH)
    return embeds, pooled


def pack(pipe: FluxPipeline, latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return pipe._pack_latents(latents, b, c, h, w)


def pretrain_t5(pipe: FluxPipeline, prompts: list[str], steps: int, seed: int) -> dict:
    """Pretrain the T5 encoder on the prompts alone: from each output token, linear heads predict the token itself
    and its neighbours at offsets -2..2 (a tiny stand-in for T5's span corruption). FLUX gives text tokens no
    position, so the denoiser reads the T5 output as a set of tokens; a frozen RANDOM T5 is a bag of words there
    ("a red circle and a blue square" and "a blue circle and a red square" give nearly the same set: the first
    build's plateau, docs/benchmarks.md "Why the plateau"). After this, each token carries its neighbours, so the
    set tells them apart. Returns the before/after `binding_report`."""
    before = binding_report(pipe)
    torch.manual_seed(seed + 5)
    encoder = pipe.text_encoder_2
    ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                           return_tensors="pt").input_ids
    offsets = (-2, -1, 0, 1, 2)
    heads = torch.nn.ModuleList(torch.nn.Linear(T5_WIDTH, encoder.config.vocab_size) for _ in offsets)
    encoder.requires_grad_(True).train()
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=3e-3, weight_decay=0.0)
    padded = F.pad(ids, (2, 2), value=pipe.tokenizer_2.pad_token_id)  # a neighbour past either end reads as padding
    for _ in range(steps):
        hidden = encoder(ids, output_hidden_states=False)[0]
        loss = sum(F.cross_entropy(head(hidden).flatten(0, 1), padded[:, 2 + o: 2 + o + TEXT_LENGTH].flatten())
                   for head, o in zip(heads, offsets, strict=True)) / len(offsets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.requires_grad_(False).eval()
    report = {"steps": steps, "loss": round(loss.item(), 4), "binding_before": before, "binding": binding_report(pipe)}
    logger.info("T5 pretraining: %s", report)
    return report


def binding_report(pipe: FluxPipeline) -> dict:
    """How well the T5 tokens (the denoiser's per-token conditioning, read as a set) tell a prompt from its
    swapped-binding twin: the mean nearest-token distance between the two prompts' token sets, relative to the same
    distance for prompts differing in one word. Near 0: a bag of words."""
    pairs = [("a photo of a red circle and a blue square", "a photo of a blue circle and a red square"),
             ("a photo of a red circle left of a blue square", "a photo of a blue square left of a red circle")]

    def set_distance(a: str, b: str) -> float:
        embeds, _ = encode_prompts(pipe, [a, b])
        return torch.cdist(embeds[0], embeds[1]).min(1).values.mean().item()

    scale = set_distance("a photo of a red circle", "a photo of a blue circle")
    return {"colour_swap": round(set_distance(*pairs[0]) / scale, 3),
            "position_swap": round(set_distance(*pairs[1]) / scale, 3)}


def rectified_flow_pair(x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The rectified-flow training pair for packed latents `x0` `[B, S, C]`: (x_t, s, eps - x0) with
    x_t = (1 - s) x0 + s eps, s ~ U(0, 1); the denoiser's output at (x_t, s) regresses eps - x0. Draws s, then eps,
    from `gen` (the shipped weights depend on that order). Shared with train_shapes_edit.py."""
    sigma = torch.rand(len(x0), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise, sigma, noise - x0


def train_denoiser(pipe, latents: torch.Tensor, prompt_index: torch.Tensor, records: list[dict], args,
                   reward: GenEvalReward) -> list[dict]:
    transformer = pipe.transformer
    embeds, pooled = encode_prompts(pipe, [*[r["prompt"] for r in records], ""])
    empty = len(records)
    h = latents.shape[-1] // 2
    img_ids = pipe._prepare_latent_image_ids(1, h, h, "cpu", torch.float32)
    txt_ids = torch.zeros(TEXT_LENGTH, 3)
    gen = torch.Generator().manual_seed(args.seed + 4)
    opt = torch.optim.AdamW(transformer.parameters(), lr=args.denoiser_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    probes, batch = [], 128
    for step in range(1, args.denoiser_steps + 1):
        transformer.train()
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = pack(pipe, latents[idx])
        cond = torch.where(torch.rand(batch, generator=gen) < 0.1, empty, prompt_index[idx])
        xt, sigma, velocity = rectified_flow_pair(x0, gen)
        pred = transformer(hidden_states=xt, timestep=sigma, pooled_projections=pooled[cond],
                           encoder_hidden_states=embeds[cond], txt_ids=txt_ids, img_ids=img_ids).sample
        loss = F.mse_loss(pred, velocity)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0:
            logger.info("step %d  loss %.4f", step, loss.item())
        if args.probe_every and (step % args.probe_every == 0 or step == args.denoiser_steps):
            transformer.eval()
            result = evaluate(pipe, reward, all_prompts(), per_prompt=2, seed=1234)
            probes.append({"step": step, "loss": round(loss.item(), 4), **result})
            logger.info("step %d  loss %.4f  geneval %s", step, loss.item(), result)
            if args.save_probes:
                save(pipe, Path(args.save_probes) / f"step{step}")
    transformer.eval()
    return probes


def sample_kwargs() -> dict:
    return dict(height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=NUM_INFERENCE_STEPS,
                guidance_scale=1.0, max_sequence_length=TEXT_LENGTH)


@torch.no_grad()
def evaluate(pipe, reward: GenEvalReward, records: list[dict], per_prompt: int, seed: int) -> dict:
    """GenEval accuracy per category and overall (GenEval's overall: the mean of the category accuracies)."""
    prompts = [r["prompt"] for r in records for _ in range(per_prompt)]
    metadata = [{k: v for k, v in r.items() if k != "prompt"} for r in records for _ in range(per_prompt)]
    images = pipe(prompts, generator=torch.Generator().manual_seed(seed), **sample_kwargs()).images
    scores, accuracy = reward.score_and_accuracy(images, prompts, metadata)
    correct = [v.correct for v in reward.last_verdicts]
    per_tag = {tag: round(float(np.mean([c for c, m in zip(correct, metadata, strict=True) if m["tag"] == tag])), 3)
               for tag in CATEGORIES if any(m["tag"] == tag for m in metadata)}
    return {"overall": round(float(np.mean(list(per_tag.values()))), 3), **per_tag,
            "dense": round(scores.mean().item(), 3)}


def save(pipe: FluxPipeline, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder, safe_serialization=True)


def save_grid(pipe, records: list[dict], path: Path, seed: int, columns: int = 8, zoom: int = 3) -> None:
    """Rows: one prompt of each category (test split); columns: seeds."""
    chosen = [next(r for r in records if r["tag"] == tag) for tag in CATEGORIES]
    prompts = [r["prompt"] for r in chosen for _ in range(columns)]
    images = pipe(prompts, generator=torch.Generator().manual_seed(seed), **sample_kwargs()).images
    cell = IMAGE_SIZE * zoom + 2
    grid = Image.new("RGB", (columns * cell, len(chosen) * cell), (128, 128, 128))
    for i, image in enumerate(images):
        big = image.resize((IMAGE_SIZE * zoom,) * 2, Image.NEAREST)
        grid.paste(big, ((i % columns) * cell, (i // columns) * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    logger.info("grid rows: %s", [r["prompt"] for r in chosen])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_SHAPES_DIR)
    parser.add_argument("--grid", type=Path, default=Path("docs/img/shapes_base_grid.png"))
    parser.add_argument("--prompts-dir", type=Path, default=Path("recipes/prompts"), help="where the splits go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=40000, help="rendered training scenes")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--denoiser-steps", type=int, default=6000, help="the budget that sets the base accuracy")
    parser.add_argument("--denoiser-lr", type=float, default=5e-4)
    parser.add_argument("--t5-steps", type=int, default=500, help="T5 pretraining steps on the prompts (0: frozen "
                        "random, the first build's bag of words)")
    parser.add_argument("--vae-from", default="", help="reuse the VAE of a saved shapes pipeline (skips step 1)")
    parser.add_argument("--eval-per-prompt", type=int, default=8)
    parser.add_argument("--probe-every", type=int, default=0)
    parser.add_argument("--save-probes", default="", help="also save the pipeline at every probe under this folder")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the weights depend on it)")
    parser.add_argument("--finish-from", default="", help="skip training: finish from a pipeline saved by "
                        "--save-probes (pass --denoiser-steps = its step for the record)")
    parser.add_argument("--notes", default="{}", help="JSON merged into shapes.json's training record")
    return parser.parse_args()


def build(args: argparse.Namespace) -> tuple[FluxPipeline, dict]:
    """The whole build: render, VAE, T5 pretraining, denoiser. Returns the pipeline and what `finish` records of the
    build: the VAE's report, the T5's (None without `--t5-steps`), timings and probes."""
    start, timings = time.perf_counter(), {}
    records = all_prompts()
    images, index = training_pairs(records, args.images, args.seed)
    pixels = to_vae(images)
    timings["render_s"] = round(time.perf_counter() - start, 1)
    if args.vae_from:  # the VAE does not depend on the text side: reuse a shipped one
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").requires_grad_(False).eval()
        vae_report = {"from": str(args.vae_from)}
    else:
        vae, vae_report = train_vae(pixels, args.seed, args.vae_steps)
    timings["vae_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    reward = GenEvalReward(detector="shapes")
    vae_report["geneval_accuracy_on_reconstructions"] = reconstruction_accuracy(vae, reward, args.seed)
    logger.info("vae: %s (%.0f s)", vae_report, timings["vae_s"])
    pipe = build_pipeline(vae, args.seed)
    t5_report = (pretrain_t5(pipe, [*[r["prompt"] for r in records], ""], args.t5_steps, args.seed)
                 if args.t5_steps else None)
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i:i + 1024]).latent_dist.mean for i in range(0, len(pixels), 1024)])
    latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
    probes = train_denoiser(pipe, latents, torch.tensor(index), records, args, reward)
    timings["denoiser_s"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    return pipe, {"vae": vae_report, "t5": t5_report, "timings": timings, "probes": probes}


def finish(args: argparse.Namespace, pipe: FluxPipeline, built: dict) -> None:
    """Save the pipeline, the prompt splits, the base model's GenEval table (reloaded from disk, sampled as every
    caller will), the sample grid and `shapes.json`; `built` is `build`'s record (empty for `--finish-from`)."""
    start = time.perf_counter()
    timings = built.get("timings", {})
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    save(pipe, out / "pipeline")
    splits = split_prompts()
    args.prompts_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        write_prompts(split, args.prompts_dir / f"shapes_{name}.jsonl")
    shipped = FluxPipeline.from_pretrained(out / "pipeline")
    shipped.set_progress_bar_config(disable=True)
    reward = GenEvalReward(detector="shapes")
    base = {name: evaluate(shipped, reward, split, args.eval_per_prompt, seed=args.seed + 100)
            for name, split in splits.items()}
    judged = {name: evaluate(shipped, GenEvalReward(detector="shapes_judge"), split, args.eval_per_prompt,
                             seed=args.seed + 100) for name, split in splits.items()}
    save_grid(shipped, splits["test"], args.grid, seed=args.seed + 200)
    timings["finish_s"] = round(time.perf_counter() - start, 1)
    logger.info("base model: %s; by the judge: %s", base, judged)
    metadata = {
        "name": "shapes", "description": "Tiny FLUX pipeline: 32x32 scenes of 1-4 coloured shapes (GenEval-style).",
        "pipeline_kwargs": sample_kwargs(), "base_geneval": base, "base_geneval_judge": judged,
        "vae": built.get("vae", {}),
        "binding": binding_report(shipped),
        "training": {"seed": args.seed, "images": args.images, "vae_steps": args.vae_steps,
                     "denoiser_steps": args.denoiser_steps, "denoiser_lr": args.denoiser_lr, "batch": 128,
                     "empty_prompt_rate": 0.1, "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "t5_pretraining": built.get("t5"),
                     "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
                     "timings": timings, "probes": built.get("probes", []), **json.loads(args.notes)},
    }
    (out / "shapes.json").write_text(json.dumps(metadata, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    logger.info("wrote %s (%.2f MB), %s", out, size / 1e6, args.grid)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    torch.set_num_threads(args.threads)
    if args.finish_from:  # a probe saved by --save-probes: the same weights as a build with that many steps
        pipe = FluxPipeline.from_pretrained(args.finish_from)
        pipe.set_progress_bar_config(disable=True)
        finish(args, pipe, {})
    else:
        finish(args, *build(args))


if __name__ == "__main__":
    main()
