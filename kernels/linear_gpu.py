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
log-sum-exp in registers. The backward is one kernel over ``(row blocks, vocabulary blocks)``, all
parallel: each program recomputes its tile, forms the gradient tile, and adds ``dz W_block^T`` and
``x_block^T dz`` chunk by chunk of ``D`` into float32 ``d_inputs`` and ``d_weight`` with atomic
adds (``d_bias`` and the temperature rows too), then rounds them once to the operands' dtype.
Atomic float adds make the GPU gradients non-deterministic in their last bits. The accumulators
are padded to whole blocks because Pallas' interpreter has no masked atomic add. Being float32
copies of ``d_inputs`` and ``d_weight``, they cost half the bf16 logits' size at N=16384,
D=4096, V=128256 (the TPU kernels and the XLA loops stay within 1%): a kernel per gradient that
accumulates a block spanning ``D``, as on TPU, does not fit Triton's registers at D=4096, and
bfloat16 atomics (Cut Cross-Entropy's default) would lose accuracy.
"""

from __future__ import annotations

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


def _backward_kernel(*refs, names, options, geo, has_bias: bool):
    """Grid ``(row blocks, vocabulary blocks)``, all parallel: each program recomputes its tile
    and adds its contributions to ``d_inputs``, ``d_weight`` (chunk by hidden chunk), ``d_bias``
    and the temperature rows with atomic adds into zero-initialised float32 accumulators, which
    are padded to whole blocks so that no add needs a mask. The accumulators are the last
    inputs, aliased to the outputs."""
    array_t = options.temperature is None
    ins, _ = _blocks.named(names, refs)
    out_refs = list(refs[len(refs) - (2 + array_t + has_bias) :])
    dx_ref, dw_ref = out_refs[:2]
    db_ref = out_refs[2] if has_bias else None
    t_ref = out_refs[-1] if array_t else None
    gpu_tile = _GpuTile(
        ins, options, geo, r0=pl.program_id(0) * geo.bn, c0=pl.program_id(1) * geo.bv
    )
    grad = gpu_tile.tile.backward(gpu_tile.logits(), filter_eps=options.filter_eps)
    if t_ref is not None:
        pltriton.atomic_add(t_ref, (gpu_tile.rows, from_zero(1)), grad.t_part)

    def accumulate():
        dz = grad.d_logits
        if db_ref is not None:
            total = jnp.sum(dz, axis=0, keepdims=True)
            pltriton.atomic_add(db_ref, (from_zero(1), gpu_tile.cols), total)

        def chunk(k0, carry):
            ks = pl.ds(k0, geo.bd)
            dx = input_grad(dz, gpu_tile.w_chunk(k0), vd=geo.vd)
            pltriton.atomic_add(dx_ref, (gpu_tile.rows, ks), dx)
            dw = weight_grad(gpu_tile.x_chunk(k0), dz, vd=geo.vd)
            cols = gpu_tile.cols
            pltriton.atomic_add(dw_ref, (cols, ks) if geo.vd else (ks, cols), dw)
            return carry

        gpu_tile.over_hidden(chunk, 0)

    if grad.keep is None:
        accumulate()
    else:
        pl.when(grad.keep)(accumulate)


def _compiler_params(blocks) -> pltriton.CompilerParams:
    num_warps = 8 if blocks.block_n * blocks.block_v >= 128 * 128 else 4
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
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="linear_ce_forward",
    )(*leaves)
    return jax.tree.unflatten(treedef, out)


def backward(options, ops: _blocks.Operands, *, blocks, interpret=False) -> _linear.Grads:
    """One kernel over ``(row blocks, vocabulary blocks)`` with atomic adds into padded float32
    accumulators, sliced to the arrays' shapes afterwards."""
    geo = Geometry.of(blocks, ops, options, clip=False)
    n, v, bn, bv, bd, d = geo.num_rows, geo.num_classes, geo.bn, geo.bv, geo.bd, geo.hidden
    dtype = accumulation_dtype(ops.x.dtype)
    array_t = options.temperature is None
    has_bias = ops.bias is not None
    rows_p, cols_p, hidden_p = bn * pl.cdiv(n, bn), bv * pl.cdiv(v, bv), bd * pl.cdiv(d, bd)
    accumulators = {
        "dx": jnp.zeros((rows_p, hidden_p), dtype),
        "dw": jnp.zeros((cols_p, hidden_p) if geo.vd else (hidden_p, cols_p), dtype),
    }
    if has_bias:
        accumulators["db"] = jnp.zeros((1, cols_p), dtype)
    if array_t:
        accumulators["t"] = jnp.zeros((rows_p, 1), dtype)
    names, leaves = _blocks.present(ops)
    varying = _blocks.vary_alike([*accumulators.values(), ops.x])[:-1]
    accumulators = dict(zip(accumulators, varying, strict=True))
    out = pl.pallas_call(
        functools.partial(
            _backward_kernel, names=names, options=options, geo=geo, has_bias=has_bias
        ),
        out_shape=[_blocks.out_struct(a.shape, a.dtype, ops.x) for a in accumulators.values()],
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv)),
        compiler_params=_compiler_params(blocks),
        interpret=interpret,
        name="linear_ce_backward",
        input_output_aliases={len(leaves) + k: k for k in range(len(accumulators))},
    )(*leaves, *accumulators.values())
    out = dict(zip(accumulators, out, strict=True))
    dw = out["dw"][:v, :d] if geo.vd else out["dw"][:d, :v]
    db = out["db"][0, :v] if has_bias else None
    t_sum = jnp.sum(out["t"][:n]) if array_t else None
    dx = out["dx"][:n, :d].astype(ops.x.dtype)
    return _linear.Grads(dx, dw.astype(ops.w.dtype), db, t_sum)
