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
  ``plgpu.wgmma`` over shared-memory references fed by a TMA pipeline, which is a different kernel,
  and one that cannot even be lowered on a CPU-only host (its lowering needs the CUDA plugin), so
  it could not be written and checked in a session without a GPU. Triton lowers ``jnp.dot`` to
  ``tl.dot`` (tensor cores), and is available in jax 0.10 and, deprecated but present (a
  ``DeprecationWarning`` at each lowering), in 0.11; the reasons are spelled out in
  `kernels.cross_entropy_gpu`. The GPU schedule cannot revisit output blocks
  across a grid axis (grid programs run in parallel), so each program loops over the reduction axis
  itself: one program per row block for the forward and ``d_inputs``, one per vocabulary block for
  ``d_weight``. Triton needs power-of-two block shapes, so this schedule rounds the block sizes down
  to powers of two and raises ``NotImplementedError`` for a hidden size ``D`` that is not one. Both
  schedules are verified in interpret mode only: neither has been compiled for, or timed on, a real
  TPU or GPU.

Gradient filtering (Cut Cross-Entropy): with ``filter_eps > 0`` the backward skips the two
gradient matmuls of every tile in which all ``|dl/dz'|`` (before the cotangent) are below
``filter_eps``; the tile's logits are still recomputed, since they are what decides.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax_softmax_ce.kernels import _tile
from jax_softmax_ce.kernels._tile import RowState, row_state_init


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


def forward_step(state: RowState, z, target, smoothing) -> RowState:
    """Merges one tile of transformed logits into the running log-sum-exp and target sums."""
    z = z.astype(state.lse.m.dtype)
    lse, ref, shift = _tile.lse_merge(state.lse, z)
    term = _tile.dense_merge(state.target, shift, target, z, ref)
    if smoothing is not None:
        smoothing = _tile.dense_merge(state.smoothing, shift, smoothing, z, ref)
    return RowState(lse, term, smoothing)


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


def forward_tile(
    state: RowState,
    x,
    w,
    bias,
    labels,
    label_weight,
    where,
    class_weights,
    temperature,
    *,
    col0,
    lo,
    num_classes: int,
    vd: bool,
    options,
) -> RowState:
    """One forward step: the tile ``x W (+ b)`` for columns ``col0 + [0, cols)`` merged into
    ``state``. Columns below ``lo`` or at or above ``num_classes`` are ignored; ``where`` is None
    or a bool block broadcastable to the tile; ``temperature`` a float or a ``[1, 1]`` array."""
    z_raw = logits_tile(x, w, bias, vd=vd)
    ok = columns_ok(col0, lo, z_raw.shape[1], num_classes)
    valid = ok if where is None else ok & where
    z = _tile.masked_transform(z_raw, valid, softcap=options.logit_softcap, temperature=temperature)
    target = _tile.label_target(labels, label_weight, col0, ok)
    smooth = None
    if options.label_smoothing:
        smooth = _tile.smoothing_weights(valid, class_weights, z.dtype)
    return forward_step(state, z, target, smooth)


class TileGrad(NamedTuple):
    """The backward of one tile."""

    dz: jax.Array  # [rows, cols] dl/dz (raw logits), times the cotangent; 0 on ignored entries
    keep: jax.Array | None  # scalar bool from the gradient filter, None without filtering
    temperature_row: jax.Array | None  # [rows, 1] sum_k g_k (z'_k - lse), for an array T


