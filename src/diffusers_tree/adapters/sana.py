"""SANA: adapter not written yet."""
