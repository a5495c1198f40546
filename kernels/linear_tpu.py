"""The fused linear softmax cross-entropy on TPU (Mosaic): a grid over hidden chunks, VMEM scratch.

Grid ``(row blocks, vocabulary blocks, hidden chunks)``, whose last two axes are reductions. Each
tile's logits are summed over ``block_d`` chunks of ``D`` into a float32 VMEM scratch, so no block
spans the hidden size: a whole ``[block_n, D]`` block of inputs and ``[D, block_v]`` block of the
projection, double-buffered, would take 12 MiB of VMEM at ``D = 4096`` in bf16 with the default
tiles, and their float32 gradient blocks 8 or 16 MiB more, against the 16 MiB that a kernel may
use by default. The forward kernel keeps its running ``(m, s)`` and target sums in VMEM scratch
while the vocabulary and chunk indices move, and writes them packed into one output block.

The backward is two kernels, as in flash attention: ``d_inputs`` on the same grid, and
``d_weight``/``d_bias`` on the transposed grid ``(vocab blocks, row blocks, ...)``, each
recomputing its tiles from the saved ``lse``. Their chunk axis has two phases: the first forms
the logits and then the gradient tile, the second walks the chunks again and adds
``dz W_chunk^T`` (or ``x_chunk^T dz``) into a float32 VMEM accumulator of ``[block_n, D]`` (or
``[D, block_v]``), written out chunk by chunk, in the operands' dtype, during the last reduction
step, so that no float32 array spans the inputs or the projection; the projection (or
input) chunks are read twice per tile for that. The matmul is ``jax.lax.dot_general`` with
float32 accumulation. Each kernel's VMEM need is estimated from its blocks (`vmem_limit`) and
passed as its limit when it exceeds the default; at ``D = 4096`` the ``d_weight`` kernel's
accumulator alone is 8 MiB.

Every block index is int32, also under ``jax_enable_x64``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax_softmax_ce.kernels import _blocks, _linear, _tile
from jax_softmax_ce.kernels._linear import Geometry, input_grad, weight_grad

from jax_softmax_ce._util import accumulation_dtype

# The smallest default scoped VMEM limit of a TPU core (v4, v5e); v6e's is 32 MiB. VMEM itself
# holds 16 MiB (v4), 64 MiB (v5p, v7x) or 128 MiB (v5e, v6e) per core.
SCOPED_VMEM_BYTES = 16 * 2**20
# Room for the tile step's values, in float32 logits tiles (z', p, g, dz and masks).
_TILE_TEMPORARIES = 6
_MATMUL = ("x", "w")


def vmem_bytes(shape, dtype) -> int:
    """The VMEM footprint of one buffer: its last two axes padded to Mosaic's tiling,
    ``(8 * values per 32-bit word, 128)``."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = (1, *shape) if len(shape) == 1 else tuple(shape)
    sublanes = 8 * max(4 // itemsize, 1)
    rows, cols = -(-shape[-2] // sublanes) * sublanes, -(-shape[-1] // 128) * 128
    return math.prod(shape[:-2]) * rows * cols * itemsize


def vmem_limit(leaves, out_shape, *, in_specs, out_specs, scratch_shapes) -> int | None:
    """An estimate of a kernel's VMEM: two buffers (the pipeline's double buffering) of every
    input and output block, the scratch, and `_TILE_TEMPORARIES` float32 logits tiles, plus a
    quarter for what Mosaic adds (its matmul's own scratch, in the compiled ``d_weight`` kernel
    for v5p about 2 MiB over the rest), rounded up to a MiB; None (the compiler's default limit)
    when that fits in `SCOPED_VMEM_BYTES`. Derived from the block shapes and compiled for the
    targets, not measured on a TPU."""
    blocks = [(s.block_shape, a.dtype) for s, a in zip(in_specs, leaves, strict=True)]
    blocks += [(s.block_shape, a.dtype) for s, a in zip(out_specs, out_shape, strict=True)]
    need = 2 * sum(vmem_bytes(shape, dtype) for shape, dtype in blocks if shape is not None)
    tile = scratch_shapes[0]  # every kernel's first scratch is its logits tile
    vmem = [s for s in scratch_shapes if s.memory_space == pltpu.VMEM]
    need += sum(vmem_bytes(s.shape, s.dtype) for s in vmem)
    need += _TILE_TEMPORARIES * vmem_bytes(tile.shape, jnp.float32)
    limit = -(-(need * 5 // 4) // 2**20) * 2**20
    return None if limit <= SCOPED_VMEM_BYTES else limit


def _specs(names, packed, options, geo: Geometry, grid_to_blocks):
    """BlockSpecs of the operands for a grid whose indices map to ``(row block, column block,
    hidden chunk of x, hidden chunk of w)``; `_blocks.pack_rows`' ``packed`` among them."""

    def block_and_index(name):
        if name == "x":
            return (geo.bn, geo.bd), lambda r, c, kx, kw: (r, kx)
        if name == "w" and geo.vd:
            return (geo.bv, geo.bd), lambda r, c, kx, kw: (c, kw)
        if name == "w":
            return (geo.bd, geo.bv), lambda r, c, kx, kw: (kw, c)
        row, col = _blocks.axes(name, options)
        block = (geo.bn if row == 0 else 1, geo.bv if col == 1 else 1)
        return block, lambda r, c, kx, kw: (
            _blocks.block_index(r, row == 0),
            _blocks.block_index(c, col == 1),
        )

    specs = []
    packed = dict(packed)
    for name in names:
        if name in packed:
            k = len(packed[name])
            specs.append(_blocks.rows_spec(k, geo.bn, lambda *grid: grid_to_blocks(*grid)[0]))
            continue
        block, index = block_and_index(name)
        specs.append(pl.BlockSpec(block, lambda *grid, index=index: index(*grid_to_blocks(*grid))))
    return specs


class _TpuTile:
    """The tile at grid position (row block ``i``, vocabulary block ``j``). Its raw logits are
    summed over the hidden chunks that the grid's last axis walks, into a float32 VMEM scratch,
    so that no block spans ``D``. Padding of a ragged block (rows, columns or hidden entries
    past the arrays) holds garbage, NaN in interpret mode, so ``x`` and ``w`` are zeroed there."""

    def __init__(self, ins: _blocks.Operands, packed, options, geo: Geometry, *, i, j):
        self.ins, self.packed, self.options, self.geo = ins, packed, options, geo
        self.row0, self.col0 = i * geo.bn, j * geo.bv
        self.row_ok = _linear.rows_ok(self.row0, self.row0, geo.bn, geo.num_rows)  # [bn, 1]
        self.col_ok = _linear.columns_ok(self.col0, self.col0, geo.bv, geo.num_classes)

    def x(self, k):
        """``[bn, bd]``: hidden chunk ``k`` of the row block of ``x``."""
        ok = self.row_ok & _linear.hidden_ok(k * self.geo.bd, self.geo.bd, self.geo.hidden)
        x = self.ins.x[...]
        return jnp.where(ok, x, jnp.zeros((), x.dtype))

    def w(self, k):
        """``[bd, bv]`` (``[bv, bd]`` when vd): hidden chunk ``k`` of the column block of ``w``."""
        hid = _linear.hidden_ok(k * self.geo.bd, self.geo.bd, self.geo.hidden)
        ok = self.col_ok.T & hid if self.geo.vd else hid.T & self.col_ok
        w = self.ins.w[...]
        return jnp.where(ok, w, jnp.zeros((), w.dtype))

    def add_logits(self, z_ref, k):
        """``z_ref`` becomes the sum over hidden chunks ``0..k`` of ``x_k w_k``."""
        part = _linear.logits_tile(self.x(k), self.w(k), None, vd=self.geo.vd)

        @pl.when(k == 0)
        def _first():
            z_ref[...] = part

        @pl.when(k > 0)
        def _next():
            z_ref[...] += part

    def tile(self) -> _linear.Tile:
        """The tile's other operands, read once its logits are complete (the packed per-row
        operands unpacked, `_blocks.pack_rows`)."""
        loaded = {k: getattr(self.ins, k) for k in self.ins._fields if k not in _MATMUL}
        blocks = _blocks.Operands(**{k: None if r is None else r[...] for k, r in loaded.items()})
        blocks = _blocks.unpack_rows(blocks, self.packed)
        geo = self.geo
        return _linear.Tile(
            blocks,
            self.options,
            start=(self.row0, self.col0),
            lo=(self.row0, self.col0),
            shape=(geo.bn, geo.bv),
            extents=(geo.num_rows, geo.num_classes),
        )

    @staticmethod
    def logits(z_ref, tile: _linear.Tile):
        """The raw logits ``x W (+ b)`` of the tile, from the completed sum in ``z_ref``."""
        z = z_ref[...]
        return z if tile.bias is None else z + tile.bias.astype(z.dtype)


def _run_if_kept(keep, accumulate):
    """Runs ``accumulate`` (a side effect on refs) unless the gradient filter dropped the tile."""
    if keep is None:
        accumulate()
    else:
        pl.when(keep)(accumulate)


def _forward_kernel(*refs, names, packed, treedef, options, geo):
    """Grid ``(row blocks, vocabulary blocks, hidden chunks)``; the running log-sum-exp and
    target sums stay in VMEM scratch while the last two indices move, and the last step writes
    them packed along lanes into the ``[1, k, bn]`` output block (`_blocks.store_packed`)."""
    i, j, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ins, (out_ref, z_ref, *state_refs) = _blocks.named(names, refs)
    tpu_tile = _TpuTile(ins, packed, options, geo, i=i, j=j)

    @pl.when((j == 0) & (k == 0))
    def _init():
        init = _blocks.state_init(options, geo.bn, out_ref.dtype)
        for ref, value in zip(state_refs, jax.tree.leaves(init), strict=True):
            ref[...] = value

    tpu_tile.add_logits(z_ref, k)

    @pl.when(k == geo.chunks - 1)
    def _merge():
        tile = tpu_tile.tile()
        state = jax.tree.unflatten(treedef, [r[...] for r in state_refs])
        state = tile.forward(state, tpu_tile.logits(z_ref, tile))
        for ref, value in zip(state_refs, jax.tree.leaves(state), strict=True):
            ref[...] = value

        @pl.when(j == pl.num_programs(1) - 1)
        def _write():
            _blocks.store_packed(out_ref, state)


def _backward_kernel(*refs, names, packed, options, geo, eps, wrt: str, n_extra: int):
    """One gradient of the backward pass, on a grid whose last axis has two phases of
    ``chunks`` steps each: the first sums the tile's logits over the hidden chunks, and its
    last step forms the gradient tile ``dz`` (kept in VMEM); the second walks the hidden chunks
    again, adding ``dz`` times chunk ``k`` of the other matmul operand into a float32
    accumulator that spans the hidden size.

    ``wrt="inputs"``: grid ``(row blocks, vocabulary blocks, 2 chunks)``, accumulating
    ``d_inputs`` ``[bn, D]`` over vocabulary blocks (and the temperature rows, the one extra
    output). ``wrt="weight"``: grid ``(vocabulary blocks, row blocks, 2 chunks)``, accumulating
    ``d_weight`` ``[D, bv]`` over row blocks (and ``d_bias``). Chunk ``k`` of the accumulator is
    copied to the output block during the last reduction step, where the output's block index
    moves to chunk ``k``; before that it stays on chunk 0, which is not written back until then.
    """
    if wrt == "inputs":
        i, j = pl.program_id(0), pl.program_id(1)
        first, last = j == 0, j == pl.num_programs(1) - 1
    else:
        j, i = pl.program_id(0), pl.program_id(1)
        first, last = i == 0, i == pl.num_programs(1) - 1
    step, chunks = pl.program_id(2), geo.chunks
    ins, (out_ref, *rest) = _blocks.named(names, refs)
    extra, (z_ref, dz_ref, acc_ref, *keep_ref) = rest[:n_extra], rest[n_extra:]
    tpu_tile = _TpuTile(ins, packed, options, geo, i=i, j=j)

    @pl.when(first & (step == 0))
    def _init():
        for ref in (acc_ref, *extra):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    @pl.when(step < chunks)
    def _logits():
        tpu_tile.add_logits(z_ref, step)

    @pl.when(step == chunks - 1)
    def _gradient():
        tile = tpu_tile.tile()
        grad = tile.backward(tpu_tile.logits(z_ref, tile), filter_eps=eps)
        dz_ref[...] = grad.d_logits
        if keep_ref:
            keep_ref[0][0] = grad.keep.astype(jnp.int32)
        if wrt == "inputs":
            for ref in extra:
                ref[...] += grad.t_part
        else:
            _run_if_kept(grad.keep, lambda: _add_bias_grad(extra, grad.d_logits))

    @pl.when(step >= chunks)
    def _accumulate():
        k = step - chunks
        start = pl.multiple_of(k * geo.bd, geo.bd)
        acc = acc_ref.at[_chunk_index(wrt, geo, pl.ds(start, geo.bd))]
        dz = dz_ref[...]

        def add():
            if wrt == "inputs":
                acc[...] += input_grad(dz, tpu_tile.w(k), vd=geo.vd)
            else:
                acc[...] += weight_grad(tpu_tile.x(k), dz, vd=geo.vd)

        _run_if_kept(keep_ref[0][0] != 0 if keep_ref else None, add)

        @pl.when(last)
        def _write():
            out_ref[...] = acc[...].astype(out_ref.dtype)


def _add_bias_grad(db_refs, dz):
    for ref in db_refs:
        ref[...] += jnp.sum(dz, axis=0, keepdims=True)


def _chunk_index(wrt: str, geo: Geometry, hidden):
    """The index of hidden chunk ``hidden`` (a slice) in a backward accumulator: columns of
    ``d_inputs`` ``[bn, D]``, rows of ``d_weight`` ``[D, bv]``, columns of ``[bv, D]`` (vd)."""
    if wrt == "inputs" or geo.vd:
        return slice(None), hidden
    return hidden, slice(None)


def _pallas_call(kernel, leaves, out_shape, grid, *, interpret, name, **specs):
    """``pallas_call(kernel, ...)``, to be called on ``leaves``: the first grid axis parallel
    and the others reductions, and a VMEM limit where the blocks need more than the default."""
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel",) + ("arbitrary",) * (len(grid) - 1),
        vmem_limit_bytes=vmem_limit(leaves, out_shape, **specs),
    )
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=params,
        interpret=interpret,
        name=name,
        **specs,
    )


def forward(options, ops: _blocks.Operands, *, blocks, interpret=False) -> _tile.RowState:
    """The forward accumulators (`_tile.RowState`) of every row, each ``[N, 1]``."""
    geo = Geometry.of(blocks, ops, options, clip=True)
    n, v, bn, bv = geo.num_rows, geo.num_classes, geo.bn, geo.bv
    dtype = accumulation_dtype(ops.x.dtype)
    ops, packed = _blocks.pack_rows(ops, options, geo.bn)
    names, leaves = _blocks.present(ops)
    state, treedef = jax.tree.flatten(_blocks.state_init(options, bn, dtype))
    k = treedef.num_leaves
    out = _pallas_call(
        functools.partial(
            _forward_kernel,
            names=names,
            packed=packed,
            treedef=treedef,
            options=options,
            geo=geo,
        ),
        leaves,
        [_blocks.out_struct((pl.cdiv(n, bn), k, bn), dtype, ops.x)],
        (pl.cdiv(n, bn), pl.cdiv(v, bv), geo.chunks),
        interpret=interpret,
        name="linear_ce_forward",
        in_specs=_specs(names, packed, options, geo, lambda i, j, k: (i, j, k, k)),
        out_specs=[_blocks.rows_spec(k, bn, lambda i, j, c: i)],
        scratch_shapes=[
            pltpu.VMEM((bn, bv), dtype),
            *(pltpu.VMEM(x.shape, x.dtype) for x in state),
        ],
    )(*leaves)
    return _blocks.unpacked(out[0], treedef, n)


def backward(options, ops: _blocks.Operands, *, blocks, interpret=False) -> _linear.Grads:
    """Two kernels, as in flash attention: ``d_inputs`` on the forward's grid and ``d_weight``,
    ``d_bias`` on the transposed grid, each over two phases of hidden chunks
    (`_backward_kernel`)."""
    geo = Geometry.of(blocks, ops, options, clip=True)
    n, v, bn, bv, bd, d = geo.num_rows, geo.num_classes, geo.bn, geo.bv, geo.bd, geo.hidden
    kd, rows, cols = geo.chunks, pl.cdiv(n, bn), pl.cdiv(v, bv)
    dtype = accumulation_dtype(ops.x.dtype)
    array_t = options.temperature is None
    has_bias = ops.bias is not None
    ops, packed = _blocks.pack_rows(ops, options, geo.bn)
    names, leaves = _blocks.present(ops)

    def phase_chunks(s):
        """Hidden chunks at step ``s``: (the one read only while forming the logits, which then
        stays put, and the one read in both phases)."""
        return jnp.minimum(s, kd - 1), jnp.where(s < kd, s, s - kd)

    def out_chunk(is_last, s):
        return jnp.where(is_last & (s >= kd), s - kd, _blocks.first_block())

    def scratch(acc_shape):
        tiles = [pltpu.VMEM((bn, bv), dtype), pltpu.VMEM((bn, bv), dtype)]  # logits, dz
        keep = [pltpu.SMEM((1,), jnp.int32)] if options.filter_eps else []
        return [*tiles, pltpu.VMEM(acc_shape, dtype), *keep]

    def gradient(wrt, grid, grid_to_blocks, out, acc_shape):
        """One of the two kernels: ``out`` pairs each output's shape with its BlockSpec."""
        shapes, specs = zip(*out, strict=True)
        kernel = functools.partial(
            _backward_kernel,
            names=names,
            packed=packed,
            options=options,
            geo=geo,
            eps=options.filter_eps,
            wrt=wrt,
            n_extra=len(out) - 1,
        )
        return _pallas_call(
            kernel,
            leaves,
            list(shapes),
            grid,
            interpret=interpret,
            name=f"linear_ce_{wrt}_grad",
            in_specs=_specs(names, packed, options, geo, grid_to_blocks),
            out_specs=list(specs),
            scratch_shapes=scratch(acc_shape),
        )(*leaves)

    first = _blocks.first_block
    dx_out = [
        (
            _blocks.out_struct((n, d), ops.x.dtype, ops.x),
            pl.BlockSpec((bn, bd), lambda i, j, s: (i, out_chunk(j == cols - 1, s))),
        )
    ]
    if array_t:
        t_spec = pl.BlockSpec((bn, 1), lambda i, j, s: (i, first()))
        dx_out.append((_blocks.out_struct((n, 1), dtype, ops.x), t_spec))
    if geo.vd:
        dw_spec = pl.BlockSpec((bv, bd), lambda j, i, s: (j, out_chunk(i == rows - 1, s)))
    else:
        dw_spec = pl.BlockSpec((bd, bv), lambda j, i, s: (out_chunk(i == rows - 1, s), j))
    dw_out = [(_blocks.out_struct(ops.w.shape, ops.w.dtype, ops.x), dw_spec)]
    if has_bias:
        db_spec = pl.BlockSpec((1, bv), lambda j, i, s: (first(), j))
        dw_out.append((_blocks.out_struct((1, v), dtype, ops.x), db_spec))
    dx_out = gradient(
        "inputs",
        (rows, cols, 2 * kd),
        lambda i, j, s: (i, j, *phase_chunks(s)),
        dx_out,
        (bn, kd * bd),
    )
    dw_out = gradient(
        "weight",
        (cols, rows, 2 * kd),
        lambda j, i, s: (i, j, *phase_chunks(s)[::-1]),
        dw_out,
        (bv, kd * bd) if geo.vd else (kd * bd, bv),
    )
    t_sum = jnp.sum(dx_out[1]) if array_t else None
    return _linear.Grads(dx_out[0], dw_out[0], dw_out[1][0] if has_bias else None, t_sum)
