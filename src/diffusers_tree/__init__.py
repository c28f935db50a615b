"""diffusers_tree: TreeGRPO tree rollouts for diffusers.

`TreeSDEScheduler` drops into any stock pipeline of the nine supported families (docs/families.md);
`TreeRolloutPipeline` computes each tree node once; `dynamics`, `window`, `advantages` and `plan` hold the math as
small pure functions.
"""

from .advantages import aggregate_rewards, backup_advantages, effective_sample_size, group_normalize
from .dynamics import StepResult, ddim_step, flow_step
from .pipeline_tree_rollout import TreeRolloutOutput, TreeRolloutPipeline
from .plan import BranchPlan, tree_counts, unique_rows
from .record import RolloutRecord
from .scheduling_tree_sde import TreeSDEScheduler, TreeSDESchedulerOutput
from .window import WindowPolicy, sample_window_start, window_probs

__version__ = "0.1.0"

__all__ = [
    "BranchPlan",
    "StepResult",
    "RolloutRecord",
    "TreeRolloutOutput",
    "TreeRolloutPipeline",
    "TreeSDEScheduler",
    "TreeSDESchedulerOutput",
    "WindowPolicy",
    "aggregate_rewards",
    "backup_advantages",
    "ddim_step",
    "effective_sample_size",
    "flow_step",
    "group_normalize",
    "sample_window_start",
    "tree_counts",
    "unique_rows",
    "window_probs",
    "__version__",
]
