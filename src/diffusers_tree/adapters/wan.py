"""Wan 2.1 text-to-video: adapter not written yet."""
