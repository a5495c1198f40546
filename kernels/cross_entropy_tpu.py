"""Softmax cross-entropy on TPU (Mosaic): the vocabulary as a trailing reduction grid axis.

Forward: grid ``(row blocks, vocab blocks)`` with semantics ``("parallel", "arbitrary")``. Each
step loads one ``[block_n, block_v]`` block of logits (and of probability labels or of the
``where`` mask when they are dense) and merges it into the float32 accumulators of its rows: the
running max and sum-exp, the target term and the smoothing term (`_blocks.forward_step`). They
live in VMEM scratch while the vocabulary index moves, and the last step writes them packed
along lanes into one ``[1, k, block_n]`` output block (`_blocks.store_packed`): in HBM a
``[N, 1]`` float32 array takes 128 lanes per row, like ``[N, 128]``. The loss is finished
from them outside the kernel (`_tile.finish`).

Backward: grid ``(row blocks, vocab blocks)``, both parallel. Each step recomputes
``p = exp(z' - lse)`` for its block and writes the logits gradient in the logits' dtype (one read
and one write of the logits), plus the probability-label gradient and a per-row partial sum for
an array temperature when those are asked for (`_blocks.backward_block`).

Ragged edges (``N`` not a multiple of ``block_n``, ``V`` not a multiple of ``block_v``, ``V``
below one block) are masked with ``jnp.where`` from global row and column ids; what Pallas
reads past the end of an array is never used, and what it would write there is dropped.

Per-row values are ``[block_n, 1]`` columns; Mosaic pads them to full vregs. TPU memory pads
an ``[N, 1]`` array to 128 lanes per row, so the per-row operands come packed along lanes,
``[N / block_n, k, block_n]`` (`_blocks.pack_rows`), each block transposed once. An array
temperature is a scalar in SMEM. Every block index is int32, also under ``jax_enable_x64``,
where a Python integer in an index map would become int64, which Mosaic does not take.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax_softmax_ce.kernels import _blocks, _tile

from jax_softmax_ce._util import accumulation_dtype


def interpret_params() -> pltpu.InterpretParams:
    """The strict TPU interpreter: races detected, out-of-bounds reads raise, NaN memory."""
    return pltpu.InterpretParams(
        detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan"
    )


def spec(name: str, options, bn: int, bv: int) -> pl.BlockSpec:
    """The BlockSpec of operand ``name`` on a grid ``(i, j)`` of row and vocab blocks."""
    if name == "temperature":  # int32 indices: the default index map's would be int64 under x64
        first = _blocks.first_block
        return pl.BlockSpec((1, 1), lambda i, j: (first(), first()), memory_space=pltpu.SMEM)
    row, col = _blocks.axes(name, options)
    block = (bn if row == 0 else 1, bv if col == 1 else 1)
    return pl.BlockSpec(
        block, lambda i, j: (_blocks.block_index(i, row == 0), _blocks.block_index(j, col == 1))
    )


def _masks(options, ins: _blocks.Operands, n: int, v: int):
    """``(col0, ok, valid)`` of the current block."""
    bn, bv = ins.logits.shape
    i, j = pl.program_id(0), pl.program_id(1)
    row_ids = i * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
    col0 = j * bv
    col_ids = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    ok = (row_ids < n) & (col_ids < v)
    valid = _blocks.valid_mask(ok, None if ins.where is None else ins.where[...])
    return col0, ok, valid


def _specs(names, packed, options, bn: int, bv: int) -> list[pl.BlockSpec]:
    """The BlockSpecs of the operands ``names``, `_blocks.pack_rows`' ``packed`` among them."""
    rows = {field: _blocks.rows_spec(len(cols), bn, lambda i, j: i) for field, cols in packed}
    return [rows[name] if name in rows else spec(name, options, bn, bv) for name in names]


def _loaded(ins: _blocks.Operands, packed) -> _blocks.Operands:
    """The current block of every operand but the logits (an SMEM temperature as a scalar), the
    packed per-row operands unpacked (`_blocks.pack_rows`)."""

    def load(name, ref):
        if ref is None or name == "logits":
            return None
        return ref[0, 0] if name == "temperature" else ref[...]

    loaded = (load(name, ref) for name, ref in zip(ins._fields, ins, strict=True))
    return _blocks.unpack_rows(_blocks.Operands(*loaded), packed)


