"""Equal-width bins of the top-label confidence and the expected calibration error from their
sums: one code for `calibration.expected_calibration_error` (from logits) and
`monitoring.batch_metrics` (from the statistics of ``return_aux=True``). It imports nothing of
the package, so that `monitoring`, which the losses import, does not import them back."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def check_num_bins(num_bins) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive Python int, got {num_bins!r}")
    return int(num_bins)


def confidence_bins(confidence: jax.Array, num_bins: int) -> tuple[jax.Array, jax.Array]:
    """``(edges, bins)``: the ``num_bins + 1`` equal-width edges ``i / num_bins`` in the dtype of
    ``confidence``, and the bin of each confidence, bin ``i`` being ``(edges[i], edges[i + 1]]``
    (0 in the first bin, a NaN in the last)."""
    edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidence.dtype)
    bins = jnp.clip(jnp.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    return edges, bins


def sum_per_bin(x: jax.Array, bins: jax.Array, num_bins: int) -> jax.Array:
    """``[num_bins]`` sums of ``x`` over the examples of each bin."""
    return jnp.zeros((num_bins,), x.dtype).at[bins].add(x)


def calibration_gap(count: jax.Array, confidence_sum: jax.Array, correct_sum: jax.Array):
    """The ECE from per-bin sums, ``sum_b |correct_b - confidence_b| / sum_b count_b``, 0 when
    nothing is counted; ``count`` may be a float sum of example weights."""
    total = jnp.sum(count).astype(confidence_sum.dtype)
    gap = jnp.sum(jnp.abs(correct_sum - confidence_sum))
    return jnp.where(total > 0, gap / jnp.where(total > 0, total, 1), 0)
