"""The model card of a pushed run (README.md on the Hub): diffusers' LoRA card conventions, the base model,
how the run was trained, its samples and results, and a copy-paste snippet. Built offline from the run folder
(`treegrpo.hub.summary.read_run`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from treegrpo.dtypes import TORCH_NAMES

if TYPE_CHECKING:
    from treegrpo.hub.summary import RunSummary

ALGORITHMS = {
    "tree": "TreeGRPO (tree-structured rollouts, advantages backed up the tree)",
    "flat": "flat GRPO baseline (DanceGRPO-style: independent SDE trajectories)",
    "mix": "MixGRPO-style baseline (SDE only inside the window)",
}
DTYPE_NAMES = {name: f"torch.{torch_name}" for name, torch_name in TORCH_NAMES.items()}  # for the snippet

# shipped models: the loader of `treegrpo.builtin` a card's snippet calls
BUILTIN_LOADERS = {"builtin:digits": "load_digits_pipeline", "builtin:shapes": "load_shapes_pipeline",
                   "builtin:shapes_edit": "load_shapes_edit_pipeline"}

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA adapter for {{ base_line }}, fine-tuned by `treegrpo` with {{ algorithm }} to maximize
{{ reward_names }}.
Stored in the diffusers format (`pytorch_lora_weights.safetensors`): load it with `load_lora_weights`.

{% if images %}## Samples

{% for caption, path in images %}**{{ caption }}**

![{{ caption }}]({{ path }})

{% endfor %}{% endif %}## Usage

```python
{{ snippet }}
```

Fuse the LoRA into the weights for faster inference with `pipe.fuse_lora()`; `pipe.unfuse_lora()` undoes it.

## Training

| | |
|---|---|
{% for key, value in training %}| {{ key }} | {{ value }} |
{% endfor %}
{% if results %}### Results (from `metrics.jsonl`: rollout leaves; `eval/…` from `eval.jsonl`: ODE samples, its first
column the untrained model)

| metric | first epoch | last epoch | best |
|---|---|---|---|
{% for name, first, last, best in results %}| {{ name }} | {{ first }} | {{ last }} | {{ best }} |
{% endfor %}{% endif %}
The full recipe is in [`recipe.resolved.toml`](recipe.resolved.toml) and every epoch's metrics in
[`metrics.jsonl`](metrics.jsonl). The LoRA scaling (alpha / rank) is multiplied into `lora_B` and the file says
r = lora_alpha, so every diffusers version loads it with the trained strength.
"""


