"""`--lora` takes another trainer's peft adapter folder (`PeftModel.save_pretrained`: Flow-GRPO, Flow-Factory): the
converted LoRA in the stock pipeline computes what the peft model computes, alpha / r and per-module patterns
included."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from treegrpo.hub.lora import PEFT_WEIGHTS, load_lora_into, lora_source  # noqa: E402
from treegrpo.hub.summary import LoraLoadError  # noqa: E402


def transformer_inputs(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    return dict(hidden_states=torch.randn(2, config.in_channels, size, size, generator=generator),
                encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([500.0, 20.0]), return_dict=False)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_folder_loads_into_the_stock_pipeline_and_computes_the_same(tmp_path, tiny_sd3_dir, rslora):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_rslora=rslora,
                        rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 3}, init_lora_weights="gaussian")
    peft_model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter something to do
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        expected = peft_model(**transformer_inputs(base.config))[0]
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            untouched = plain(**transformer_inputs(base.config))[0]
    peft_model.save_pretrained(tmp_path / "flow_grpo_checkpoint")

    source, kwargs = lora_source(str(tmp_path / "flow_grpo_checkpoint"))
    assert kwargs == {"weight_name": PEFT_WEIGHTS}  # judged before any model loads
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    load_lora_into(stock, str(tmp_path / "flow_grpo_checkpoint"))
    with torch.no_grad():
        loaded = stock.transformer(**transformer_inputs(stock.transformer.config))[0]
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    assert (loaded - untouched).abs().max() > 1e-3


def test_dora_adapters_are_refused_in_one_line(tmp_path, tiny_sd3_dir):
    import json

    from diffusers import StableDiffusion3Pipeline

    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    (folder / PEFT_WEIGHTS).write_bytes(b"")
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    with pytest.raises(LoraLoadError, match="with DoRA; only plain LoRA converts"):
        load_lora_into(stock, str(folder))
