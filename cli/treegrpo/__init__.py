"""treegrpo: a TreeGRPO trainer CLI for diffusers models, built on `diffusers_tree`."""

__version__ = "0.1.0"
