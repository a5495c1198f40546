"""Small helpers that the public modules and the kernels share: the accumulation dtype, and the
``shard_map`` axes a value varies over."""

from __future__ import annotations

import jax
import numpy as np


def accumulation_dtype(dtype) -> np.dtype:
    """float64 for float64 inputs, float32 for everything narrower: what sums, log-sum-exps and
    losses are computed in, and the dtype of the losses returned."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def varying_axes(x) -> frozenset[str]:
    """The ``shard_map`` axes over which ``x`` varies (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; before: aval.vma
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def weighted_term(weight: jax.Array, term: jax.Array) -> jax.Array:
    """``weight * term`` where a zero weight contributes 0 even when ``term`` is +inf; unlike
    `kernels._tile.weighted`, the derivative with respect to ``weight`` stays ``term`` wherever
    that is finite (a label gradient at a zero label)."""
    return weight * jax.numpy.where((weight == 0) & jax.numpy.isinf(term), 0, term)
