"""What to learn: the training loop (`trainer.py`), one TreeGRPO epoch's pieces (`grpo.py`: prompts, noise,
tree advantages, edge selection, the PPO-clip update over parent nodes), the loss (`loss.py`, Eq. 12) and the
epoch's scoring, metrics and sample grids (`epoch_outputs.py`)."""
