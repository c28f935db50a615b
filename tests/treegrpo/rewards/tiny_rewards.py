"""Tiny reward checkpoints in their real file layouts, built offline under `torch.manual_seed(0)` (the fixtures
that use them are in conftest.py).

Two flavours of each model:
- random weights (shapes, dtype, determinism, batching);
- "arranged" weights that make a prompt's own image score highest: every attention averages uniformly (zero query
  and key projections, identity values), MLP residual branches are off, and the embeddings put a colour word and a
  flat image of that colour on the same direction. With pure red/blue images and the prompts "red"/"blue", the
  CLIP-style rewards give cos = 1 for the matching pair, and ImageReward's head scores a concentrated [CLS] state
  (matching pair) above a spread one (mismatched pair).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub import, when run alone

import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from treegrpo.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ScoreMLP

WORDS = ["a", "photo", "of", "square", "cat", "dog", "red", "blue", "green"]
COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255)}
IMAGE_SIZE, PATCH, HIDDEN = 16, 8, 32


# ---- tokenizers -----------------------------------------------------------------------------------------------------
def word_tokenizer(specials: list[str], bos: str, eos: str, pad: str, unk: str, max_length: int):
    """Whitespace word-level tokenizer that wraps every text in ``bos ... eos`` (as CLIP's and BERT's do)."""
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=max_length,
    )


def clip_tokenizer():
    # eos id 1 (not 2: CLIP pools at argmax(input_ids) when eos_token_id == 2)
    return word_tokenizer(
        ["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"],
        "<|startoftext|>",
        "<|endoftext|>",
        "<pad>",
        "<unk>",
        77,
    )


def bert_tokenizer():
    return word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS]", "[SEP]", "[PAD]", "[UNK]", 512)


# ---- CLIP (PickScore, CLIPScore, aesthetic backbone, HPS) ----------------------------------------------------------
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    tokenizer = clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    vision = dict(
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=HIDDEN,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=HIDDEN)).eval()
    return model, tokenizer


def color_feature(rgb: tuple[int, int, int]) -> torch.Tensor:
    """The patch embedding of a flat image of colour ``rgb`` under the arranged patch convolution: its normalized
    channel values in dims 0..2, zeros elsewhere. ``[HIDDEN]``."""
    feature = torch.zeros(HIDDEN)
    for c in range(3):
        feature[c] = (rgb[c] / 255 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
    return feature


def _uniform_attention(q, k, v, o, dim):
    """Zero query/key projections (uniform attention), identity value/output projections."""
    for linear in (q, k):
        linear.weight.zero_()
        linear.bias.zero_()
    for linear in (v, o):
        linear.weight.copy_(torch.eye(dim))
        linear.bias.zero_()


def _unit_norms(module):
    for norm in module.modules():
        if isinstance(norm, torch.nn.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()


def _color_patch_conv(conv):
    weight = torch.zeros_like(conv.weight)  # [D, 3, P, P]: channel c averaged into dim c
    for c in range(3):
        weight[c, c] = 1.0 / (conv.weight.shape[-1] * conv.weight.shape[-2])
    conv.weight.copy_(weight)
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def arrange_clip(model, tokenizer):
    """Make text("… red …") and image(flat red) embed to the same direction (see module doc)."""
    for tower in (model.text_model, model.vision_model):
        for layer in tower.encoder.layers:
            a = layer.self_attn
            _uniform_attention(a.q_proj, a.k_proj, a.v_proj, a.out_proj, HIDDEN)
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
        _unit_norms(tower)
    vision = model.vision_model.embeddings
    vision.class_embedding.zero_()
    vision.position_embedding.weight.zero_()
    _color_patch_conv(vision.patch_embedding)
    text = model.text_model.embeddings
    text.position_embedding.weight.zero_()
    text.token_embedding.weight.zero_()
    for word, rgb in COLORS.items():
        text.token_embedding.weight[tokenizer.convert_tokens_to_ids(word)] = color_feature(rgb)
    model.text_projection.weight.copy_(torch.eye(HIDDEN))
    model.visual_projection.weight.copy_(torch.eye(HIDDEN))
    return model


def save_clip(folder, model, tokenizer):
    try:
        from transformers import CLIPImageProcessorPil
    except ImportError:  # transformers < 5.9: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(folder)
    return str(folder)


def clip_to_open_clip(model) -> dict[str, torch.Tensor]:
    """The inverse of the HPS conversion, written out by hand: a transformers CLIPModel as open_clip key names."""
    sd = model.state_dict()
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
    }
    for src, dst, n in (
        ("text_model.encoder", "transformer", model.config.text_config.num_hidden_layers),
        ("vision_model.encoder", "visual.transformer", model.config.vision_config.num_hidden_layers),
    ):
        for i in range(n):
            s, d = f"{src}.layers.{i}.", f"{dst}.resblocks.{i}."
            for w in ("weight", "bias"):
                out[d + f"attn.in_proj_{w}"] = torch.cat([sd[s + f"self_attn.{p}_proj.{w}"] for p in "qkv"])
                out[d + f"attn.out_proj.{w}"] = sd[s + f"self_attn.out_proj.{w}"]
                out[d + f"ln_1.{w}"] = sd[s + f"layer_norm1.{w}"]
                out[d + f"ln_2.{w}"] = sd[s + f"layer_norm2.{w}"]
                out[d + f"mlp.c_fc.{w}"] = sd[s + f"mlp.fc1.{w}"]
                out[d + f"mlp.c_proj.{w}"] = sd[s + f"mlp.fc2.{w}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def save_hps(folder, model, tokenizer, state_dict=None):
    """HPS layout: the open_clip state dict under "state_dict" in HPS_v2.1_compressed.pt (fp16, as released), plus
    the tokenizer and the architecture's config.json for the test."""
    state_dict = clip_to_open_clip(model) if state_dict is None else state_dict
    torch.save({"state_dict": {k: v.half() for k, v in state_dict.items()}}, folder / "HPS_v2.1_compressed.pt")
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---- ImageReward ----------------------------------------------------------------------------------------------------
MED_CONFIG = dict(
    architectures=["BertModel"],
    attention_probs_dropout_prob=0.1,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    hidden_size=HIDDEN,
    initializer_range=0.02,
    intermediate_size=37,
    layer_norm_eps=1e-12,
    max_position_embeddings=40,
    model_type="bert",
    num_attention_heads=4,
    num_hidden_layers=1,
    pad_token_id=0,
    type_vocab_size=2,
    vocab_size=len(WORDS) + 4,
    encoder_width=HIDDEN,
    add_cross_attention=True,
)
BLIP_VISION = dict(
    hidden_size=HIDDEN,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH,
    layer_norm_eps=1e-6,
)


