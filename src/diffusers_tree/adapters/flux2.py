"""FLUX.2 (and FLUX.2 klein): adapter not written yet."""
