"""Softmax cross-entropy on TPU (Mosaic): the vocabulary as a trailing reduction grid axis.

Forward: grid ``(row blocks, vocab blocks)`` with semantics ``("parallel", "arbitrary")``. Each
step loads one ``[block_n, block_v]`` block of logits (and of probability labels or of the
``where`` mask when they are dense) and merges it into float32 accumulators that live in VMEM
scratch for the whole row block: the running max and sum-exp, the target term and the smoothing
term (`_blocks.forward_step`). The last vocabulary step writes the per-row loss, the lse and the
total target weight.

Backward: grid ``(row blocks, vocab blocks)``, both parallel. Each step recomputes
``p = exp(z' - lse)`` for its block and writes the logits gradient in the logits' dtype (one read
and one write of the logits), plus the probability-label gradient and a per-row partial sum for
an array temperature when those are asked for (`_blocks.backward_block`).

Ragged edges (``N`` not a multiple of ``block_n``, ``V`` not a multiple of ``block_v``, ``V``
below one block) are masked with ``jnp.where`` from global row and column ids; what Pallas
reads past the end of an array is never used, and what it would write there is dropped.

Per-row values are ``[block_n, 1]`` columns; Mosaic pads them to full vregs. An array
temperature is a scalar in SMEM.

Status: validated on CPU in interpret mode with `pltpu.InterpretParams` (race detection,
out-of-bounds reads raising, uninitialised memory as NaN). Not yet compiled or timed on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax_softmax_ce.kernels import _blocks, _tile


def interpret_params() -> pltpu.InterpretParams:
    """The strict CPU interpreter: races detected, out-of-bounds reads raise, NaN memory."""
    return pltpu.InterpretParams(
        detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan"
    )


def _specs(config: _blocks.Config, inputs: _blocks.Inputs, blocks: _blocks.BlockSizes):
    """BlockSpecs of the forward operands, on a grid ``(i, j)`` of row and vocab blocks."""
    bn, bv = blocks.block_n, blocks.block_v
    dense = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    col = pl.BlockSpec((1, bv), lambda i, j: (0, j))
    shared = pl.BlockSpec((1, 1), lambda i, j: (0, 0))
    where = {None: None, "row": row, "col": col, "full": dense}[config.where]
    n_valid = None
    if inputs.n_valid is not None:
        n_valid = shared if config.where in (None, "col") else row
    temperature = None
    if inputs.temperature is not None:
        temperature = pl.BlockSpec(memory_space=pltpu.SMEM)
    return _blocks.Inputs(
        logits=dense,
        labels=row if config.integer else dense,
        label_weight=row if config.integer else None,
        where=where,
        class_weights=None if inputs.class_weights is None else col,
        n_valid=n_valid,
        temperature=temperature,
    )


def _masks(config: _blocks.Config, where_ref, shape, n: int, v: int):
    """``(col0, in_bounds, valid)`` of the current block."""
    bn, bv = shape
    i, j = pl.program_id(0), pl.program_id(1)
    row_ids = i * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
    col0 = j * bv
    col_ids = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    in_bounds = (row_ids < n) & (col_ids < v)
    valid = in_bounds
    if config.where is not None:
        valid = valid & (where_ref[...] != 0)
    return col0, in_bounds, valid


def _loaded(ref, dtype=None):
    if ref is None:
        return None
    x = ref[...]
    return x if dtype is None else x.astype(dtype)


def _temperature(ref):
    return None if ref is None else ref[0, 0]


def _labels(inputs: _blocks.Inputs) -> dict:
    """The label operands of the current block, as the `_blocks` steps take them."""
    return dict(
        labels=inputs.labels[...],
        label_weight=_loaded(inputs.label_weight),
        class_weights=_loaded(inputs.class_weights),
    )


def _forward_kernel(*refs, config, in_tree, state_tree, n, v, dtype):
    num_in, num_state = in_tree.num_leaves, state_tree.num_leaves
    inputs = jax.tree.unflatten(in_tree, refs[:num_in])
    loss_ref, lse_ref, w_ref = refs[num_in : num_in + 3]
    state_refs = refs[num_in + 3 : num_in + 3 + num_state]
    j = pl.program_id(1)
    rows = inputs.logits.shape[0]

    @pl.when(j == 0)
    def _init():
        init = jax.tree.leaves(_blocks.forward_init(config, rows, dtype))
        for ref, x in zip(state_refs, init, strict=True):
            ref[...] = x

    col0, in_bounds, valid = _masks(config, inputs.where, inputs.logits.shape, n, v)
    temperature = _temperature(inputs.temperature)
    z = _blocks.masked_logits(config, inputs.logits[...].astype(dtype), valid, temperature)
    state = jax.tree.unflatten(state_tree, [ref[...] for ref in state_refs])
    state = _blocks.forward_step(config, state, z, col0, in_bounds, valid, **_labels(inputs))
    for ref, x in zip(state_refs, jax.tree.leaves(state), strict=True):
        ref[...] = x

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        loss, lse, w_total = _blocks.forward_finish(
            config, state, _loaded(inputs.label_weight), _loaded(inputs.n_valid)
        )
        loss_ref[...] = loss
        lse_ref[...] = lse
        w_ref[...] = w_total


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
    state = _blocks.forward_init(config, bn, dtype)
    state_leaves, state_tree = jax.tree.flatten(state)
    row_out = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    out_shape = _blocks.out_struct((n, 1), dtype, inputs.logits)
    kernel = functools.partial(
        _forward_kernel,
        config=config,
        in_tree=in_tree,
        state_tree=state_tree,
        n=n,
        v=v,
        dtype=dtype,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        in_specs=jax.tree.leaves(_specs(config, inputs, blocks)),
        out_specs=(row_out, row_out, row_out),
        out_shape=(out_shape, out_shape, out_shape),
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype) for x in state_leaves],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret_params() if interpret else False,
        name="softmax_cross_entropy_fwd_tpu",
    )(*leaves)


def _backward_kernel(*refs, config, in_tree, n, v, dtype):
    inputs, residuals = jax.tree.unflatten(in_tree, refs[: in_tree.num_leaves])
    d_logits_ref, d_labels_ref, t_ref = _blocks.backward_outputs(config, refs[in_tree.num_leaves :])
    col0, in_bounds, valid = _masks(config, inputs.where, inputs.logits.shape, n, v)
    d_logits, d_labels, t_part = _blocks.backward_block(
        config,
        inputs.logits[...].astype(dtype),
        col0,
        in_bounds,
        valid,
        **_labels(inputs),
        n_valid=_loaded(inputs.n_valid),
        temperature=_temperature(inputs.temperature),
        lse=residuals.lse[...],
        w_total=residuals.w_total[...],
        ct=residuals.ct[...],
    )
    d_logits_ref[...] = d_logits.astype(d_logits_ref.dtype)
    if d_labels_ref is not None:
        d_labels_ref[...] = d_labels.astype(d_labels_ref.dtype)
    if t_ref is not None:
        t_ref[...] = t_part


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
    row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    dense = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
    in_specs = [*jax.tree.leaves(_specs(config, inputs, blocks)), row, row, row]
    out_specs = [dense]
    if not config.integer:
        out_specs.append(dense)
    if config.temperature is None:
        out_specs.append(pl.BlockSpec((pl.Squeezed(), bn, 1), lambda i, j: (j, i, 0)))
    kernel = functools.partial(
        _backward_kernel, config=config, in_tree=in_tree, n=n, v=v, dtype=dtype
    )
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), num_v),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=_blocks.backward_out_shape(config, inputs, (num_v, n, 1)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params() if interpret else False,
        name="softmax_cross_entropy_bwd_tpu",
    )(*leaves)
    d_logits, d_labels, t_parts = _blocks.backward_outputs(config, outs)
    t_row = None if t_parts is None else jnp.sum(t_parts, axis=0)
    return _blocks.Grads(d_logits, d_labels, t_row)