def backward_tile(
    x,
    w,
    bias,
    labels,
    label_weight,
    n_valid,
    total_weight,
    lse,
    cotangent,
    where,
    class_weights,
    temperature,
    *,
    col0,
    lo,
    num_classes: int,
    vd: bool,
    options,
    filter_eps: float,
    array_temperature: bool,
) -> TileGrad:
    """Recomputes one tile and forms its gradient. Per-row operands are ``[rows, 1]``; rows with a
    zero ``cotangent`` (those that do not count, or padding) get a zero gradient."""
    z_raw = logits_tile(x, w, bias, vd=vd)
    ok = columns_ok(col0, lo, z_raw.shape[1], num_classes)
    valid = ok if where is None else ok & where
    z = _tile.masked_transform(z_raw, valid, softcap=options.logit_softcap, temperature=temperature)
    target = _tile.label_target(labels, label_weight, col0, ok)
    smooth = None
    if options.label_smoothing:
        smooth = _tile.smoothing_weights(valid, class_weights, z.dtype)
    a = _tile.mix(options.label_smoothing, n_valid, target, smooth)
    g = _tile.grad_block(z, lse, total_weight, a, z_loss=options.z_loss)
    live = cotangent != 0
    g = jnp.where(live, g, 0)
    keep = keep_tile(g, filter_eps) if filter_eps else None
    g = jnp.where(live, g * cotangent, 0)
    t_row = _tile.temperature_term(z, g, lse) if array_temperature else None
    dz = _tile.transform_vjp(z_raw, g, softcap=options.logit_softcap, temperature=temperature)
    return TileGrad(dz, keep, t_row)


def block_start(index, block: int, size: int):
    """Start of block ``index``: ``index * block``, moved back so the block ends inside ``size``."""
    return jnp.minimum(index * block, size - block)


def when_kept(keep, update, acc):
    """``update(acc)``, or ``acc`` unchanged where the gradient filter dropped the tile
    (``keep`` False); ``keep`` None means no filter."""
    if keep is None:
        return update(acc)
    return jax.lax.cond(keep, update, lambda a: a, acc)


# ----------------------------------------------------------------------------------------------
# Pallas schedules. Operands travel as a dict name -> array; each has a row axis (sliced by row
# blocks), a column axis (sliced by vocabulary blocks), both or neither.

_ROW_OPERANDS = ("labels", "label_weight", "n_valid", "total_weight", "lse", "cotangent")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """The static shape of a schedule: tile sizes, array extents and the weight layout."""

    bn: int
    bv: int
    num_rows: int
    num_classes: int
    vd: bool

    @classmethod
    def of(cls, config, problem) -> _Geometry:
        """Tiles clipped to the arrays, powers of two on GPU (Triton)."""
        n, d = problem.inputs.shape
        v = config.num_classes
        bn, bv = min(config.block_sizes.block_n, n), min(config.block_sizes.block_v, v)
        if config.pallas_backend == "gpu":
            if d & (d - 1):
                raise NotImplementedError(
                    f"the GPU (Triton) schedule of the fused kernel needs a power-of-two hidden "
                    f"size, got inputs shape {problem.inputs.shape}"
                )
            bn, bv = _power_of_two_floor(bn), _power_of_two_floor(bv)
        return cls(bn, bv, n, v, config.vd)

    def axes(self, name: str, shape):
        """``(row_axis, col_axis)`` of an operand, each an int or None."""
        if name == "x":
            return 0, None
        if name == "w":
            return None, (0 if self.vd else 1)
        if name in ("bias", "class_weights"):
            return None, 1
        if name in _ROW_OPERANDS:
            return 0, None
        if name == "where":
            return (0 if shape[0] == self.num_rows and shape[0] != 1 else None), (
                1 if shape[1] == self.num_classes and shape[1] != 1 else None
            )
        return None, None  # temperature [1, 1]


def _power_of_two_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def _operands(problem, rows, lse=None, cotangent=None) -> dict:
    """The kernel operands of a problem: 2-D arrays, ``where`` as int8, absent ones left out."""
    n = problem.inputs.shape[0]
    ops = {"x": problem.inputs, "w": problem.weight}
    if problem.bias is not None:
        ops["bias"] = problem.bias[None, :]
    ops["labels"] = rows.labels
    ops["label_weight"] = rows.label_weight
    if lse is not None:
        ops["n_valid"] = jnp.broadcast_to(rows.n_valid, (n, 1))
        ops["total_weight"] = rows.total_weight
        ops["lse"] = lse
        ops["cotangent"] = cotangent
    if problem.where is not None:
        ops["where"] = problem.where.astype(jnp.int8)
    if problem.class_weights is not None:
        ops["class_weights"] = problem.class_weights[None, :]
    if problem.temperature is not None:
        dtype = _tile.accumulation_dtype(problem.inputs.dtype)
        ops["temperature"] = problem.temperature.astype(dtype).reshape(1, 1)
    return ops


