"""The fused linear softmax cross-entropy on GPU (Triton): hidden chunks and atomic adds.

Triton is chosen explicitly with ``pallas.triton.CompilerParams``. Mosaic GPU, the default GPU
backend from jax 0.11, lowers no ``dot_general``: a matmul there has to be a ``plgpu.wgmma`` over
shared-memory references fed by a TMA pipeline, which is a different kernel, with a different
entry point on jax 0.10 and 0.11. Triton lowers ``jnp.dot`` to ``tl.dot`` (tensor cores), and is
available in jax 0.10 and, deprecated but present (a ``DeprecationWarning`` at each lowering), in
0.11; the reasons are spelled out in `kernels.cross_entropy_gpu`.

Triton holds a kernel's values in registers and shared memory, so no block may span the hidden
size (a ``[D, block_v]`` block of the projection at ``D = 4096`` and ``block_v = 512`` holds 2**21
elements, past Triton's limit of 2**20, let alone what registers hold): every tile is formed as a
loop over ``block_d`` chunks of ``D``, each a ``tl.dot`` of a ``[block_n, block_d]`` block of
inputs and a ``[block_d, block_v]`` block of the projection, as Cut Cross-Entropy does. Loads are
masked, so ``N``, ``D`` and ``V`` are arbitrary; tiles are powers of two of at least 16
(``tl.dot``'s minimum).

The forward is one program per row block, looping over vocabulary blocks with the running
log-sum-exp in registers. The backward kernel runs over ``(row blocks, vocabulary blocks)``, all
parallel: each program recomputes its tile, forms the gradient tile, and adds ``dz W_block^T``
and ``x_block^T dz`` chunk by chunk of ``D`` into float32 accumulators with atomic adds
(``d_bias`` and the temperature rows too), rounded once to the operands' dtype. Atomic float adds
make the GPU gradients non-deterministic in their last bits. The accumulators are padded to whole
blocks because Pallas' interpreter has no masked atomic add.

Float32 copies of ``d_inputs`` and ``d_weight`` would cost half the bf16 logits' size at
N=16384, D=4096, V=128256; a kernel per gradient that accumulates a block spanning ``D``, as on
TPU, does not fit Triton's registers at D=4096, and bfloat16 atomics (Cut Cross-Entropy's
default) would lose accuracy. So where the two accumulators together exceed
`Pallas.accumulator_bytes` (32 MiB by default) the backward runs twice over chunks, each with the
accumulator of one chunk only: ``d_inputs`` by chunks of rows, each of which sweeps the whole
vocabulary (its rows come out complete), then ``d_weight`` by chunks of columns, each of which
sweeps every row. The logits are then formed twice in the backward (four matmuls per tile
instead of three), as the XLA loops form them. On an H200 (`benchmarks.gpu_tune`, bfloat16,
N=4096, D=4096, V=128256, forward+backward) the trade costs little with the default tiles (244
ms in two passes, 232 ms in one kernel) and pays with smaller ones (338 against 589 ms at
``(64, 128, 64)``). Either way the fused loss is 10 to 17 times the materialised matmul and
loss there (20 ms), and it is this backward that falls short: at N=16384 the forward alone took
1.8 times optax's, forward+backward 15.6 times (`benchmarks/results/linear_gpu.md`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax_softmax_ce.kernels import _blocks, _linear, _tile
from jax_softmax_ce.kernels._linear import Geometry, input_grad, weight_grad
from jax_softmax_ce.kernels.cross_entropy_gpu import Block, from_zero

from jax_softmax_ce._util import accumulation_dtype

_MATMUL = ("x", "w")


def _loop(n: int, body, init):
    """``fori_loop`` over ``[0, n)`` with an int32 index."""
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n), body, init)


class _GpuTile:
    """The tile at rows ``r0 + [0, bn)`` and columns ``c0 + [0, bv)``, read from whole-array
    refs with masked loads (out-of-range entries read as 0), its raw logits formed in
    ``block_d`` chunks of the hidden size, so that no block of ``x`` or ``w`` spans the whole of
    ``D``. Program ids are read once at the top of a kernel and passed in (the interpreter
    substitutes them only there, not inside a loop body)."""

    def __init__(self, ins: _blocks.Operands, options, geo: Geometry, *, r0, c0):
        self.ins, self.geo, self.r0, self.c0 = ins, geo, r0, c0
        self.rows, self.cols = pl.ds(r0, geo.bn), pl.ds(c0, geo.bv)
        block = Block(options, geo.bn, geo.bv, geo.num_rows, geo.num_classes, r0, c0)
        self.row_ok, self.col_ok = block.rows_ok, block.cols_ok
        loaded = {k: block.load(ins, k) for k in ins._fields if k not in _MATMUL}
        self.tile = _linear.Tile(
            _blocks.Operands(**loaded),
            options,
            start=(r0, c0),
            lo=(r0, c0),
            shape=(geo.bn, geo.bv),
            extents=(geo.num_rows, geo.num_classes),
        )

    def hidden(self, k0):
        """``[1, bd]`` bool: hidden indices ``k0 + [0, bd)`` inside ``D``, and their slice."""
        return _linear.hidden_ok(k0, self.geo.bd, self.geo.hidden), pl.ds(k0, self.geo.bd)

    def x_chunk(self, k0):
        """``[bn, bd]`` of ``x``."""
        ok, ks = self.hidden(k0)
        return pltriton.load(self.ins.x.at[self.rows, ks], mask=self.row_ok & ok, other=0)

    def w_chunk(self, k0):
        """``[bd, bv]`` of ``w`` (``[bv, bd]`` when vd)."""
        ok, ks = self.hidden(k0)
        if self.geo.vd:
            index, mask = (self.cols, ks), self.col_ok.T & ok
        else:
            index, mask = (ks, self.cols), ok.T & self.col_ok
        return pltriton.load(self.ins.w.at[index], mask=mask, other=0)

    def over_hidden(self, body, init):
        """``body(k0, carry)`` over the hidden chunks ``k0 = 0, bd, 2 bd, ...``."""
        bd = self.geo.bd
        return _loop(pl.cdiv(self.geo.hidden, bd), lambda k, carry: body(k * bd, carry), init)

    def logits(self):
        """``[bn, bv]`` raw logits ``x W (+ b)`` in the accumulation dtype."""
        dtype = accumulation_dtype(self.ins.x.dtype)

        def chunk(k0, z):
            return z + _linear.logits_tile(self.x_chunk(k0), self.w_chunk(k0), None, vd=self.geo.vd)

        z = self.over_hidden(chunk, jnp.zeros((self.geo.bn, self.geo.bv), dtype))
        bias = self.tile.bias
        return z if bias is None else z + bias.astype(dtype)


def _forward_kernel(*refs, names, options, geo):
    """One program per row block, looping over vocabulary blocks."""
    ins, out_refs = _blocks.named(names, refs)
    r0 = pl.program_id(0) * geo.bn

    def vocab_block(j, state):
        gpu_tile = _GpuTile(ins, options, geo, r0=r0, c0=j * geo.bv)
        return gpu_tile.tile.forward(state, gpu_tile.logits())

    init = _blocks.state_init(options, geo.bn, out_refs[0].dtype)
    state = _loop(pl.cdiv(geo.num_classes, geo.bv), vocab_block, init)
    ok = _linear.rows_ok(r0, r0, geo.bn, geo.num_rows)
    for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
        pltriton.store(ref.at[pl.ds(r0, geo.bn), from_zero(1)], value, mask=ok)


def _backward_kernel(*refs, names, options, geo, outputs: tuple[str, ...]):
    """Grid ``(row blocks, vocabulary blocks)``, all parallel: each program recomputes its tile
    and adds its contributions to the ``outputs`` among ``d_inputs`` (``"dx"``, with the
    temperature rows ``"t"``) and ``d_weight`` (``"dw"``, with ``d_bias``: ``"db"``), chunk by
    hidden chunk, with atomic adds into zero-initialised float32 accumulators, which are padded
    to whole blocks so that no add needs a mask. The accumulators are the last inputs, aliased
    to the outputs, in the order of ``outputs``."""
    ins, _ = _blocks.named(names, refs)
    out = dict(zip(outputs, refs[len(refs) - len(outputs) :], strict=True))
    gpu_tile = _GpuTile(
        ins, options, geo, r0=pl.program_id(0) * geo.bn, c0=pl.program_id(1) * geo.bv
    )
    grad = gpu_tile.tile.backward(gpu_tile.logits(), filter_eps=options.filter_eps)
    if "t" in out:
        pltriton.atomic_add(out["t"], (gpu_tile.rows, from_zero(1)), grad.t_part)

    def accumulate():
        dz = grad.d_logits
        if "db" in out:
            total = jnp.sum(dz, axis=0, keepdims=True)
            pltriton.atomic_add(out["db"], (from_zero(1), gpu_tile.cols), total)

        def chunk(k0, carry):
            ks = pl.ds(k0, geo.bd)
            if "dx" in out:
                dx = input_grad(dz, gpu_tile.w_chunk(k0), vd=geo.vd)
                pltriton.atomic_add(out["dx"], (gpu_tile.rows, ks), dx)
            if "dw" in out:
                dw = weight_grad(gpu_tile.x_chunk(k0), dz, vd=geo.vd)
                cols = gpu_tile.cols
                pltriton.atomic_add(out["dw"], (cols, ks) if geo.vd else (ks, cols), dw)
            return carry

        gpu_tile.over_hidden(chunk, 0)

    if grad.keep is None:
        accumulate()
    else:
        pl.when(grad.keep)(accumulate)


def _compiler_params(bn: int, bv: int) -> pltriton.CompilerParams:
    num_warps = 8 if bn * bv >= 128 * 128 else 4
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=3)


def forward(options, ops: _blocks.Operands, *, blocks, interpret=False) -> _tile.RowState:
    """The forward accumulators (`_tile.RowState`) of every row, each ``[N, 1]``."""
    geo = Geometry.of(blocks, ops, options, clip=False)
    n = geo.num_rows
    dtype = accumulation_dtype(ops.x.dtype)
    names, leaves = _blocks.present(ops)
    treedef = jax.tree.structure(_blocks.state_init(options, 1, dtype))
    out = pl.pallas_call(
        functools.partial(_forward_kernel, names=names, options=options, geo=geo),
        out_shape=[_blocks.out_struct((n, 1), dtype, ops.x)] * treedef.num_leaves,
        grid=(pl.cdiv(n, geo.bn),),
        compiler_params=_compiler_params(blocks.block_n, blocks.block_v),
        interpret=interpret,
        name="linear_ce_forward",
    )(*leaves)
    return jax.tree.unflatten(treedef, out)


# The float32 accumulators that one backward pass keeps at most (`Pallas.accumulator_bytes`).
ACCUMULATOR_BYTES = 32 * 2**20


def backward(
    options, ops: _blocks.Operands, *, blocks, interpret=False, accumulator_bytes=None
) -> _linear.Grads:
    """The gradients, in one kernel (`_backward_kernel`) when the float32 accumulators of
    ``d_inputs`` and ``d_weight`` together fit in ``accumulator_bytes``, else in two passes that
    each keep the accumulator of one chunk: ``d_inputs`` chunk of rows by chunk of rows (each
    chunk's kernel sweeps the whole vocabulary, so its rows are complete), then ``d_weight``
    chunk of columns by chunk of columns (each sweeps every row). The logits are then formed
    twice in the backward, as the XLA loops form them; no accumulator is gradient-sized."""
    budget = ACCUMULATOR_BYTES if accumulator_bytes is None else accumulator_bytes
    geo = Geometry.of(blocks, ops, options, clip=False)
    n, v, d = geo.num_rows, geo.num_classes, geo.hidden
    row_bytes = 4 * geo.bd * pl.cdiv(d, geo.bd)  # one padded float32 row of D
    if row_bytes * (geo.bn * pl.cdiv(n, geo.bn) + geo.bv * pl.cdiv(v, geo.bv)) <= budget:
        out = _backward_pass(options, ops, geo, ("dx", "t", "dw", "db"), interpret=interpret)
        t_sum = None if out["t"] is None else jnp.sum(out["t"])
        return _linear.Grads(
            out["dx"].astype(ops.x.dtype), out["dw"].astype(ops.w.dtype), out["db"], t_sum
        )
    rows = _chunk(budget // row_bytes, geo.bn, n)
    cols = _chunk(budget // row_bytes, geo.bv, v)
    dx, t = _over_chunks(options, ops, geo, rows, 0, ("dx", "t"), interpret=interpret)
    dw, db = _over_chunks(options, ops, geo, cols, 1, ("dw", "db"), interpret=interpret)
    return _linear.Grads(dx, dw, db, None if t is None else jnp.sum(t))


def _chunk(most: int, block: int, size: int) -> int:
    """Rows (or columns) per chunk: whole blocks, at least one, at most ``size``."""
    return min(max(most // block, 1) * block, size)


def _over_chunks(
    options, ops: _blocks.Operands, geo: Geometry, size: int, axis: int, outputs, *, interpret
):
    """``outputs`` (``("dx", "t")`` over rows, ``axis=0``, or ``("dw", "db")`` over columns,
    ``axis=1``), each complete in every chunk of ``size`` rows or columns, written into arrays
    of the operands' dtype chunk by chunk. The last chunk starts early enough to end at the
    edge, so it recomputes part of the one before, which it overwrites with the same values."""
    extent = geo.num_rows if axis == 0 else geo.num_classes
    dtype = accumulation_dtype(ops.x.dtype)
    first, second = outputs
    if axis == 0:
        full = {first: jnp.zeros((geo.num_rows, geo.hidden), ops.x.dtype)}
        if options.temperature is None:
            full[second] = jnp.zeros((geo.num_rows,), dtype)
        dims = {first: 0, second: 0}
    else:
        full = {first: jnp.zeros_like(ops.w)}
        if ops.bias is not None:
            full[second] = jnp.zeros((geo.num_classes,), dtype)
        dims = {first: 0 if geo.vd else 1, second: 0}

    def step(i, full):
        start = jnp.minimum(i * size, extent - size)
        part = _chunk_operands(options, ops, start, size, axis)
        resized = {"num_rows" if axis == 0 else "num_classes": size}
        out = _backward_pass(
            options, part, dataclasses.replace(geo, **resized), tuple(full), interpret
        )
        return {
            k: jax.lax.dynamic_update_slice_in_dim(
                full[k], out[k].astype(full[k].dtype), start, dims[k]
            )
            for k in full
        }

    full = jax.lax.fori_loop(0, pl.cdiv(extent, size), step, full)
    return full[first], full.get(second)


def _chunk_operands(options, ops: _blocks.Operands, start, size: int, axis: int):
    """The operands of rows (``axis=0``) or columns (``axis=1``) ``start + [0, size)``: sliced
    where they run over that axis, and, for a chunk of columns, with the labels made relative to
    its first column."""

    def part(name, x):
        if x is None:
            return None
        along = _blocks.axes(name, options)[axis]
        if along is None:
            return x
        return jax.lax.dynamic_slice_in_dim(x, start, size, along)

    sliced = _blocks.Operands(**{k: part(k, getattr(ops, k)) for k in ops._fields})
    if axis == 1 and sliced.labels is not None:
        sliced = sliced._replace(labels=sliced.labels - start)
    return sliced


def _backward_pass(options, ops: _blocks.Operands, geo: Geometry, outputs, interpret=False):
    """One `_backward_kernel` over the whole of ``ops``, accumulating the ``outputs`` it is
    asked for (those that exist: ``"t"`` for an array temperature, ``"db"`` with a bias), each
    sliced to its array's shape in the accumulation dtype."""
    n, v, bn, bv, bd, d = geo.num_rows, geo.num_classes, geo.bn, geo.bv, geo.bd, geo.hidden
    dtype = accumulation_dtype(ops.x.dtype)
    rows_p, cols_p, hidden_p = bn * pl.cdiv(n, bn), bv * pl.cdiv(v, bv), bd * pl.cdiv(d, bd)
    shapes = {
        "dx": (rows_p, hidden_p),
        "t": (rows_p, 1),
        "dw": (cols_p, hidden_p) if geo.vd else (hidden_p, cols_p),
        "db": (1, cols_p),
    }
    present = {"t": options.temperature is None, "db": ops.bias is not None}
    outputs = tuple(k for k in outputs if present.get(k, True))
    accumulators = [jnp.zeros(shapes[k], dtype) for k in outputs]
    names, leaves = _blocks.present(ops)
    accumulators = _blocks.vary_alike([*accumulators, ops.x])[:-1]
    out = pl.pallas_call(
        functools.partial(_backward_kernel, names=names, options=options, geo=geo, outputs=outputs),
        out_shape=[_blocks.out_struct(a.shape, a.dtype, ops.x) for a in accumulators],
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        compiler_params=_compiler_params(bn, bv),
        interpret=interpret,
        name="linear_ce_backward",
        input_output_aliases={len(leaves) + k: k for k in range(len(accumulators))},
    )(*leaves, *accumulators)
    out = dict(zip(outputs, out, strict=True))
    sliced = {
        "dx": lambda a: a[:n, :d],
        "t": lambda a: a[:n, 0],
        "dw": lambda a: a[:v, :d] if geo.vd else a[:d, :v],
        "db": lambda a: a[0, :v],
    }
    return {k: sliced[k](out[k]) if k in out else None for k in ("dx", "t", "dw", "db")}
