"""Softmax cross-entropy on GPU with Pallas' Triton backend: an in-kernel loop over vocabulary.

Forward: a grid over row blocks only. Each program owns ``block_n`` rows and walks the
vocabulary in ``block_v`` columns with a ``fori_loop``, carrying the float32 running max,
sum-exp, target and smoothing terms in registers (`_blocks.forward_step`); it then writes those
accumulators, from which the loss is finished outside the kernel (`_tile.finish`). Backward: a
grid ``(row blocks, vocab blocks)`` with no dependence between programs; each recomputes
``p = exp(z' - lse)`` for its block and writes the logits gradient in the logits' dtype, in one
read and one write of the logits (plus the probability-label gradient and a per-row temperature
partial when asked for).

Every load and store is masked (``plgpu.load(..., mask=...)``): the refs are the whole arrays,
and the ragged last row block and vocabulary block are cut out by global ids, then masked again
with ``jnp.where`` before any reduction. Triton needs power-of-two block shapes; ``N`` and
``V`` are arbitrary.

Why Triton and not Mosaic GPU. The kernel is a bandwidth-bound streaming reduction with no
matrix multiply: it needs masked, coalesced loads and a row reduction, which Triton gives from
plain ``jnp`` code on any CUDA GPU, while Mosaic GPU's advantages (TMA, WGMMA, warpgroup
specialisation) do not apply. What jax 0.11.2 does (read in its source and run on CPU here):

- ``pallas_call`` on CUDA still lowers through Triton; with no compiler parameters it picks
  Triton itself. Every such lowering warns, once per compilation, with the
  ``jax-pallas-triton`` ``DeprecationWarning`` ("will be removed in a future JAX version").
  Nothing else changed for this kernel: the test suite passes unchanged on jax 0.11.2 (CPU,
  interpret mode), and the kernels still lower for CUDA from a CPU-only host when an abstract
  H100 is named (``tests/test_pallas.py::test_kernels_lower_for_their_backend``).
- Mosaic GPU is reached through ``plgpu.kernel`` (warpgroup-level code over shared-memory refs,
  with TMA copies and explicit layouts). jax 0.11.2 no longer lowers a ``pallas_call`` with Mosaic
  GPU compiler parameters (0.10.2 does), and its ``plgpu.kernel`` takes ``out_type`` where 0.10.2's
  takes ``out_shape``, so one Mosaic GPU kernel would need a shim to serve both. Such a kernel can
  be checked from a CPU host: ``plgpu.kernel`` lowers to a ``mosaic_gpu_v2`` custom call for an
  abstract H100 on both versions (tried here with a trivial kernel), and Pallas' Mosaic GPU
  interpreter (``InterpretGPUParams``) runs it. Only compiling and timing it needs the GPU.

So Triton is the schedule that one kernel body serves on jax 0.10 and 0.11 alike, checked by CI end
to end (interpret mode, and lowering for CUDA), and it is selected explicitly through
``plgpu.CompilerParams``. The cost: the deprecation warning on jax 0.11 (the test suite ignores
exactly that message), and a port to ``plgpu.kernel`` once Triton is removed from Pallas, or sooner
if a GPU session measures this kernel short of its goals.

The choice is to be measured, not assumed: ``benchmarks/mosaic_gpu_probe.py`` is the plain loss
(no options) on Mosaic GPU, with TMA-pipelined, swizzled blocks, and the benchmark harness times it
beside this kernel in the same GPU run (``probe:mosaic_gpu``; `benchmarks.goals` reports both
against the goals). Its docstring lists what a full port would have to solve.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax_softmax_ce.kernels import _blocks, _tile

from jax_softmax_ce._util import accumulation_dtype


def from_zero(size: int):
    """The slice ``[0, size)`` with an int32 start, like every other index of a Triton kernel (a
    Python 0 would be int64 under ``jax_enable_x64`` and clash with the int32 program ids)."""
    return pl.ds(jnp.int32(0), size)


def _compiler_params(blocks) -> plgpu.CompilerParams:
    num_warps = min(max(blocks.block_n * blocks.block_v // 1024, 1), 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


class Block:
    """Masked loads of one ``[bn, bv]`` block at rows ``row0 + [0, bn)``, columns
    ``col0 + [0, bv)``. Program ids are read once at the top of a kernel and passed in (the
    interpreter substitutes them only there, not inside a loop body)."""

    def __init__(self, options, bn: int, bv: int, n: int, v: int, row0, col0):
        self.options = options
        self.bn, self.bv = bn, bv
        self.row0 = row0
        self.rows_ok = row0 + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n
        self.col0 = jnp.asarray(col0, jnp.int32)
        col_ids = self.col0 + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
        self.cols_ok = col_ids < v
        self.ok = self.rows_ok & self.cols_ok

    def load(self, ins: _blocks.Operands, name: str):
        """Operand ``name``'s part of this block: ``[bn, bv]``, ``[bn, 1]``, ``[1, bv]`` or
        ``[1, 1]`` by its `_blocks.axes`; None when absent."""
        ref = getattr(ins, name)
        if ref is None:
            return None
        row, col = _blocks.axes(name, self.options)
        if row is None and col is None:
            return ref[...]
        masks = [m for m, on in ((self.rows_ok, row == 0), (self.cols_ok, col == 1)) if on]
        index = (
            pl.ds(self.row0, self.bn) if row == 0 else from_zero(1),
            pl.ds(self.col0, self.bv) if col == 1 else from_zero(1),
        )
        return plgpu.load(ref.at[index], mask=functools.reduce(jnp.logical_and, masks), other=0)

    def loaded(self, ins: _blocks.Operands, *, per_block: bool | None = None) -> _blocks.Operands:
        """This block's part of every operand but the logits: of those blocked over the
        vocabulary only (``per_block=True``), of the others only (False), or of all (None)."""

        def load(name):
            if name == "logits" or getattr(ins, name) is None:
                return None
            if per_block is not None and (_blocks.axes(name, self.options)[1] == 1) != per_block:
                return None
            return self.load(ins, name)

        return _blocks.Operands(*(load(name) for name in ins._fields))

    def store_dense(self, ref, x):
        plgpu.store(
            ref.at[pl.ds(self.row0, self.bn), pl.ds(self.col0, self.bv)],
            x.astype(ref.dtype),
            mask=self.ok,
        )

    def valid(self, ins: _blocks.Operands):
        return _blocks.valid_mask(self.ok, self.load(ins, "where"))


def _forward_kernel(*refs, options, names, bn, bv, n, v):
    ins, out_refs = _blocks.named(names, refs)
    row0 = pl.program_id(0) * bn
    first = Block(options, bn, bv, n, v, row0, 0)
    per_row = first.loaded(ins, per_block=False)  # read once, outside the vocabulary loop
    dtype = out_refs[0].dtype

    def body(j, state):
        block = Block(options, bn, bv, n, v, row0, j * bv)
        valid = block.valid(ins)
        z_raw = block.load(ins, "logits").astype(dtype)
        z = _blocks.masked_logits(options, z_raw, valid, per_row.temperature)
        per_block = block.loaded(ins, per_block=True)
        blocks = _blocks.Operands(
            *(a if b is None else b for a, b in zip(per_row, per_block, strict=True))
        )
        return _blocks.forward_step(options, state, z, block.col0, block.ok, valid, blocks)

    init = _blocks.state_init(options, bn, dtype)
    state = jax.lax.fori_loop(0, pl.cdiv(v, bv), body, init)
    for ref, x in zip(out_refs, jax.tree.leaves(state), strict=True):
        plgpu.store(ref.at[pl.ds(first.row0, bn), from_zero(1)], x, mask=first.rows_ok)


def forward(options, ops: _blocks.Operands, *, blocks, interpret=False) -> _tile.RowState:
    """The forward accumulators (`_tile.RowState`) of every row, each ``[N, 1]`` in the
    accumulation dtype."""
    n, v = ops.logits.shape
    bn, bv = blocks.block_n, blocks.block_v
    dtype = accumulation_dtype(ops.logits.dtype)
    names, leaves = _blocks.present(ops)
    state_tree = jax.tree.structure(_blocks.state_init(options, 1, dtype))
    out_shape = _blocks.out_struct((n, 1), dtype, ops.logits)
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, options=options, names=names, bn=bn, bv=bv, n=n, v=v),
        grid=(pl.cdiv(n, bn),),
        out_shape=[out_shape] * state_tree.num_leaves,
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="softmax_cross_entropy_fwd_gpu",
    )(*leaves)
    return jax.tree.unflatten(state_tree, outs)


def _backward_kernel(*refs, options, names, bn, bv, n, v):
    ins, outs = _blocks.named(names, refs)
    d_logits_ref, *outs = outs
    d_labels_ref = None if options.integer else outs.pop(0)
    t_ref = outs.pop(0) if outs else None
    j = pl.program_id(1)
    block = Block(options, bn, bv, n, v, pl.program_id(0) * bn, j * bv)
    valid = block.valid(ins)
    z_raw = block.load(ins, "logits").astype(accumulation_dtype(ins.logits.dtype))
    grad = _blocks.backward_block(options, z_raw, block.col0, block.ok, valid, block.loaded(ins))
    block.store_dense(d_logits_ref, grad.d_logits)
    if d_labels_ref is not None:
        block.store_dense(d_labels_ref, grad.d_labels)
    if t_ref is not None:
        rows = pl.ds(block.row0, bn)
        plgpu.store(t_ref.at[rows, pl.ds(j, 1)], grad.t_part, mask=block.rows_ok)


def backward(options, ops: _blocks.Operands, *, blocks, interpret=False):
    """``(d_logits, d_labels, t_row)``: the logits gradient, the probability-label gradient and
    the per-row temperature terms ``[N, 1]``, None where not asked for."""
    n, v = ops.logits.shape
    bn, bv = blocks.block_n, blocks.block_v
    num_v = pl.cdiv(v, bv)
    names, leaves = _blocks.present(ops)
    out_shape = [_blocks.out_struct((n, v), ops.logits.dtype, ops.logits)]
    if not options.integer:
        out_shape.append(_blocks.out_struct((n, v), ops.labels.dtype, ops.logits))
    if options.temperature is None:
        dtype = accumulation_dtype(ops.logits.dtype)
        out_shape.append(_blocks.out_struct((n, num_v), dtype, ops.logits))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, options=options, names=names, bn=bn, bv=bv, n=n, v=v),
        grid=(pl.cdiv(n, bn), num_v),
        out_shape=out_shape,
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="softmax_cross_entropy_bwd_gpu",
    )(*leaves)
    d_logits, *outs = outs
    d_labels = None if options.integer else outs.pop(0)
    t_row = jnp.sum(outs[0], axis=1, keepdims=True) if outs else None
    return d_logits, d_labels, t_row
