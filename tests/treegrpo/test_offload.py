"""`model.offload_rewards`: reward models in CPU memory except while they score an epoch's leaves."""

import numpy as np
import torch

from treegrpo.recipe.loading import load_recipe
from treegrpo.rewards.base import RewardBase  # noqa: E402
from treegrpo.run.reporting import Reporter
from treegrpo.run.setup import setup
from treegrpo.train.trainer import run_epoch

from .conftest import write_recipe

QUIET = Reporter(enabled=False)


class MovesRecorder(torch.nn.Linear):
    """A reward model that records every `.to(device)`."""

    def __init__(self, log):
        super().__init__(3, 1)
        self.log = log
        with torch.no_grad():  # the same model in both runs
            self.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
            self.bias.zero_()

    def to(self, *args, **kwargs):
        self.log.append(("to", str(args[0] if args else kwargs["device"])))
        return super().to(*args, **kwargs)


class LazyModelReward(RewardBase):
    """Loads its model at the first call, like the shipped model rewards."""

    name = "python"

    def __init__(self, log):
        self.log, self._model = log, None

    def modules(self):
        return [self._model] if self._model is not None else []

    def __call__(self, images, prompts):
        if self._model is None:
            self._model = MovesRecorder(self.log)
        self.log.append(("score", len(images)))
        means = torch.stack([torch.from_numpy(np.asarray(image, dtype="float32")).mean((0, 1)) for image in images])
        return self._model(means / 255).flatten().detach()


def epochs_log(workdir, model_dir, offload: bool, epochs: int = 3):
    recipe = load_recipe(write_recipe(workdir, model_dir, epochs=epochs),
                         [f"model.offload_rewards={'true' if offload else 'false'}",
                          f"output.dir=\"{workdir / ('on' if offload else 'off')}\""])
    run = setup(recipe, QUIET)
    log = []
    run.rewards = [LazyModelReward(log)]
    metrics = []
    for epoch in range(epochs):
        metrics.append(run_epoch(run, epoch))
        log.append(("epoch end", epoch))
    return log, metrics, run


def test_offloaded_reward_models_visit_the_accelerator_only_to_score(workdir, tiny_sd3_dir):
    log, metrics, run = epochs_log(workdir, tiny_sd3_dir, offload=True)
    device = str(run.accelerator.device)
    leaves = run.recipe.data.prompts_per_epoch * run.recipe.tree.num_trees * 4  # k = 2, w = 2
    # epoch 0 loads the model inside the scoring block (on the reward's device) and moves it out after;
    # every later epoch moves it in, scores, and moves it out again before the update
    assert log == [("score", leaves), ("to", "cpu"), ("epoch end", 0),
                   ("to", device), ("score", leaves), ("to", "cpu"), ("epoch end", 1),
                   ("to", device), ("score", leaves), ("to", "cpu"), ("epoch end", 2)]
    assert run.rewards[0]._model.weight.device.type == "cpu"
    plain_log, plain_metrics, _ = epochs_log(workdir, tiny_sd3_dir, offload=False)
    assert [entry for entry in plain_log if entry[0] == "to"] == []  # off: never moved
    assert [m["reward/mean"] for m in metrics] == [m["reward/mean"] for m in plain_metrics]
