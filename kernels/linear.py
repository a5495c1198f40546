"""The fused linear softmax cross-entropy: its tile steps and its Pallas kernels.

A tile is one ``[block_n, block_v]`` block of logits ``z = x W (+ b)``, formed by a matmul from a
``[block_n, D]`` block of inputs and a ``[D, block_v]`` block of the projection (``[block_v, D]``
in the tied ``"vd"`` layout, contracted without a transposed copy). The tile steps below turn one
such block into the online log-sum-exp and target updates (forward) or into the gradient block
(backward). They are compositions of `kernels._tile` and they are called both by the XLA loops of
`jax_softmax_ce.linear` and by the Pallas kernel bodies here, so the math exists once.

Kernels (``implementation="pallas"``), two schedules of the same tile steps:

- TPU (Mosaic): a grid ``(row blocks, vocab blocks)`` whose last axis is a reduction. The forward
  kernel keeps its running ``(m, s)`` and target sums in the ``[block_n, 1]`` output blocks, which
  stay resident while the vocabulary index moves. The backward is two kernels, as in
  flash attention: ``d_inputs`` on the same grid, and ``d_weight``/``d_bias`` on the transposed
  grid ``(vocab blocks, row blocks)``, each recomputing its tiles from the saved ``lse``. The
  matmul is ``jax.lax.dot_general`` (``jnp.dot``) with float32 accumulation.
- GPU: the Triton backend, chosen explicitly with ``pallas.triton.CompilerParams``. Mosaic GPU, the
  default GPU backend from jax 0.11, lowers no ``dot_general``: a matmul there has to be an
  ``plgpu.wgmma`` over shared-memory references fed by a TMA pipeline, which is a different
  kernel, and one that cannot run in interpret mode on a CPU and so could not be tested by this
  project without an H100. Triton lowers ``jnp.dot`` to ``tl.dot`` (tensor cores), is available
  in jax 0.10 and, deprecated but present, in 0.11. The GPU schedule cannot revisit output blocks
  across a grid axis (grid programs run in parallel), so each program loops over the reduction
  axis itself: one program per row block for the forward and ``d_inputs``, one per vocabulary
  block for ``d_weight``. The GPU schedule is verified in interpret mode only.

Gradient filtering (Cut Cross-Entropy): with ``filter_eps > 0`` the backward skips the two
gradient matmuls of every tile in which all ``|dl/dz'|`` (before the cotangent) are below
``filter_eps``; the tile's logits are still recomputed, since they are what decides.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax_softmax_ce.kernels import _tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows (tokens) and columns (vocabulary) of one logits tile.

    Attributes:
      block_n: rows per tile; clipped to the number of rows.
      block_v: vocabulary entries per tile; clipped to the vocabulary size.
    """

    block_n: int = 1024
    block_v: int = 1024

    def __post_init__(self):
        for name in ("block_n", "block_v"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(cls, implementation: str = "xla") -> BlockSizes:
        """Defaults: large tiles for XLA on CPU, ``(256, 512)`` tiles for the kernels."""
        if implementation == "xla":
            return cls(1024, 2048)
        return cls(256, 512)


class RowState(NamedTuple):
    """The forward accumulators of a row block, each ``[rows, 1]``."""

    lse: _tile.Lse
    target: _tile.Term
    smoothing: _tile.Term | None


def row_state_init(rows: int, dtype, smoothing: bool) -> RowState:
    return RowState(
        _tile.lse_init(rows, dtype),
        _tile.term_init(rows, dtype),
        _tile.term_init(rows, dtype) if smoothing else None,
    )


def logits_tile(x: jax.Array, w: jax.Array, bias, *, vd: bool) -> jax.Array:
    """``x W (+ b)``: ``[rows, cols]`` raw logits in the accumulation dtype.

    ``x`` is ``[rows, D]``; ``w`` is ``[D, cols]``, or ``[cols, D]`` when ``vd`` (the tied layout,
    contracted on its last axis without a transposed copy); ``bias`` is None or ``[1, cols]``.
    """
    acc = _tile.accumulation_dtype(x.dtype)
    contract = ((1,), (1,)) if vd else ((1,), (0,))
    z = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=acc)
    if bias is not None:
        z = z + bias.astype(acc)
    return z


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


def transformed_tile(z_raw, valid, *, softcap, temperature) -> jax.Array:
    """``z' = softcap(z) / T`` on valid classes, -inf elsewhere (``valid`` broadcasts to z)."""
    z = _tile.transform(z_raw, softcap=softcap, temperature=temperature)
    return jnp.where(valid, z, _tile.NEG_INF)


def target_tile(labels, label_weight, col0, ok) -> jax.Array:
    """``[rows, cols]`` target weights ``w_t onehot(t)`` of integer labels ``[rows, 1]``."""
    onehot = _tile.onehot_block(labels, col0, ok.shape[1]) & ok
    return jnp.where(onehot, label_weight, jnp.zeros((), label_weight.dtype))


def smoothing_tile(valid, class_weights, dtype) -> jax.Array:
    """Weights of the uniform smoothing target on this tile: ``w_k`` on valid classes."""
    w = jnp.ones((), dtype) if class_weights is None else class_weights.astype(dtype)
    return jnp.where(valid, w, jnp.zeros((), dtype))


def forward_step(state: RowState, z, target, smoothing) -> RowState:
    """Merges one tile of transformed logits into the running log-sum-exp and target sums."""
    z = z.astype(state.lse.m.dtype)
    lse, ref, shift = _tile.lse_merge(state.lse, z)
    term = _tile.term_merge(state.target, shift, *_tile.dense_term(target, z, ref))
    smooth = None
    if smoothing is not None:
        smoothing = jnp.broadcast_to(smoothing, z.shape)
        smooth = _tile.term_merge(state.smoothing, shift, *_tile.dense_term(smoothing, z, ref))
    return RowState(lse, term, smooth)


def grad_tile(z, lse, total_weight, target, smoothing, n_valid, *, label_smoothing, z_loss):
    """``dl/dz'`` of one tile before the cotangent: ``(W + 2 z_loss lse) p - a``.

    ``total_weight`` is the row's ``W`` (label weight mixed with the smoothing total), ``target``
    and ``smoothing`` are this tile's weights before mixing.
    """
    a = target
    if smoothing is not None:
        a = _tile.mix(label_smoothing, n_valid, target, smoothing)
    return _tile.grad_block(z, lse, total_weight, a, z_loss=z_loss)


def keep_tile(g: jax.Array, filter_eps: float) -> jax.Array:
    """Scalar bool: whether a gradient tile survives the filter (some ``|g| >= eps``, or a NaN)."""
    return jnp.logical_not(jnp.max(jnp.abs(g)) < filter_eps)


def input_grad(dz, w, *, vd: bool) -> jax.Array:
    """``dz W^T``: ``[rows, D]`` in the accumulation dtype, from ``dz`` ``[rows, cols]``."""
    acc = _tile.accumulation_dtype(w.dtype)
    contract = ((1,), (0,)) if vd else ((1,), (1,))
    return jax.lax.dot_general(
        dz.astype(w.dtype), w, (contract, ((), ())), preferred_element_type=acc
    )


def weight_grad(x, dz, *, vd: bool) -> jax.Array:
    """``x^T dz`` as ``[D, cols]`` (``[cols, D]`` when ``vd``), in the accumulation dtype."""
    acc = _tile.accumulation_dtype(x.dtype)
    dz = dz.astype(x.dtype)
    if vd:
        return jax.lax.dot_general(dz, x, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return jax.lax.dot_general(x, dz, (((0,), (0,)), ((), ())), preferred_element_type=acc)
