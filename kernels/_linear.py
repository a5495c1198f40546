"""The fused linear softmax cross-entropy's tile steps, shared by its XLA loops and both of its
Pallas schedules (`linear_tpu`, `linear_gpu`).

A tile is one ``[block_n, block_v]`` block of logits ``z = x W (+ b)``, formed by a matmul (in
the Pallas schedules, a sum of matmuls over ``block_d`` chunks of ``D``) from a block of inputs
and a block of the projection (``[block_v, D]`` in the tied ``"vd"`` layout, contracted without
a transposed copy). What happens to a tile once formed is `_blocks.forward_step` and
`_blocks.backward_block`, the same steps as the logits losses' kernels; `Tile` hands them the
tile's other operands. The backward adds ``dz W^T`` and ``x^T dz`` (`input_grad`,
`weight_grad`) to float32 accumulators, unless the gradient filter (Cut Cross-Entropy: every
``|dl/dz'|`` of the tile below ``filter_eps``) drops the tile.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax_softmax_ce.kernels import _blocks, _tile

from jax_softmax_ce._util import accumulation_dtype


def logits_tile(x: jax.Array, w: jax.Array, bias, *, vd: bool) -> jax.Array:
    """``x W (+ b)``: ``[rows, cols]`` raw logits in the accumulation dtype.

    ``x`` is ``[rows, D]``; ``w`` is ``[D, cols]``, or ``[cols, D]`` when ``vd`` (the tied layout,
    contracted on its last axis without a transposed copy); ``bias`` is None or ``[1, cols]``.
    """
    acc = accumulation_dtype(x.dtype)
    contract = ((1,), (1,)) if vd else ((1,), (0,))
    z = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=acc)
    if bias is not None:
        z = z + bias.astype(acc)
    return z


def input_grad(dz, w, *, vd: bool) -> jax.Array:
    """``dz W^T``: ``[rows, D]`` in the accumulation dtype, from ``dz`` ``[rows, cols]`` (rounded
    to the projection's dtype first, as the forward's matmul reads it)."""
    acc = accumulation_dtype(w.dtype)
    contract = ((1,), (0,)) if vd else ((1,), (1,))
    return jax.lax.dot_general(
        dz.astype(w.dtype), w, (contract, ((), ())), preferred_element_type=acc
    )


def weight_grad(x, dz, *, vd: bool) -> jax.Array:
    """``x^T dz`` as ``[D, cols]`` (``[cols, D]`` when ``vd``), in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    dz = dz.astype(x.dtype)
    if vd:
        return jax.lax.dot_general(dz, x, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return jax.lax.dot_general(x, dz, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def columns_ok(col0, lo, cols: int, num_classes: int) -> jax.Array:
    """``[1, cols]`` bool: global class ids ``col0 + j`` in ``[lo, num_classes)``.

    ``lo`` lets a block that was moved back to stay inside the array skip the columns that an
    earlier block already covered; out-of-range ids are the padding of a ragged last block.
    """
    ids = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1)
    return (ids >= lo) & (ids < num_classes)


def rows_ok(row0, lo, rows: int, num_rows: int) -> jax.Array:
    """``[rows, 1]`` bool: global row ids ``row0 + i`` in ``[lo, num_rows)``."""
    ids = row0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    return (ids >= lo) & (ids < num_rows)


def hidden_ok(k0, cols: int, hidden: int) -> jax.Array:
    """``[1, cols]`` bool: hidden indices ``k0 + k`` inside ``[0, hidden)``, the chunk of ``D``
    that a schedule forming its tiles chunk by chunk reads at ``k0``."""
    return k0 + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1) < hidden


def block_start(index, block: int, size: int):
    """Start of block ``index``: ``index * block``, moved back so the block ends inside ``size``."""
    return jnp.minimum(index * block, size - block)


