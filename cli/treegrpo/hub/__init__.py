"""Sharing on the Hugging Face Hub, in import order (no circle): what a run folder holds (`summary.py`), the model
card built from it (`card.py`), `treegrpo push` (`push.py`), and loading a LoRA back into a stock pipeline
(`lora.py`). None of them imports torch."""