def tiny_blip():
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    text_config = BlipTextConfig(
        vocab_size=MED_CONFIG["vocab_size"],
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=40,
        encoder_hidden_size=HIDDEN,
        is_decoder=True,
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vision = BlipVisionModel(BlipVisionConfig(**BLIP_VISION)).eval()
        text = BlipTextModel(text_config, add_pooling_layer=False).eval()
        mlp = ScoreMLP(HIDDEN).eval()
    return vision, text, mlp


def blip_to_imagereward(vision, text, mlp) -> dict[str, torch.Tensor]:
    """transformers BLIP towers + head as ImageReward.pt keys (BLIP's ViT and med.py BERT names), with the extra
    tensors the released checkpoint carries (contrastive projections, BERT position ids)."""
    renames = {
        "layer_norm1": "norm1",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    vit = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    out = {}
    for key, value in vision.state_dict().items():
        if key in vit:
            out["blip.visual_encoder." + vit[key]] = value
            continue
        layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
        name, which = rest.rsplit(".", 1)
        out[f"blip.visual_encoder.blocks.{layer}.{renames[name]}.{which}"] = value
    out.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    out.update({"mlp." + k: v for k, v in mlp.state_dict().items()})
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    out["blip.vision_proj.weight"], out["blip.vision_proj.bias"] = torch.zeros(8, HIDDEN), torch.zeros(8)
    out["blip.text_proj.weight"], out["blip.text_proj.bias"] = torch.zeros(8, HIDDEN), torch.zeros(8)
    return {k: v.clone().contiguous() for k, v in out.items()}


@torch.no_grad()
def arrange_blip(vision, text, mlp, tokenizer):
    """Matching prompt/image pairs give a [CLS] state along one axis, mismatched pairs along two; the head scores
    −(h0 + h1), which is larger for the concentrated state."""
    for layer in vision.encoder.layers:
        qkv = torch.zeros_like(layer.self_attn.qkv.weight)  # [3D, D]: q, k = 0; v = I
        qkv[2 * HIDDEN :] = torch.eye(HIDDEN)
        layer.self_attn.qkv.weight.copy_(qkv)
        layer.self_attn.qkv.bias.zero_()
        layer.self_attn.projection.weight.copy_(torch.eye(HIDDEN))
        layer.self_attn.projection.bias.zero_()
        layer.mlp.fc2.weight.zero_()
        layer.mlp.fc2.bias.zero_()
    _unit_norms(vision)
    vision.embeddings.class_embedding.zero_()
    vision.embeddings.position_embedding.zero_()
    _color_patch_conv(vision.embeddings.patch_embedding)
    # Every image token ends as LN(color feature); map red's to β·e0 and blue's to β·e1 in the text space, where β
    # is the e0-coefficient of LN(e0), so that text + image is β·(e_text + e_image) up to a shift.
    tokens = torch.stack([F.layer_norm(color_feature(rgb), (HIDDEN,), eps=1e-6) for rgb in COLORS.values()], 1)
    e0 = F.layer_norm(torch.eye(HIDDEN)[0], (HIDDEN,), eps=1e-12)
    beta = float(e0[0] - e0[1])
    mapping = beta * torch.eye(HIDDEN)[:, :2] @ torch.linalg.pinv(tokens)  # [D, D]
    for layer in text.encoder.layer:
        for attention, value in ((layer.attention, torch.eye(HIDDEN)), (layer.crossattention, mapping)):
            for linear in (attention.self.query, attention.self.key):
                linear.weight.zero_()
                linear.bias.zero_()
            attention.self.value.weight.copy_(value)
            attention.self.value.bias.zero_()
            attention.output.dense.weight.copy_(torch.eye(HIDDEN))
            attention.output.dense.bias.zero_()
        layer.output.dense.weight.zero_()
        layer.output.dense.bias.zero_()
    _unit_norms(text)
    text.embeddings.position_embeddings.weight.zero_()
    text.embeddings.word_embeddings.weight.zero_()
    for axis, word in enumerate(COLORS):
        text.embeddings.word_embeddings.weight[tokenizer.convert_tokens_to_ids(word), axis] = 1.0
    for linear in mlp.layers:
        if isinstance(linear, torch.nn.Linear):
            linear.weight.zero_()
            linear.bias.zero_()
            linear.weight[0, 0] = 1.0
    mlp.layers[0].weight[0, :2] = -1.0  # score = −(h0 + h1)


def save_imagereward(folder, state_dict, tokenizer):
    from transformers import BlipVisionConfig

    torch.save(state_dict, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    BlipVisionConfig(**BLIP_VISION).save_pretrained(folder)  # the test's architecture, as `vision_config`
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---- images ---------------------------------------------------------------------------------------------------------
def noise_images(n: int, size: int = 24, seed: int = 0) -> list[Image.Image]:
    """n uniform-noise RGB images."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size, size, 3), generator=generator, dtype=torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


def color_pairs() -> tuple[list[Image.Image], list[str]]:
    """Flat red, blue, red, blue images (32 px) with prompts red, red, blue, blue: pairs 0 and 3 match."""
    images = [Image.new("RGB", (32, 32), COLORS[c]) for c in ("red", "blue", "red", "blue")]
    return images, ["red", "red", "blue", "blue"]