def when_kept(keep, update, acc):
    """``update(acc)``, or ``acc`` unchanged where the gradient filter dropped the tile
    (``keep`` False); ``keep`` None means no filter."""
    if keep is None:
        return update(acc)
    return jax.lax.cond(keep, update, lambda a: a, acc)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The static shape of a Pallas schedule: tile sizes, array extents and the weight layout."""

    bn: int
    bv: int
    bd: int
    num_rows: int
    num_classes: int
    hidden: int
    vd: bool

    @classmethod
    def of(cls, blocks, ops: _blocks.Operands, options, *, clip: bool) -> Geometry:
        """With ``clip`` (the TPU schedule) the tiles are clipped to the arrays, whose ragged
        last blocks Pallas pads; the GPU schedule takes them as given and masks its loads,
        since Triton's ``dot`` needs power-of-two tiles of at least 16."""
        n, d = ops.x.shape
        v = ops.w.shape[0 if options.vd else 1]
        sizes = (blocks.block_n, blocks.block_v, blocks.block_d)
        if clip:
            sizes = tuple(min(b, size) for b, size in zip(sizes, (n, v, d), strict=True))
        return cls(*sizes, n, v, d, options.vd)

    @property
    def chunks(self) -> int:
        """The number of ``bd`` chunks of the hidden size."""
        return pl.cdiv(self.hidden, self.bd)


class Tile:
    """The operands other than ``x`` and ``w`` of the tile at rows ``row0 + [0, rows)`` and
    columns ``col0 + [0, cols)`` (``start`` and ``shape``) of ``[num_rows, num_classes]``
    logits (``extents``), given as ``blocks`` (`_blocks.Operands` of loaded blocks), and the
    block steps on the raw logits that a schedule forms from ``x`` and ``w``.

    Rows and columns below ``lo`` (covered by an earlier block that was moved back to end at
    the array's edge) or past the extents (the padding of a ragged block) are not part of the
    tile: the columns are masked, and the rows get a zero cotangent (their saved statistics are
    zeroed too, since padding may hold garbage, NaN in interpret mode), so they add no
    gradient."""

    def __init__(self, blocks: _blocks.Operands, options, *, start, lo, shape, extents):
        self.options = options
        (row0, self.col0), (rows, cols), (num_rows, num_classes) = start, shape, extents
        row_ok = rows_ok(row0, lo[0], rows, num_rows)
        self.ok = columns_ok(self.col0, lo[1], cols, num_classes)
        self.valid = _blocks.valid_mask(self.ok, blocks.where)

        def rows_only(x):
            return None if x is None else jnp.where(row_ok, x, jnp.zeros((), x.dtype))

        per_row = ("m", "r", "ct", "aux_p", "aux_x", "aux_a", "aux_t")
        self.blocks = blocks._replace(**{k: rows_only(getattr(blocks, k)) for k in per_row})
        bias = blocks.bias
        self.bias = None if bias is None else jnp.where(self.ok, bias, jnp.zeros((), bias.dtype))

    def forward(self, state: _tile.RowState, z_raw) -> _tile.RowState:
        """``state`` with this tile of raw logits merged in."""
        b = self.blocks
        z = _blocks.masked_logits(self.options, z_raw, self.valid, b.temperature)
        z = z.astype(state.lse.m.dtype)
        return _blocks.forward_step(self.options, state, z, self.col0, self.ok, self.valid, b)

    def backward(self, z_raw, *, filter_eps: float) -> _blocks.BlockGrad:
        """The gradient of this tile of raw logits, recomputed from the saved statistics."""
        return _blocks.backward_block(
            self.options, z_raw, self.col0, self.ok, self.valid, self.blocks, filter_eps=filter_eps
        )


class Grads(NamedTuple):
    """The fused backward's gradients: ``d_inputs`` and ``d_weight`` in the operands' dtype
    (accumulated in float32 and rounded once), ``d_bias`` and ``t_sum`` in the accumulation
    dtype."""

    d_inputs: jax.Array  # [N, D]
    d_weight: jax.Array  # like the weight
    d_bias: jax.Array | None  # [V]
    t_sum: jax.Array | None  # scalar sum of the rows' temperature terms (array temperature)
