"""Qwen-Image: adapter not written yet."""
