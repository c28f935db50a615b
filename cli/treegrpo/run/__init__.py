"""Running a recipe: `setup.py` builds the run once; around it the output folder and its lock (`folder.py`),
checkpoints and resume (`checkpoint.py`), stop signals (`signals.py`), CPU threads (`threads.py`), the EMA
(`ema.py`), the prompt-embedding cache (`prompt_cache.py`), trackers (`tracking.py`), the console (`reporting.py`)
and metrics files and plots (`metrics.py`)."""
