"""Z-Image: adapter not written yet."""
