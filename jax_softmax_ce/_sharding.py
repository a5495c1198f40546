"""Vocabulary parallelism: the per-row collectives of a loss whose classes are split over a mesh
axis, as in Megatron-LM's vocabulary-parallel cross-entropy.

Inside ``shard_map`` a loss called with ``vocab_axis_name`` sees on each device the logits (or
the projection) of its own slice of the vocabulary, ``V_local`` classes starting at class
``axis_index * V_local``, and labels in global class ids. Each shard forms its rows' forward
accumulators (`kernels._tile.RowState`: max, mass besides it, target and smoothing terms, and
with ``return_aux`` the monitoring statistics) over its classes; `combine` gathers those
``[N, k]`` states over the axis (``k`` floats per row, never the logits) and folds them with
`kernels._tile.row_state_combine`, the merge that the kernels use across blocks, so that every
shard holds the whole rows' state and finishes the loss (and the auxiliary values) itself. The
argmax is a global class id in the combined state; the backward, which runs per shard from the
combined statistics, looks for it among the shard's own ids (`local_ids`), as for the labels.
The only other collectives are sums of per-row values (a label's class weight, the valid
classes of a row, the temperature's terms) and, for the fused loss, of the inputs' gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical
from jax_softmax_ce.kernels import _tile
from jax_softmax_ce.monitoring import CrossEntropyAux

Axis = str | tuple[str, ...]


def num_shards(axis: Axis) -> int:
    """The number of shards of the vocabulary (the size of ``axis``, a product for a tuple)."""
    return jax.lax.axis_size(axis)


def class_offset(axis: Axis, local_classes: int) -> jax.Array:
    """The global class id of this shard's first class."""
    return jax.lax.axis_index(axis) * local_classes


def local_ids(ids: jax.Array, axis: Axis, local_classes: int) -> jax.Array:
    """Global class ids ``ids`` (integer labels, or a float argmax) as this shard's: minus its
    first class's id, in ``ids``' dtype. An id of another shard falls outside
    ``[0, local_classes)``."""
    return ids - class_offset(axis, local_classes).astype(ids.dtype)


def combine(
    state: _tile.RowState, axis: Axis, local_classes: int, *, typed: bool = True
) -> _tile.RowState:
    """The forward state of whole rows from each shard's ``state`` over its own
    ``local_classes`` classes: one all-gather of the packed ``[N, k]`` state, folded in shard
    order. The result is the same on every shard, and typed so (invariant over ``axis``) inside
    ``shard_map``; ``typed=False`` where nothing tracks those types (a `custom_partitioning`
    rule's per-device function). A `_tile.Monitor`'s argmax (a class id of the shard's own)
    becomes a global class id first, so the fold keeps the lowest global id among ties."""
    if state.monitor is not None:
        offset = class_offset(axis, local_classes).astype(state.monitor.index.dtype)
        state = state._replace(monitor=_tile.offset_argmax(state.monitor, offset))
    leaves, tree = jax.tree.flatten(state)
    rows = max(leaf.shape[0] for leaf in leaves)
    packed = jnp.concatenate([jnp.broadcast_to(x, (rows, 1)) for x in leaves], axis=1)
    gathered = jax.lax.all_gather(packed, axis, to="invarying" if typed else "varying")
    states = [
        jax.tree.unflatten(tree, [shard[:, c : c + 1] for c in range(len(leaves))])
        for shard in gathered
    ]
    return functools.reduce(_tile.row_state_combine, states)


def psum(x, axis: Axis | None):
    """``x`` summed over ``axis`` (a per-row partial over this shard's classes); unchanged for
    None (no vocabulary axis) and None ``x``."""
    return x if axis is None or x is None else jax.lax.psum(x, axis)


def explicit_as_auto(fn, problem, options):
    """``fn``, or where the operands' types carry an explicit sharding
    (`_canonical.explicit_mesh`), ``fn`` under `jax.sharding.auto_axes`: for an implementation
    without explicit-sharding rules (the kernels' calls, the reference's selects between
    differently sharded operands), which XLA's partitioner then splits. The per-example losses
    (and ``return_aux``'s values) come back sharded like the rows."""
    mesh = _canonical.explicit_mesh(problem)
    if mesh is None:
        return fn
    logits = problem.logits
    spec = jax.typeof(getattr(logits, "inputs", logits)).sharding.spec
    out = jax.sharding.PartitionSpec(spec[0] if spec else None)
    if options.aux:
        out = (out, CrossEntropyAux(out, out, out, out, out if options.integer else None))

    def auto(problem):
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.sharding.auto_axes(fn, out_sharding=out)(problem)

    return auto
