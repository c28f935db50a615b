"""The recipe: its schema (`schema.py`, read once into frozen pydantic models), the reward kinds' required
options (`reward_kinds.py`), reading and overriding it (`loading.py`), what can be judged without a model
(`preflight.py`), the per-epoch plan `treegrpo check` prints (`plan.py`) and the generated reference (`docs.py`).
Only `plan.py` imports torch: a mistake in a recipe comes back in under a second."""