class _Tiles:
    """The blocks of one tile at rows ``row0 + [0, bn)`` and columns ``col0 + [0, bv)``, read
    from the kernel's refs and cleaned of padding: rows at or past ``num_rows`` and columns at or
    past ``num_classes`` of a ragged block hold garbage (NaN in interpret mode), so the inputs,
    weight and bias are zeroed there, and the cotangent too."""

    def __init__(self, blocks: dict, options, geo: _Geometry, *, row0, col0):
        self.options, self.geo, self.col0 = options, geo, col0
        self.row_ok = rows_ok(row0, row0, geo.bn, geo.num_rows)
        self.col_ok = columns_ok(col0, col0, geo.bv, geo.num_classes)
        get = blocks.get
        zero = functools.partial(jnp.zeros, (), blocks["x"].dtype)
        self.x = jnp.where(self.row_ok, blocks["x"], zero())
        self.w = jnp.where(self.col_ok.T if geo.vd else self.col_ok, blocks["w"], zero())
        self.bias = None if get("bias") is None else jnp.where(self.col_ok, get("bias"), 0)
        self.where = None if get("where") is None else get("where") != 0
        self.class_weights = get("class_weights")
        t = get("temperature")
        self.temperature = options.temperature if t is None else t
        self.blocks = blocks

    def row(self, name):
        value = self.blocks[name]
        if name in ("cotangent", "lse"):
            value = jnp.where(self.row_ok, value, jnp.zeros((), value.dtype))
        return value

    def forward(self, state: RowState, *, lo) -> RowState:
        """`forward_tile` of these blocks; columns below ``lo`` are ignored."""
        return forward_tile(
            state,
            self.x,
            self.w,
            self.bias,
            self.row("labels"),
            self.row("label_weight"),
            self.where,
            self.class_weights,
            self.temperature,
            col0=self.col0,
            lo=lo,
            num_classes=self.geo.num_classes,
            vd=self.geo.vd,
            options=self.options,
        )

    def backward(self, *, lo, filter_eps: float, array_t: bool) -> TileGrad:
        """`backward_tile` of these blocks; columns below ``lo`` are ignored."""
        return backward_tile(
            self.x,
            self.w,
            self.bias,
            self.row("labels"),
            self.row("label_weight"),
            self.row("n_valid"),
            self.row("total_weight"),
            self.row("lse"),
            self.row("cotangent"),
            self.where,
            self.class_weights,
            self.temperature,
            col0=self.col0,
            lo=lo,
            num_classes=self.geo.num_classes,
            vd=self.geo.vd,
            options=self.options,
            filter_eps=filter_eps,
            array_temperature=array_t,
        )


def _state_treedef(dtype, smoothing: bool):
    return jax.tree.structure(row_state_init(1, dtype, smoothing))


def _split_refs(refs, names):
    """The input refs as a dict by name, and the output refs."""
    return dict(zip(names, refs, strict=False)), refs[len(names) :]


def _pallas_call(config, kernel, ops: dict, out_shape, grid, *, name, **specs):
    """``pallas_call`` for the configured backend; ``specs`` are the TPU BlockSpecs."""
    if config.pallas_backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
        interpret = config.interpret
        if interpret:
            interpret = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
    else:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
        interpret = bool(config.interpret)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=params,
        interpret=interpret,
        name=name,
        **specs,
    )(*ops.values())


# ---------------------------------------------------------------- TPU: grid with resident outputs


def _tpu_specs(ops: dict, grid_to_blocks, geo: _Geometry):
    """BlockSpecs of the operands for a grid whose indices map to ``(row block, column block)``."""
    specs = []
    for name, value in ops.items():
        row_axis, col_axis = geo.axes(name, value.shape)
        shape = tuple(
            geo.bn if a == row_axis else geo.bv if a == col_axis else value.shape[a]
            for a in range(2)
        )

        def index(*grid, row_axis=row_axis, col_axis=col_axis):
            r, c = grid_to_blocks(*grid)
            return tuple(r if a == row_axis else c if a == col_axis else 0 for a in range(2))

        specs.append(pl.BlockSpec(shape, index))
    return specs


