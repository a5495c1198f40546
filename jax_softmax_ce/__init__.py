"""Softmax cross-entropy losses for JAX: optax-compatible, with every option, and memory-lean."""

from jax_softmax_ce._version import __version__ as __version__
from jax_softmax_ce.cross_entropy import softmax_cross_entropy as softmax_cross_entropy
from jax_softmax_ce.cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jax_softmax_ce.linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
