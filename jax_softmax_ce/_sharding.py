"""Vocabulary parallelism: the per-row collectives of a loss whose classes are split over a mesh
axis, as in Megatron-LM's vocabulary-parallel cross-entropy.

Inside ``shard_map`` a loss called with ``vocab_axis_name`` sees on each device the logits (or
the projection) of its own slice of the vocabulary, ``V_local`` classes starting at class
``axis_index * V_local``, and labels in global class ids. Each shard forms its rows' forward
accumulators (`kernels._tile.RowState`: max, mass besides it, target and smoothing terms) over
its classes; `combine` gathers those ``[N, k]`` states over the axis (``k`` floats per row, never
the logits) and folds them with `kernels._tile.row_state_combine`, the merge that the kernels use
across blocks, so that every shard holds the whole rows' state and finishes the loss itself. The
backward runs per shard from the combined statistics; the only other collectives are sums of
per-row values (a label's class weight, the valid classes of a row, the temperature's terms)
and, for the fused loss, of the inputs' gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax_ce.kernels import _tile

Axis = str | tuple[str, ...]


def num_shards(axis: Axis) -> int:
    """The number of shards of the vocabulary (the size of ``axis``, a product for a tuple)."""
    return jax.lax.axis_size(axis)


def class_offset(axis: Axis, local_classes: int) -> jax.Array:
    """The global class id of this shard's first class."""
    return jax.lax.axis_index(axis) * local_classes


def combine(state: _tile.RowState, axis: Axis) -> _tile.RowState:
    """The forward state of whole rows from each shard's ``state`` over its own classes: one
    all-gather of the packed ``[N, k]`` state, folded in shard order. The result is the same on
    every shard (typed invariant over ``axis`` inside ``shard_map``)."""
    leaves, tree = jax.tree.flatten(state)
    rows = max(leaf.shape[0] for leaf in leaves)
    packed = jnp.concatenate([jnp.broadcast_to(x, (rows, 1)) for x in leaves], axis=1)
    gathered = jax.lax.all_gather(packed, axis, to="invarying")  # [shards, N, k]
    states = [
        jax.tree.unflatten(tree, [shard[:, c : c + 1] for c in range(len(leaves))])
        for shard in gathered
    ]
    return functools.reduce(_tile.row_state_combine, states)


def psum(x, axis: Axis | None):
    """``x`` summed over ``axis`` (a per-row partial over this shard's classes); unchanged for
    None (no vocabulary axis) and None ``x``."""
    return x if axis is None or x is None else jax.lax.psum(x, axis)
