"""Benchmarks of jax_softmax_ce against optax, PyTorch, Liger and cut cross-entropy."""