def _forward_kernel(*refs, options, names, packed, state_tree, n, v):
    ins, (out_ref, *state_refs) = _blocks.named(names, refs)
    dtype = out_ref.dtype
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        init = _blocks.state_init(options, ins.logits.shape[0], dtype)
        for ref, x in zip(state_refs, jax.tree.leaves(init), strict=True):
            ref[...] = x

    col0, ok, valid = _masks(options, ins, n, v)
    blocks = _loaded(ins, packed)
    z = _blocks.masked_logits(options, ins.logits[...].astype(dtype), valid, blocks.temperature)
    state = jax.tree.unflatten(state_tree, [ref[...] for ref in state_refs])
    state = _blocks.forward_step(options, state, z, col0, ok, valid, blocks)
    for ref, x in zip(state_refs, jax.tree.leaves(state), strict=True):
        ref[...] = x

    @pl.when(j == pl.num_programs(1) - 1)
    def _write():
        _blocks.store_packed(out_ref, state)


def forward(options, ops: _blocks.Operands, *, blocks, interpret=False) -> _tile.RowState:
    """The forward accumulators (`_tile.RowState`) of every row, each ``[N, 1]`` in the
    accumulation dtype. ``interpret`` is what ``pallas_call`` takes."""
    n, v = ops.logits.shape
    bn, bv = blocks.block_n, blocks.block_v
    dtype = accumulation_dtype(ops.logits.dtype)
    ops, packed = _blocks.pack_rows(ops, options, bn)
    names, leaves = _blocks.present(ops)
    state = _blocks.state_init(options, bn, dtype)
    state_tree = jax.tree.structure(state)
    k = state_tree.num_leaves
    out = pl.pallas_call(
        functools.partial(
            _forward_kernel,
            options=options,
            names=names,
            packed=packed,
            state_tree=state_tree,
            n=n,
            v=v,
        ),
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        in_specs=_specs(names, packed, options, bn, bv),
        out_specs=_blocks.rows_spec(k, bn, lambda i, j: i),
        out_shape=_blocks.out_struct((pl.cdiv(n, bn), k, bn), dtype, ops.logits),
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype) for x in jax.tree.leaves(state)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="softmax_cross_entropy_fwd_tpu",
    )(*leaves)
    return _blocks.unpacked(out, state_tree, n)


def _backward_kernel(*refs, options, names, packed, n, v):
    ins, outs = _blocks.named(names, refs)
    d_logits_ref, *outs = outs
    d_labels_ref = None if options.integer else outs.pop(0)
    t_ref = outs.pop(0) if outs else None
    col0, ok, valid = _masks(options, ins, n, v)
    z_raw = ins.logits[...].astype(accumulation_dtype(ins.logits.dtype))
    grad = _blocks.backward_block(options, z_raw, col0, ok, valid, _loaded(ins, packed))
    d_logits_ref[...] = grad.d_logits.astype(d_logits_ref.dtype)
    if d_labels_ref is not None:
        d_labels_ref[...] = grad.d_labels.astype(d_labels_ref.dtype)
    if t_ref is not None:
        t_ref[...] = grad.t_part


def backward(options, ops: _blocks.Operands, *, blocks, interpret=False):
    """``(d_logits, d_labels, t_row)``: the logits gradient, the probability-label gradient and
    the per-row temperature terms ``[N, 1]``, None where not asked for."""
    n, v = ops.logits.shape
    bn, bv = blocks.block_n, blocks.block_v
    num_v = pl.cdiv(v, bv)
    dtype = accumulation_dtype(ops.logits.dtype)
    ops, packed = _blocks.pack_rows(ops, options, bn)
    names, leaves = _blocks.present(ops)
    dense = spec("logits", options, bn, bv)
    out_specs = [dense]
    out_shape = [_blocks.out_struct((n, v), ops.logits.dtype, ops.logits)]
    if not options.integer:
        out_specs.append(dense)
        out_shape.append(_blocks.out_struct((n, v), ops.labels.dtype, ops.logits))
    if options.temperature is None:
        t_block = pl.BlockSpec((pl.Squeezed(), bn, 1), lambda i, j: (j, i, _blocks.first_block()))
        out_specs.append(t_block)
        out_shape.append(_blocks.out_struct((num_v, n, 1), dtype, ops.logits))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, options=options, names=names, packed=packed, n=n, v=v),
        grid=(pl.cdiv(n, bn), num_v),
        in_specs=_specs(names, packed, options, bn, bv),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="softmax_cross_entropy_bwd_tpu",
    )(*leaves)
    d_logits, *outs = outs
    d_labels = None if options.integer else outs.pop(0)
    t_row = jnp.sum(outs[0], axis=0) if outs else None
    return d_logits, d_labels, t_row
