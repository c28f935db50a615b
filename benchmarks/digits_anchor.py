"""A lever against the digits policy's narrowing, measured and not shipped: a per-noise anchor reward. Every leaf is
also scored by its closeness (minus the RMS pixel distance) to the BASE model's ODE image from its tree's own root
noise (the stock pipeline, LoRA disabled, the tree's generator replayed), so among a tree's leaves the one that
gets the digit right while staying nearest what the base model drew from that noise wins, instead of the most
prototypical digit. It runs `treegrpo run` with the trainer's rollout wrapped; the recipe's reward list carries the
anchor as a placeholder reward whose scores this replaces (its `weight` is the anchor's weight):

    python benchmarks/digits_anchor.py recipes/digits.toml --set train.cpu_threads=1 --set 'reward=[{kind="digits",
        strict=true}, {kind="python", function="benchmarks/digits_anchor.py:placeholder", weight=0.5,
        name="anchor"}]' --set output.dir='"/tmp/anchor"'

Name the placeholder `anchor_gated` to gate the anchor by the first reward: a leaf earns closeness only as far as
that reward accepts it (score · max(0, 1 − distance / ANCHOR_SCALE)), so a wrong digit gains nothing by staying near
a wrong anchor.

The first epoch prints the leaves' distance to their own tree's anchor and to another tree's (with `sampling.eta`
near 0 the first is ~0.015: the replayed noise is the rollout's). Results: docs/benchmarks.md, "Judged strictly".
"""

from __future__ import annotations

import sys

import torch

ANCHOR_SCALE = 0.3  # RMS pixel distance at which a gated anchor's credit reaches 0 (another tree's anchor: ~0.26)


def placeholder(images, prompts):
    """The anchor's slot in the reward list (scores replaced after the rollout)."""
    return torch.zeros(len(images))


def anchored(rollout_and_score):
    """`rollout_and_score` with the second reward row replaced by each leaf's closeness to its tree's anchor."""
    from treegrpo.model.loading import stock_call

    reported = []

    def wrapped(run, prompts, metadata, conditioning, generators, window_start, **kwargs):
        states = [g.get_state() for g in generators]  # before the rollout draws the root noise from them
        out = rollout_and_score(run, prompts, metadata, conditioning, generators, window_start, **kwargs)
        trees = run.recipe.tree.num_trees
        run.pipe.set_progress_bar_config(disable=True)
        run.denoiser.disable_adapters()
        try:
            with torch.no_grad(), run.text_encoders_ready():
                call = stock_call(run.pipe, {**run.sampling.as_kwargs(),
                                             "prompt": [p for p in prompts for _ in range(trees)]})
                anchors = run.pipe(num_inference_steps=run.recipe.sampling.num_inference_steps, output_type="pt",
                                   generator=[torch.Generator().set_state(s) for s in states],
                                   **call).images.float().cpu()
        finally:
            run.denoiser.enable_adapters()
        leaves = out.images.float().cpu()
        tree_of_leaf = torch.arange(leaves.shape[0]) // (leaves.shape[0] // anchors.shape[0])

        def rms(targets):
            return ((leaves - targets) ** 2).flatten(1).mean(1).sqrt()

        if not reported:
            reported.append(True)
            other = anchors[(tree_of_leaf + 1) % anchors.shape[0]]
            print(f"anchor: leaves' RMS distance to their own tree's anchor {rms(anchors[tree_of_leaf]).mean():.3f}, "
                  f"to another tree's {rms(other).mean():.3f}")
        distance = rms(anchors[tree_of_leaf])
        if (run.recipe.reward[1].name or "").endswith("gated"):
            # only a leaf the first reward accepts earns closeness (1 at its anchor, 0 at ANCHOR_SCALE or beyond):
            # a wrong digit gains nothing by staying near a wrong anchor
            out.scores[1] = out.scores[0] * (1 - distance / ANCHOR_SCALE).clamp(min=0)
        else:
            out.scores[1] = -distance
        return out

    return wrapped


def main() -> None:
    import treegrpo.train.trainer as trainer
    from treegrpo.app import app

    trainer.rollout_and_score = anchored(trainer.rollout_and_score)
    sys.argv = ["treegrpo", "run", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
