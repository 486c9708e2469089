"""Tiny checkpoints built in code, and the offline quickstart that runs the whole pipeline on them."""