def _tpu_tiles(refs, names, options, geo: _Geometry, *, i, j):
    """The tiles at grid position (row block ``i``, vocabulary block ``j``), and the output refs."""
    ins, out_refs = _split_refs(refs, names)
    blocks = {k: r[...] for k, r in ins.items()}
    return _Tiles(blocks, options, geo, row0=i * geo.bn, col0=j * geo.bv), out_refs


def _tpu_when_kept(keep, accumulate):
    """Runs ``accumulate`` unless the gradient filter dropped the tile."""
    if keep is None:
        accumulate()
    else:
        pl.when(keep)(accumulate)


def _forward_tpu_kernel(*refs, names, treedef, options, geo):
    i, j = pl.program_id(0), pl.program_id(1)
    tiles, out_refs = _tpu_tiles(refs, names, options, geo, i=i, j=j)

    @pl.when(j == 0)
    def _init():
        init = row_state_init(geo.bn, out_refs[0].dtype, len(out_refs) > 4)
        for ref, value in zip(out_refs, jax.tree.leaves(init), strict=True):
            ref[...] = value

    state = jax.tree.unflatten(treedef, [r[...] for r in out_refs])
    state = tiles.forward(state, lo=j * geo.bv)
    for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
        ref[...] = value


def _inputs_grad_tpu_kernel(*refs, names, options, geo, eps):
    """Grid ``(row blocks, vocabulary blocks)``: ``d_inputs`` (and the temperature rows)."""
    i, j = pl.program_id(0), pl.program_id(1)
    tiles, (dx_ref, *t_ref) = _tpu_tiles(refs, names, options, geo, i=i, j=j)

    @pl.when(j == 0)
    def _init():
        dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)
        for ref in t_ref:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    tile = tiles.backward(lo=j * geo.bv, filter_eps=eps, array_t=bool(t_ref))
    for ref in t_ref:
        ref[...] += tile.temperature_row

    def accumulate():
        dx_ref[...] += input_grad(tile.dz, tiles.w, vd=geo.vd)

    _tpu_when_kept(tile.keep, accumulate)


