"""Pallas kernels and the per-block math they share, installed as ``jax_softmax_ce.kernels``."""
