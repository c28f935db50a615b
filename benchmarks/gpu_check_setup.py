"""The models and recipes `gpu_check.py` runs: the SD3.5-Medium-size (random weights), 9M-parameter and tiny SD3
pipelines built from config, the reward, and the recipe for each part. Split from gpu_check.py, which runs them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a white house"]
REWARD_MODULE = '''
import numpy as np

def brightness(images, prompts):
    return [float(np.asarray(image, dtype=np.float32).mean()) / 255.0 for image in images]
'''

# size name -> what to build and how to sample it
SIZES = {
    "sd35m": dict(height=512, width=512, dtype="bf16", lora_rank=32, lora_alpha=64, max_sequence_length=64,
                  steps=10, epochs=2, micro_batch_sweep=(1, 2, 4, 8, 13), flat_micro_batch_sweep=(13,)),
    "tiny": dict(height=32, width=32, dtype="fp32", lora_rank=4, lora_alpha=8, max_sequence_length=16, steps=10,
                 epochs=1, micro_batch_sweep=(1, 13), flat_micro_batch_sweep=(13,)),
}


def build_sd35m_pipeline():
    """SD3.5-Medium's denoiser and VAE at full size (configs as published), with small text encoders of the widths
    the transformer expects: two CLIPs whose projections concatenate to 2048 and a T5 of width 4096."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffusers_tree.testing import TINY_VOCAB_SIZE, tiny_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm").to(torch.bfloat16)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
            shift_factor=0.0609, sample_size=1024).to(torch.bfloat16)

        def clip(projection_dim: int):
            return CLIPTextModelWithProjection(CLIPTextConfig(
                bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_hidden_layers=1, vocab_size=TINY_VOCAB_SIZE,
                projection_dim=projection_dim)).to(torch.bfloat16)

        t5 = T5EncoderModel(T5Config(vocab_size=TINY_VOCAB_SIZE, d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                     num_heads=4)).to(torch.bfloat16)
        encoders = clip(768), clip(1280), t5
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tiny_tokenizer(), text_encoder_2=encoders[1],
        tokenizer_2=tiny_tokenizer(), text_encoder_3=encoders[2], tokenizer_3=tiny_tokenizer())


def build_model(size: str, folder: Path) -> Path:
    from diffusers_tree.testing import tiny_sd3_pipeline

    if (folder / "model_index.json").is_file():
        return folder
    pipe = build_sd35m_pipeline() if size == "sd35m" else tiny_sd3_pipeline()
    pipe.save_pretrained(folder)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def write_recipe(out: Path, model: Path, size: str, algorithm: str, epochs: int, micro_batch_size: int = 2, *,
                 variant: str = "", tail_steps: int = 2) -> Path:
    """The recipe of one part. `variant`: "" (as the algorithm), "tail" (the ODE tail after the window in at most
    `tail_steps` DPM-Solver++ steps) or "offload" (text encoders kept in CPU memory between encodes)."""
    cfg = SIZES[size]
    extra = ('sde_type = "dance_sde"\neta = 0.3' if algorithm == "flat" else 'sde_type = "flow_sde"')
    if variant == "tail":
        extra += f"\ntail_steps = {tail_steps}"
    name = algorithm + (f"_{variant}" if variant else "")
    text = textwrap.dedent(f"""\
        # written by benchmarks/gpu_check.py
        [model]
        pretrained = "{model}"
        dtype = "{cfg['dtype']}"
        offload_text_encoders = {'true' if variant == "offload" else 'false'}
        [model.lora]
        rank = {cfg['lora_rank']}
        alpha = {cfg['lora_alpha']}
        [sampling]
        num_inference_steps = {cfg['steps']}
        guidance_scale = 4.5
        height = {cfg['height']}
        width = {cfg['width']}
        max_sequence_length = {cfg['max_sequence_length']}
        max_batch_size = 64
        {{extra}}
        [tree]
        algorithm = "{algorithm}"
        branch_factor = 3
        window_width = 3
        timestep_fraction = {0.6 if algorithm == "flat" else 1.0}
        [[reward]]
        kind = "python"
        function = "gpu_check_rewards:brightness"
        [data]
        prompts = "{out / 'prompts.txt'}"
        prompts_per_epoch = 1
        [train]
        epochs = {epochs}
        learning_rate = 1e-3
        micro_batch_size = {micro_batch_size}
        [output]
        dir = "{out / ('run_' + name)}"
        checkpoint_every = 1000
        eval_every = 1000
        log_with = "none"
        samples = false
    """).replace("{extra}", extra)
    path = out / f"{name}.toml"
    path.write_text(text)
    return path