def model_card(summary: RunSummary, repo_id: str):
    """The README.md for `repo_id`, built offline with `ModelCard.from_template`."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe, family = summary.recipe, summary.family
    # diffusers' LoRA card conventions (its training scripts' tags and the widget gallery the Hub renders)
    tags = [family.task, "diffusers-training", "diffusers", "lora", "template:sd-lora", *family.tags, "treegrpo",
            "grpo", "reinforcement-learning"]
    extra = {"base_model_relation": "adapter"} if summary.base_model else {}
    if "samples/final.png" in summary.images:
        extra["widget"] = [{"text": summary.example_prompt, "output": {"url": "samples/final.png"}}]
    data = ModelCardData(base_model=summary.base_model, library_name="diffusers", pipeline_tag=family.task,
                         tags=list(dict.fromkeys(tags)), **extra)
    captions = {"samples/before.png": "Before training", "samples/final.png": "After training",
                "reward_curve.png": "Mean reward per epoch"}
    images = [(captions[p], p) for p in ("samples/before.png", "samples/final.png", "reward_curve.png")
              if p in summary.images]
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, title=f"{repo_id.split('/')[-1]}: a TreeGRPO LoRA",
        base_line=_base_line(summary), algorithm=ALGORITHMS.get(recipe.get("tree", {}).get("algorithm", "tree"),
                                                               "TreeGRPO"),
        reward_names=_reward_names(recipe), images=images, snippet=usage_snippet(summary, repo_id),
        training=_training_rows(summary), results=_results(summary.metrics, recipe, summary.evaluations))


def usage_snippet(summary: RunSummary, repo_id: str) -> str:
    """Copy-paste Python that loads the base model with the right pipeline class and this LoRA."""
    recipe = summary.recipe
    sampling = recipe.get("sampling", {})
    prompt = summary.example_prompt
    if summary.pretrained in BUILTIN_LOADERS and not summary.base_model:
        loader = BUILTIN_LOADERS[summary.pretrained]
        return "\n".join([
            "# the base model ships with treegrpo: in a checkout of diffusers-tree, `pip install -e .`",
            f"from treegrpo.builtin import {loader}",
            "", f"pipe, meta = {loader}()", f'pipe.load_lora_weights("{repo_id}")',
            *(["from PIL import Image", 'source = Image.open("source.png").convert("RGB")  # a 32x32 scene',
               f"images = pipe(image=source, prompt=[{json.dumps(prompt)}] * 8, **meta[\"pipeline_kwargs\"]).images"]
              if summary.family.task == "image-to-image" else
              [f"images = pipe([{json.dumps(prompt)}] * 8, **meta[\"pipeline_kwargs\"]).images"])])
    base = summary.base_model or summary.pretrained
    call = {"num_inference_steps": sampling.get("num_inference_steps"), "guidance_scale":
            sampling.get("guidance_scale"), "height": sampling.get("height"), "width": sampling.get("width")}
    if summary.family.sequence_length:  # the T5 / LLM text encoders' token length
        call["max_sequence_length"] = sampling.get("max_sequence_length")
    video = summary.family.task == "text-to-video"
    if video:
        call["num_frames"] = sampling.get("num_frames")
    args = "".join(f", {k}={json.dumps(v)}" for k, v in call.items() if v is not None)
    dtype = DTYPE_NAMES.get(recipe.get("model", {}).get("dtype", "fp32"), "torch.float32")
    comment = "" if summary.base_model else "  # the local base model this LoRA was trained on"
    return "\n".join([
        "import torch", f"from diffusers import {summary.family.pipeline_class}", "",
        f'pipe = {summary.family.pipeline_class}.from_pretrained("{base}", torch_dtype={dtype}){comment}',
        'pipe.to("cuda" if torch.cuda.is_available() else "cpu")', f'pipe.load_lora_weights("{repo_id}")',
        *([f"frames = pipe({json.dumps(prompt)}{args}).frames[0]", "from diffusers.utils import export_to_video",
           'export_to_video(frames, "sample.mp4", fps=16)'] if video else
          ["from diffusers.utils import load_image", 'source = load_image("source.png")  # the image to edit',
           f"image = pipe(image=source, prompt={json.dumps(prompt)}{args}).images[0]", 'image.save("edited.png")']
          if summary.family.task == "image-to-image" else
          [f"image = pipe({json.dumps(prompt)}{args}).images[0]", 'image.save("sample.png")'])])


def _base_line(summary: RunSummary) -> str:
    if summary.pretrained == "builtin:shapes":
        return ("`builtin:shapes`, the tiny FLUX-style model (a real `FluxPipeline`, 32x32 scenes of coloured "
                "shapes for GenEval-style prompts) shipped with treegrpo")
    if summary.pretrained == "builtin:shapes_edit":
        return ("`builtin:shapes_edit`, the tiny FLUX.1 Kontext-style editing model (a real `FluxKontextPipeline` "
                "that recolours one object of a 32x32 shapes scene) shipped with treegrpo")
    if summary.pretrained == "builtin:digits":
        return ("`builtin:digits`, the tiny SD3-style model (a real `StableDiffusion3Pipeline`, 16x16 handwritten "
                "digits) shipped with treegrpo")
    if summary.base_model:
        link = f"[{summary.base_model}](https://huggingface.co/{summary.base_model})"
        local = f"; trained from the local copy `{summary.pretrained}`" if summary.pretrained != summary.base_model \
            else ""
        return f"{link} (`{summary.family.pipeline_class}`{local})"
    return (f"the local model `{summary.pretrained}` (`{summary.family.pipeline_class}`; no Hub id known: push with "
            "`--base-model org/name` to link it)")


def _reward_names(recipe: dict) -> str:
    rewards = recipe.get("reward", [])
    return " + ".join(f"{r.get('weight', 1.0):g} x `{r.get('name') or r.get('function') or r.get('kind')}`"
                      for r in rewards) or "a reward"


def _training_rows(summary: RunSummary) -> list[tuple[str, str]]:
    recipe = summary.recipe
    tree, train, sampling = recipe.get("tree", {}), recipe.get("train", {}), recipe.get("sampling", {})
    lora = recipe.get("model", {}).get("lora") or {}
    rewards = ", ".join(f"`{r.get('kind')}`" + (f" ({r['function']})" if r.get("function") else "")
                        + f" x {r.get('weight', 1.0):g}" for r in recipe.get("reward", []))
    done = len(summary.metrics)
    rows = [("algorithm", f"{ALGORITHMS.get(tree.get('algorithm', 'tree'), 'TreeGRPO')}; branch_factor "
                          f"{tree.get('branch_factor')}, window_width {tree.get('window_width')}, num_trees "
                          f"{tree.get('num_trees', 1)}"),
            ("rewards", rewards or "?"),
            ("epochs", f"{done} of {train.get('epochs')}" if done and done != train.get("epochs")
             else str(train.get("epochs"))),
            ("optimizer steps", str((done or train.get("epochs") or 0) * train.get("updates_per_epoch", 1))),
            ("prompts per epoch", str(recipe.get("data", {}).get("prompts_per_epoch"))),
            ("sampling", f"{sampling.get('num_inference_steps')} steps, guidance "
                         f"{sampling.get('guidance_scale') or 'default'}, {sampling.get('height')}x"
                         f"{sampling.get('width')}, SDE {sampling.get('sde_type') or 'default'}"),
            ("optimizer", f"AdamW, lr {train.get('learning_rate')}, seed {train.get('seed')}"),
            ("LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')} (stored with r = alpha = "
                     f"{summary.lora_rank}, scaling baked in)" if lora else "?"),
            ("base model", f"`{summary.pretrained}`")]
    return rows


def _results(metrics: list[dict], recipe: dict, evaluations: list[dict] = ()) -> list[tuple[str, str, str, str]]:
    if not metrics:
        return []
    rewards = [r.get("name") or r.get("kind") for r in recipe.get("reward", [])]
    means = [f"reward/{name}/mean" for name in rewards] if len(rewards) > 1 else []  # one reward: = reward/mean
    names = ["reward/mean", *means, *(f"reward/{name}/accuracy" for name in rewards)]  # accuracy: if defined
    rows = []
    for name in dict.fromkeys(names):
        values = [m[name] for m in metrics if isinstance(m.get(name), (int, float))]
        if values:
            rows.append((f"`{name}`", f"{values[0]:.4g}", f"{values[-1]:.4g}", f"{max(values):.4g}"))
    judged = [key for key in dict.fromkeys(k for row in evaluations for k in row)
              if key.startswith("eval/") and key != "eval/best"]
    for name in judged:
        values = [row[name] for row in evaluations if isinstance(row.get(name), (int, float))]
        if values:
            rows.append((f"`{name}`", f"{values[0]:.4g}", f"{values[-1]:.4g}", f"{max(values):.4g}"))
    return rows