def _weight_grad_tpu_kernel(*refs, names, options, geo, eps):
    """Grid ``(vocabulary blocks, row blocks)``: ``d_weight`` (and ``d_bias``)."""
    j, i = pl.program_id(0), pl.program_id(1)
    tiles, (dw_ref, *db_ref) = _tpu_tiles(refs, names, options, geo, i=i, j=j)

    @pl.when(i == 0)
    def _init():
        for ref in (dw_ref, *db_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    tile = tiles.backward(lo=j * geo.bv, filter_eps=eps, array_t=False)

    def accumulate():
        dw_ref[...] += weight_grad(tiles.x, tile.dz, vd=geo.vd)
        for ref in db_ref:
            ref[...] += jnp.sum(tile.dz, axis=0, keepdims=True)

    _tpu_when_kept(tile.keep, accumulate)


# ---------------------------------------------------------- GPU: one program loops over the rest


def _gpu_block(ref, name: str, geo: _Geometry, *, r0, c0):
    row_axis, col_axis = geo.axes(name, ref.shape)
    index = tuple(
        pl.ds(r0, geo.bn) if a == row_axis else pl.ds(c0, geo.bv) if a == col_axis else slice(None)
        for a in range(2)
    )
    return ref[index]


def _gpu_tiles(ins: dict, options, geo: _Geometry, *, r0, c0) -> _Tiles:
    """Loads the blocks at ``(r0, c0)``. Starts are moved back to end inside the arrays, so
    nothing is padded and the cleaning of `_Tiles` is a no-op here."""
    blocks = {k: _gpu_block(r, k, geo, r0=r0, c0=c0) for k, r in ins.items()}
    return _Tiles(blocks, options, geo, row0=r0, col0=c0)


def _forward_gpu_kernel(*refs, names, treedef, options, geo):
    """One program per row block, looping over vocabulary blocks."""
    ins, out_refs = _split_refs(refs, names)
    r0 = block_start(pl.program_id(0), geo.bn, geo.num_rows)

    def vocab_block(j, state):
        c0 = block_start(j, geo.bv, geo.num_classes)
        return _gpu_tiles(ins, options, geo, r0=r0, c0=c0).forward(state, lo=j * geo.bv)

    init = row_state_init(geo.bn, out_refs[0].dtype, len(out_refs) > 4)
    state = jax.lax.fori_loop(0, pl.cdiv(geo.num_classes, geo.bv), vocab_block, init)
    for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
        ref[pl.ds(r0, geo.bn), :] = value
    del treedef


def _inputs_grad_gpu_kernel(*refs, names, options, geo, eps):
    """One program per row block, looping over vocabulary blocks: ``d_inputs``."""
    ins, (dx_ref, *t_ref) = _split_refs(refs, names)
    r0 = block_start(pl.program_id(0), geo.bn, geo.num_rows)

    def vocab_block(j, carry):
        dx, t_row = carry
        c0 = block_start(j, geo.bv, geo.num_classes)
        tiles = _gpu_tiles(ins, options, geo, r0=r0, c0=c0)
        tile = tiles.backward(lo=j * geo.bv, filter_eps=eps, array_t=bool(t_ref))
        if t_ref:
            t_row = t_row + tile.temperature_row
        dx = when_kept(tile.keep, lambda d: d + input_grad(tile.dz, tiles.w, vd=geo.vd), dx)
        return dx, t_row

    dtype = dx_ref.dtype
    init = (jnp.zeros((geo.bn, dx_ref.shape[1]), dtype), jnp.zeros((geo.bn, 1), dtype))
    dx, t_row = jax.lax.fori_loop(0, pl.cdiv(geo.num_classes, geo.bv), vocab_block, init)
    dx_ref[pl.ds(r0, geo.bn), :] = dx
    for ref in t_ref:
        ref[pl.ds(r0, geo.bn), :] = t_row


def _weight_grad_gpu_kernel(*refs, names, options, geo, eps):
    """One program per vocabulary block, looping over row blocks: ``d_weight`` and ``d_bias``."""
    ins, (dw_ref, *db_ref) = _split_refs(refs, names)
    bn, bv = geo.bn, geo.bv
    c0 = block_start(pl.program_id(0), bv, geo.num_classes)

    def row_block(i, carry):
        r0 = block_start(i, bn, geo.num_rows)
        tiles = _gpu_tiles(ins, options, geo, r0=r0, c0=c0)
        fresh = rows_ok(r0, i * bn, bn, geo.num_rows)
        tiles.blocks["cotangent"] = jnp.where(fresh, tiles.blocks["cotangent"], 0)
        tile = tiles.backward(lo=c0, filter_eps=eps, array_t=False)

        def accumulate(acc):
            dw, db = acc
            return dw + weight_grad(tiles.x, tile.dz, vd=geo.vd), db + jnp.sum(
                tile.dz, 0, keepdims=True
            )

        return when_kept(tile.keep, accumulate, carry)

    dtype = dw_ref.dtype
    d = dw_ref.shape[1] if geo.vd else dw_ref.shape[0]
    init = (jnp.zeros((bv, d) if geo.vd else (d, bv), dtype), jnp.zeros((1, bv), dtype))
    dw, db = jax.lax.fori_loop(0, pl.cdiv(geo.num_rows, bn), row_block, init)
    if geo.vd:
        dw_ref[pl.ds(c0, bv), :] = dw
    else:
        dw_ref[:, pl.ds(c0, bv)] = dw
    for ref in db_ref:
        ref[:, pl.ds(c0, bv)] = db


# ------------------------------------------------------------------------------ entry points


def forward_pallas(options, config, problem, rows) -> RowState:
    """The forward kernel: ``RowState`` of ``[N, 1]`` accumulators (see `forward_tile`)."""
    geo = _Geometry.of(config, problem)
    n, v, bn, bv = geo.num_rows, geo.num_classes, geo.bn, geo.bv
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    ops = _operands(problem, rows)
    treedef = _state_treedef(dtype, bool(options.label_smoothing))
    n_out = treedef.num_leaves
    out_shape = [jax.ShapeDtypeStruct((n, 1), dtype)] * n_out
    if config.pallas_backend == "tpu":
        kernel, grid = _forward_tpu_kernel, (pl.cdiv(n, bn), pl.cdiv(v, bv))
        specs = dict(
            in_specs=_tpu_specs(ops, lambda i, j: (i, j), geo),
            out_specs=[pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] * n_out,
        )
    else:
        kernel, grid, specs = _forward_gpu_kernel, (pl.cdiv(n, bn),), {}
    kernel = functools.partial(kernel, names=tuple(ops), treedef=treedef, options=options, geo=geo)
    out = _pallas_call(config, kernel, ops, out_shape, grid, name="linear_ce_forward", **specs)
    return jax.tree.unflatten(treedef, out)


def backward_pallas(options, config, problem, rows, lse, cotangent):
    """The two backward kernels: ``(d_inputs, d_weight, d_bias, temperature_sum)``, the
    gradients in the accumulation dtype."""
    geo = _Geometry.of(config, problem)
    n, v, bn, bv = geo.num_rows, geo.num_classes, geo.bn, geo.bv
    d = problem.inputs.shape[1]
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    ops = _operands(problem, rows, lse=lse, cotangent=cotangent)
    array_t = problem.temperature is not None
    has_bias = problem.bias is not None
    dx_shape = [jax.ShapeDtypeStruct((n, d), dtype)]
    dx_shape += [jax.ShapeDtypeStruct((n, 1), dtype)] if array_t else []
    dw_shape = [jax.ShapeDtypeStruct(problem.weight.shape, dtype)]
    dw_shape += [jax.ShapeDtypeStruct((1, v), dtype)] if has_bias else []
    if config.pallas_backend == "tpu":
        dx_kernel, dw_kernel = _inputs_grad_tpu_kernel, _weight_grad_tpu_kernel
        dx_grid, dw_grid = (pl.cdiv(n, bn), pl.cdiv(v, bv)), (pl.cdiv(v, bv), pl.cdiv(n, bn))
        dx_blocks = [pl.BlockSpec((bn, d), lambda i, j: (i, 0))]
        dx_blocks += [pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] if array_t else []
        if config.vd:
            dw_blocks = [pl.BlockSpec((bv, d), lambda j, i: (j, 0))]
        else:
            dw_blocks = [pl.BlockSpec((d, bv), lambda j, i: (0, j))]
        dw_blocks += [pl.BlockSpec((1, bv), lambda j, i: (0, j))] if has_bias else []
        dx_specs = dict(in_specs=_tpu_specs(ops, lambda i, j: (i, j), geo), out_specs=dx_blocks)
        dw_specs = dict(in_specs=_tpu_specs(ops, lambda j, i: (i, j), geo), out_specs=dw_blocks)
    else:
        dx_kernel, dw_kernel = _inputs_grad_gpu_kernel, _weight_grad_gpu_kernel
        dx_grid, dw_grid = (pl.cdiv(n, bn),), (pl.cdiv(v, bv),)
        dx_specs = dw_specs = {}
        if not has_bias:
            dw_shape = [*dw_shape, jax.ShapeDtypeStruct((1, v), dtype)]
    statics = dict(names=tuple(ops), options=options, geo=geo, eps=config.filter_eps)
    dx_kernel = functools.partial(dx_kernel, **statics)
    dx_out = _pallas_call(
        config, dx_kernel, ops, dx_shape, dx_grid, name="linear_ce_inputs_grad", **dx_specs
    )
    dw_kernel = functools.partial(dw_kernel, **statics)
    dw_out = _pallas_call(
        config, dw_kernel, ops, dw_shape, dw_grid, name="linear_ce_weight_grad", **dw_specs
    )
    t_sum = jnp.sum(dx_out[1]) if array_t else jnp.zeros((), dtype)
    db = dw_out[1][0] if has_bias else None
    return dx_out[0], dw_out[0], db, t_sum
