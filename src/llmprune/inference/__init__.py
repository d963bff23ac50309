"""Inference: measuring speed and memory (``bench``), and running 2:4 weights on sparse tensor cores."""
