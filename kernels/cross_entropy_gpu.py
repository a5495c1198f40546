"""Softmax cross-entropy on GPU with Pallas' Triton backend: an in-kernel loop over vocabulary.

Forward: a grid over row blocks only. Each program owns ``block_n`` rows and walks the
vocabulary in ``block_v`` columns with a ``fori_loop``, carrying the float32 running max,
sum-exp, target and smoothing terms in registers (`_blocks.forward_step`); it then writes the
per-row loss, the lse and the total target weight. Backward: a grid ``(row blocks, vocab
blocks)`` with no dependence between programs; each recomputes ``p = exp(z' - lse)`` for its
block and writes the logits gradient in the logits' dtype, in one read and one write of the
logits (plus the probability-label gradient and a per-row temperature partial when asked for).

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

Status: validated on CPU in interpret mode only. Not yet compiled, run or timed on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax_softmax_ce.kernels import _blocks, _tile


def from_zero(size: int):
    """The slice ``[0, size)`` with an int32 start, like every other index of a Triton kernel (a
    Python 0 would be int64 under ``jax_enable_x64`` and clash with the int32 program ids)."""
    return pl.ds(jnp.int32(0), size)


def _compiler_params(blocks: _blocks.BlockSizes) -> plgpu.CompilerParams:
    num_warps = min(max(blocks.block_n * blocks.block_v // 1024, 1), 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


class _Block:
    """Masked loads of one ``[bn, bv]`` block at rows ``row0 + [0, bn)``, columns
    ``col0 + [0, bv)``. Program ids are read once at the top of a kernel and passed in (the
    interpreter substitutes them only there, not inside a loop body)."""

    def __init__(self, config: _blocks.Config, bn: int, bv: int, n: int, v: int, row0, col0):
        self.config = config
        self.bn, self.bv = bn, bv
        self.row0 = row0
        self.rows_ok = row0 + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0) < n
        self.col0 = jnp.asarray(col0, jnp.int32)
        col_ids = self.col0 + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
        self.cols_ok = col_ids < v
        self.in_bounds = self.rows_ok & self.cols_ok

    def rows(self, ref):
        """``[bn, 1]`` of a per-row operand ``[N, 1]``."""
        if ref is None:
            return None
        return plgpu.load(
            ref.at[pl.ds(self.row0, self.bn), from_zero(1)], mask=self.rows_ok, other=0
        )

    def cols(self, ref):
        """``[1, bv]`` of a per-class operand ``[1, V]``."""
        if ref is None:
            return None
        return plgpu.load(
            ref.at[from_zero(1), pl.ds(self.col0, self.bv)], mask=self.cols_ok, other=0
        )

    def dense(self, ref):
        """``[bn, bv]`` of an ``[N, V]`` operand."""
        return plgpu.load(
            ref.at[pl.ds(self.row0, self.bn), pl.ds(self.col0, self.bv)],
            mask=self.in_bounds,
            other=0,
        )

    def store_dense(self, ref, x):
        plgpu.store(
            ref.at[pl.ds(self.row0, self.bn), pl.ds(self.col0, self.bv)],
            x.astype(ref.dtype),
            mask=self.in_bounds,
        )

    def valid(self, where_ref):
        kind = self.config.where
        if kind is None:
            return self.in_bounds
        where = {"row": self.rows, "col": self.cols, "full": self.dense}[kind](where_ref)
        return self.in_bounds & (where != 0)


def _n_valid(config: _blocks.Config, block: _Block, ref):
    if ref is None:
        return None
    return block.rows(ref) if config.where in ("row", "full") else ref[...]


def _forward_kernel(*refs, config, in_tree, bn, bv, n, v, dtype):
    num_in = in_tree.num_leaves
    inputs = jax.tree.unflatten(in_tree, refs[:num_in])
    loss_ref, lse_ref, w_ref = refs[num_in:]
    row0 = pl.program_id(0) * bn
    first = _Block(config, bn, bv, n, v, row0, 0)
    labels = first.rows(inputs.labels) if config.integer else None
    label_weight = first.rows(inputs.label_weight)
    temperature = None if inputs.temperature is None else inputs.temperature[...]

    def body(j, state):
        block = _Block(config, bn, bv, n, v, row0, j * bv)
        valid = block.valid(inputs.where)
        z_raw = block.dense(inputs.logits).astype(dtype)
        z = _blocks.masked_logits(config, z_raw, valid, temperature)
        return _blocks.forward_step(
            config,
            state,
            z,
            block.col0,
            block.in_bounds,
            valid,
            labels=labels if config.integer else block.dense(inputs.labels),
            label_weight=label_weight,
            class_weights=block.cols(inputs.class_weights),
        )

    state = jax.lax.fori_loop(0, pl.cdiv(v, bv), body, _blocks.forward_init(config, bn, dtype))
    loss, lse, w_total = _blocks.forward_finish(
        config, state, label_weight, _n_valid(config, first, inputs.n_valid)
    )
    for ref, x in ((loss_ref, loss), (lse_ref, lse), (w_ref, w_total)):
        plgpu.store(ref.at[pl.ds(first.row0, bn), from_zero(1)], x, mask=first.rows_ok)


def forward(
    config: _blocks.Config,
    inputs: _blocks.Inputs,
    *,
    blocks: _blocks.BlockSizes,
    interpret: bool = False,
):
    """``(loss, lse, w_total)``, each ``[N, 1]`` in the accumulation dtype."""
    n, v = inputs.logits.shape
    bn, bv = blocks.block_n, blocks.block_v
    dtype = _tile.accumulation_dtype(inputs.logits.dtype)
    leaves, in_tree = jax.tree.flatten(inputs)
    out_shape = _blocks.out_struct((n, 1), dtype, inputs.logits)
    kernel = functools.partial(
        _forward_kernel, config=config, in_tree=in_tree, bn=bn, bv=bv, n=n, v=v, dtype=dtype
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn),),
        out_shape=(out_shape, out_shape, out_shape),
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="softmax_cross_entropy_fwd_gpu",
    )(*leaves)


def _backward_kernel(*refs, config, in_tree, bn, bv, n, v, dtype):
    inputs, residuals = jax.tree.unflatten(in_tree, refs[: in_tree.num_leaves])
    d_logits_ref, d_labels_ref, t_ref = _blocks.backward_outputs(config, refs[in_tree.num_leaves :])
    j = pl.program_id(1)
    block = _Block(config, bn, bv, n, v, pl.program_id(0) * bn, j * bv)
    valid = block.valid(inputs.where)
    d_logits, d_labels, t_part = _blocks.backward_block(
        config,
        block.dense(inputs.logits).astype(dtype),
        block.col0,
        block.in_bounds,
        valid,
        labels=block.rows(inputs.labels) if config.integer else block.dense(inputs.labels),
        label_weight=block.rows(inputs.label_weight),
        class_weights=block.cols(inputs.class_weights),
        n_valid=_n_valid(config, block, inputs.n_valid),
        temperature=None if inputs.temperature is None else inputs.temperature[...],
        lse=block.rows(residuals.lse),
        w_total=block.rows(residuals.w_total),
        ct=block.rows(residuals.ct),
    )
    block.store_dense(d_logits_ref, d_logits)
    if d_labels_ref is not None:
        block.store_dense(d_labels_ref, d_labels)
    if t_ref is not None:
        plgpu.store(t_ref.at[pl.ds(block.row0, bn), pl.ds(j, 1)], t_part, mask=block.rows_ok)


def backward(
    config: _blocks.Config,
    inputs: _blocks.Inputs,
    residuals: _blocks.Residuals,
    *,
    blocks: _blocks.BlockSizes,
    interpret: bool = False,
) -> _blocks.Grads:
    """The logits gradient (and the label gradient and per-row temperature terms ``[N, 1]``)."""
    n, v = inputs.logits.shape
    bn, bv = blocks.block_n, blocks.block_v
    num_v = pl.cdiv(v, bv)
    dtype = _tile.accumulation_dtype(inputs.logits.dtype)
    leaves, in_tree = jax.tree.flatten((inputs, residuals))
    kernel = functools.partial(
        _backward_kernel, config=config, in_tree=in_tree, bn=bn, bv=bv, n=n, v=v, dtype=dtype
    )
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), num_v),
        out_shape=_blocks.backward_out_shape(config, inputs, (n, num_v)),
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="softmax_cross_entropy_bwd_gpu",
    )(*leaves)
    d_logits, d_labels, t_parts = _blocks.backward_outputs(config, outs)
    t_row = None if t_parts is None else jnp.sum(t_parts, axis=1, keepdims=True)
    return _blocks.Grads(d_logits, d_labels, t_row)
