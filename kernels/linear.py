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
    z = transformed_tile(z_raw, valid, softcap=options.logit_softcap, temperature=temperature)
    target = target_tile(labels, label_weight, col0, ok)
    smooth = None
    if options.label_smoothing:
        smooth = smoothing_tile(valid, class_weights, z.dtype)
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
    z = transformed_tile(z_raw, valid, softcap=options.logit_softcap, temperature=temperature)
    target = target_tile(labels, label_weight, col0, ok)
    smooth = None
    if options.label_smoothing:
        smooth = smoothing_tile(valid, class_weights, z.dtype)
    g = grad_tile(
        z,
        lse,
        total_weight,
        target,
        smooth,
        n_valid,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    live = cotangent != 0
    g = jnp.where(live, g, 0)
    keep = keep_tile(g, filter_eps) if filter_eps else None
    g = jnp.where(live, g * cotangent, 0)
    t_row = _tile.temperature_term(z, g, lse) if array_temperature else None
    dz = _tile.transform_vjp(z_raw, g, softcap=options.logit_softcap, temperature=temperature)
    return TileGrad(dz, keep, t_row)


# ----------------------------------------------------------------------------------------------
# Pallas schedules. Operands travel as a dict name -> array; each has a row axis (sliced by row
# blocks), a column axis (sliced by vocabulary blocks), both or neither.

_ROW_OPERANDS = ("labels", "label_weight", "n_valid", "total_weight", "lse", "cotangent")


def _axes(name: str, shape, num_rows: int, num_classes: int, vd: bool):
    """``(row_axis, col_axis)`` of an operand, each an int or None."""
    if name == "x":
        return 0, None
    if name == "w":
        return None, (0 if vd else 1)
    if name in ("bias", "class_weights"):
        return None, 1
    if name in _ROW_OPERANDS:
        return 0, None
    if name == "where":
        return (0 if shape[0] == num_rows and shape[0] != 1 else None), (
            1 if shape[1] == num_classes and shape[1] != 1 else None
        )
    return None, None  # temperature [1, 1]


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
    """The blocks of one tile, read from the kernel's refs and cleaned of padding: rows at or past
    ``num_rows`` and columns at or past ``num_classes`` of a ragged block hold garbage (NaN in
    interpret mode), so the inputs, weight and bias are zeroed there, and the cotangent too."""

    def __init__(self, blocks: dict, options, *, row0, col0, bn, bv, num_rows, num_classes, vd):
        self.row_ok = rows_ok(row0, row0, bn, num_rows)
        self.col_ok = columns_ok(col0, col0, bv, num_classes)
        get = blocks.get
        zero = functools.partial(jnp.zeros, (), blocks["x"].dtype)
        self.x = jnp.where(self.row_ok, blocks["x"], zero())
        self.w = jnp.where(self.col_ok.T if vd else self.col_ok, blocks["w"], zero())
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


def _tile_args(t: _Tiles):
    return dict(x=t.x, w=t.w, bias=t.bias, where=t.where, class_weights=t.class_weights)


def _forward_block(state, t: _Tiles, *, col0, lo, num_classes, vd, options):
    return forward_tile(
        state,
        t.x,
        t.w,
        t.bias,
        t.row("labels"),
        t.row("label_weight"),
        t.where,
        t.class_weights,
        t.temperature,
        col0=col0,
        lo=lo,
        num_classes=num_classes,
        vd=vd,
        options=options,
    )


def _backward_block(t: _Tiles, *, col0, lo, num_classes, vd, options, filter_eps, array_t):
    return backward_tile(
        t.x,
        t.w,
        t.bias,
        t.row("labels"),
        t.row("label_weight"),
        t.row("n_valid"),
        t.row("total_weight"),
        t.row("lse"),
        t.row("cotangent"),
        t.where,
        t.class_weights,
        t.temperature,
        col0=col0,
        lo=lo,
        num_classes=num_classes,
        vd=vd,
        options=options,
        filter_eps=filter_eps,
        array_temperature=array_t,
    )


def _state_treedef(dtype, smoothing: bool):
    return jax.tree.structure(row_state_init(1, dtype, smoothing))


# ---------------------------------------------------------------- TPU: grid with resident outputs


def _tpu_specs(ops: dict, grid_to_blocks, *, bn, bv, num_rows, num_classes, vd):
    """BlockSpecs of the operands for a grid whose indices map to ``(row block, column block)``."""
    specs = []
    for name, value in ops.items():
        row_axis, col_axis = _axes(name, value.shape, num_rows, num_classes, vd)
        shape = tuple(
            bn if a == row_axis else bv if a == col_axis else value.shape[a] for a in range(2)
        )

        def index(*grid, row_axis=row_axis, col_axis=col_axis):
            r, c = grid_to_blocks(*grid)
            return tuple(r if a == row_axis else c if a == col_axis else 0 for a in range(2))

        specs.append(pl.BlockSpec(shape, index))
    return specs


def _tpu_call(kernel, ops, in_specs, out_shape, out_specs, grid, *, name, interpret):
    from jax.experimental.pallas import tpu as pltpu

    if interpret:
        interpret = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(*ops.values())


def _tpu_tiles(blocks, options, *, i, j, bn, bv, num_rows, num_classes, vd) -> _Tiles:
    """The tiles at grid position (row block ``i``, vocabulary block ``j``)."""
    geometry = dict(bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd)
    return _Tiles(blocks, options, row0=i * bn, col0=j * bv, **geometry)


def _tpu_backward(blocks, options, *, i, j, bn, bv, num_rows, num_classes, vd, eps, array_t):
    """The tiles and their backward block at grid position ``(i, j)``."""
    tiles = _tpu_tiles(
        blocks, options, i=i, j=j, bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd
    )
    tile = _backward_block(
        tiles,
        col0=j * bv,
        lo=j * bv,
        num_classes=num_classes,
        vd=vd,
        options=options,
        filter_eps=eps,
        array_t=array_t,
    )
    return tiles, tile


def _forward_tpu_kernel(*refs, names, treedef, options, bn, bv, num_rows, num_classes, vd):
    blocks = {k: r[...] for k, r in zip(names, refs, strict=False)}
    out_refs = refs[len(names) :]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        init = row_state_init(bn, out_refs[0].dtype, len(out_refs) > 4)
        for ref, value in zip(out_refs, jax.tree.leaves(init), strict=True):
            ref[...] = value

    tiles = _tpu_tiles(
        blocks, options, i=i, j=j, bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd
    )
    state = jax.tree.unflatten(treedef, [r[...] for r in out_refs])
    state = _forward_block(
        state, tiles, col0=j * bv, lo=j * bv, num_classes=num_classes, vd=vd, options=options
    )
    for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
        ref[...] = value


def _inputs_grad_tpu_kernel(*refs, names, options, bn, bv, num_rows, num_classes, vd, eps):
    """Grid ``(row blocks, vocabulary blocks)``: ``d_inputs`` (and the temperature rows)."""
    blocks = {k: r[...] for k, r in zip(names, refs, strict=False)}
    dx_ref, *t_ref = refs[len(names) :]
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)
        for ref in t_ref:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    tiles, tile = _tpu_backward(
        blocks,
        options,
        i=i,
        j=j,
        bn=bn,
        bv=bv,
        num_rows=num_rows,
        num_classes=num_classes,
        vd=vd,
        eps=eps,
        array_t=bool(t_ref),
    )
    for ref in t_ref:
        ref[...] += tile.temperature_row

    def accumulate():
        dx_ref[...] += input_grad(tile.dz, tiles.w, vd=vd)

    if tile.keep is None:
        accumulate()
    else:
        pl.when(tile.keep)(accumulate)


def _weight_grad_tpu_kernel(*refs, names, options, bn, bv, num_rows, num_classes, vd, eps):
    """Grid ``(vocabulary blocks, row blocks)``: ``d_weight`` (and ``d_bias``)."""
    blocks = {k: r[...] for k, r in zip(names, refs, strict=False)}
    dw_ref, *db_ref = refs[len(names) :]
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        for ref in (dw_ref, *db_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    tiles, tile = _tpu_backward(
        blocks,
        options,
        i=i,
        j=j,
        bn=bn,
        bv=bv,
        num_rows=num_rows,
        num_classes=num_classes,
        vd=vd,
        eps=eps,
        array_t=False,
    )

    def accumulate():
        dw_ref[...] += weight_grad(tiles.x, tile.dz, vd=vd)
        for ref in db_ref:
            ref[...] += jnp.sum(tile.dz, axis=0, keepdims=True)

    if tile.keep is None:
        accumulate()
    else:
        pl.when(tile.keep)(accumulate)


# ---------------------------------------------------------- GPU: one program loops over the rest


def _gpu_block(ref, name, *, r0, c0, bn, bv, num_rows, num_classes, vd):
    row_axis, col_axis = _axes(name, ref.shape, num_rows, num_classes, vd)
    index = tuple(
        pl.ds(r0, bn) if a == row_axis else pl.ds(c0, bv) if a == col_axis else slice(None)
        for a in range(2)
    )
    return ref[index]


def _gpu_tiles(refs: dict, options, *, r0, c0, bn, bv, num_rows, num_classes, vd) -> _Tiles:
    """Loads the blocks at ``(r0, c0)``. Starts are moved back to end inside the arrays, so
    nothing is padded and the cleaning of `_Tiles` is a no-op here."""
    geometry = dict(bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd)
    blocks = {k: _gpu_block(r, k, r0=r0, c0=c0, **geometry) for k, r in refs.items()}
    return _Tiles(blocks, options, row0=r0, col0=c0, **geometry)


def _gpu_call(kernel, ops, out_shape, grid, *, name, interpret):
    from jax.experimental.pallas import triton as pltriton

    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=bool(interpret),
        name=name,
    )(*ops.values())


def _forward_gpu_kernel(*refs, names, treedef, options, bn, bv, num_rows, num_classes, vd):
    """One program per row block, looping over vocabulary blocks."""
    ins = dict(zip(names, refs, strict=False))
    out_refs = refs[len(names) :]
    r0 = jnp.minimum(pl.program_id(0) * bn, num_rows - bn)
    geometry = dict(bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd)

    def vocab_block(j, state):
        c0 = jnp.minimum(j * bv, num_classes - bv)
        tiles = _gpu_tiles(ins, options, r0=r0, c0=c0, **geometry)
        return _forward_block(
            state, tiles, col0=c0, lo=j * bv, num_classes=num_classes, vd=vd, options=options
        )

    init = row_state_init(bn, out_refs[0].dtype, len(out_refs) > 4)
    state = jax.lax.fori_loop(0, pl.cdiv(num_classes, bv), vocab_block, init)
    for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
        ref[pl.ds(r0, bn), :] = value
    del treedef


def _inputs_grad_gpu_kernel(*refs, names, options, bn, bv, num_rows, num_classes, vd, eps):
    """One program per row block, looping over vocabulary blocks: ``d_inputs``."""
    ins = dict(zip(names, refs, strict=False))
    dx_ref, *t_ref = refs[len(names) :]
    r0 = jnp.minimum(pl.program_id(0) * bn, num_rows - bn)
    geometry = dict(bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd)

    def vocab_block(j, carry):
        dx, t_row = carry
        c0 = jnp.minimum(j * bv, num_classes - bv)
        tiles = _gpu_tiles(ins, options, r0=r0, c0=c0, **geometry)
        tile = _backward_block(
            tiles,
            col0=c0,
            lo=j * bv,
            num_classes=num_classes,
            vd=vd,
            options=options,
            filter_eps=eps,
            array_t=bool(t_ref),
        )
        if t_ref:
            t_row = t_row + tile.temperature_row
        if tile.keep is None:
            return dx + input_grad(tile.dz, tiles.w, vd=vd), t_row
        dx = jax.lax.cond(
            tile.keep, lambda d: d + input_grad(tile.dz, tiles.w, vd=vd), lambda d: d, dx
        )
        return dx, t_row

    dtype = dx_ref.dtype
    init = (jnp.zeros((bn, dx_ref.shape[1]), dtype), jnp.zeros((bn, 1), dtype))
    dx, t_row = jax.lax.fori_loop(0, pl.cdiv(num_classes, bv), vocab_block, init)
    dx_ref[pl.ds(r0, bn), :] = dx
    for ref in t_ref:
        ref[pl.ds(r0, bn), :] = t_row


def _weight_grad_gpu_kernel(*refs, names, options, bn, bv, num_rows, num_classes, vd, eps):
    """One program per vocabulary block, looping over row blocks: ``d_weight`` and ``d_bias``."""
    ins = dict(zip(names, refs, strict=False))
    dw_ref, *db_ref = refs[len(names) :]
    c0 = jnp.minimum(pl.program_id(0) * bv, num_classes - bv)
    geometry = dict(bn=bn, bv=bv, num_rows=num_rows, num_classes=num_classes, vd=vd)

    def row_block(i, carry):
        dw, db = carry
        r0 = jnp.minimum(i * bn, num_rows - bn)
        tiles = _gpu_tiles(ins, options, r0=r0, c0=c0, **geometry)
        fresh = rows_ok(r0, i * bn, bn, num_rows)
        tiles.blocks["cotangent"] = jnp.where(fresh, tiles.blocks["cotangent"], 0)
        tile = _backward_block(
            tiles,
            col0=c0,
            lo=c0,
            num_classes=num_classes,
            vd=vd,
            options=options,
            filter_eps=eps,
            array_t=False,
        )

        def accumulate(acc):
            dw, db = acc
            return dw + weight_grad(tiles.x, tile.dz, vd=vd), db + jnp.sum(
                tile.dz, 0, keepdims=True
            )

        if tile.keep is None:
            return accumulate((dw, db))
        return jax.lax.cond(tile.keep, accumulate, lambda a: a, (dw, db))

    dtype = dw_ref.dtype
    d = dw_ref.shape[1] if vd else dw_ref.shape[0]
    init = (jnp.zeros((bv, d) if vd else (d, bv), dtype), jnp.zeros((1, bv), dtype))
    dw, db = jax.lax.fori_loop(0, pl.cdiv(num_rows, bn), row_block, init)
    if vd:
        dw_ref[pl.ds(c0, bv), :] = dw
    else:
        dw_ref[:, pl.ds(c0, bv)] = dw
    for ref in db_ref:
        ref[:, pl.ds(c0, bv)] = db


# ------------------------------------------------------------------------------ entry points


def _power_of_two_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1)


def _geometry(config, problem):
    """``(bn, bv)`` for the schedule: clipped to the arrays, powers of two on GPU (Triton)."""
    n, d = problem.inputs.shape
    v = config.num_classes
    bn, bv = config.block_sizes.block_n, config.block_sizes.block_v
    if config.pallas_backend == "gpu":
        if d & (d - 1):
            raise NotImplementedError(
                f"the GPU (Triton) schedule of the fused kernel needs a power-of-two hidden size, "
                f"got inputs shape {problem.inputs.shape}"
            )
        return min(_power_of_two_floor(bn), _power_of_two_floor(n)), min(
            _power_of_two_floor(bv), _power_of_two_floor(v)
        )
    return min(bn, n), min(bv, v)


def forward_pallas(options, config, problem, rows) -> RowState:
    """The forward kernel: ``RowState`` of ``[N, 1]`` accumulators (see `forward_tile`)."""
    n = problem.inputs.shape[0]
    v = config.num_classes
    bn, bv = _geometry(config, problem)
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    smoothing = bool(options.label_smoothing)
    ops = _operands(problem, rows)
    treedef = _state_treedef(dtype, smoothing)
    n_out = treedef.num_leaves
    out_shape = [jax.ShapeDtypeStruct((n, 1), dtype)] * n_out
    statics = dict(
        names=tuple(ops),
        treedef=treedef,
        options=options,
        bn=bn,
        bv=bv,
        num_rows=n,
        num_classes=v,
        vd=config.vd,
    )
    if config.pallas_backend == "tpu":
        in_specs = _tpu_specs(
            ops, lambda i, j: (i, j), bn=bn, bv=bv, num_rows=n, num_classes=v, vd=config.vd
        )
        out_specs = [pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] * n_out
        grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
        kernel = functools.partial(_forward_tpu_kernel, **statics)
        out = _tpu_call(
            kernel,
            ops,
            in_specs,
            out_shape,
            out_specs,
            grid,
            name="linear_ce_forward",
            interpret=config.interpret,
        )
    else:
        kernel = functools.partial(_forward_gpu_kernel, **statics)
        out = _gpu_call(
            kernel,
            ops,
            out_shape,
            (pl.cdiv(n, bn),),
            name="linear_ce_forward",
            interpret=config.interpret,
        )
    return jax.tree.unflatten(treedef, out)


def backward_pallas(options, config, problem, rows, lse, cotangent):
    """The two backward kernels: ``(d_inputs, d_weight, d_bias, temperature_sum)``, the
    gradients in the accumulation dtype."""
    n, d = problem.inputs.shape
    v = config.num_classes
    bn, bv = _geometry(config, problem)
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    ops = _operands(problem, rows, lse=lse, cotangent=cotangent)
    array_t = problem.temperature is not None
    has_bias = problem.bias is not None
    statics = dict(
        names=tuple(ops),
        options=options,
        bn=bn,
        bv=bv,
        num_rows=n,
        num_classes=v,
        vd=config.vd,
        eps=config.filter_eps,
    )
    dx_shape = [jax.ShapeDtypeStruct((n, d), dtype)]
    dx_shape += [jax.ShapeDtypeStruct((n, 1), dtype)] if array_t else []
    dw_shape = [jax.ShapeDtypeStruct(problem.weight.shape, dtype)]
    dw_shape += [jax.ShapeDtypeStruct((1, v), dtype)] if has_bias else []
    geometry = dict(bn=bn, bv=bv, num_rows=n, num_classes=v, vd=config.vd)
    if config.pallas_backend == "tpu":
        rows_first = _tpu_specs(ops, lambda i, j: (i, j), **geometry)
        dx_specs = [pl.BlockSpec((bn, d), lambda i, j: (i, 0))]
        dx_specs += [pl.BlockSpec((bn, 1), lambda i, j: (i, 0))] if array_t else []
        dx_out = _tpu_call(
            functools.partial(_inputs_grad_tpu_kernel, **statics),
            ops,
            rows_first,
            dx_shape,
            dx_specs,
            (pl.cdiv(n, bn), pl.cdiv(v, bv)),
            name="linear_ce_inputs_grad",
            interpret=config.interpret,
        )
        cols_first = _tpu_specs(ops, lambda j, i: (i, j), **geometry)
        if config.vd:
            dw_specs = [pl.BlockSpec((bv, d), lambda j, i: (j, 0))]
        else:
            dw_specs = [pl.BlockSpec((d, bv), lambda j, i: (0, j))]
        dw_specs += [pl.BlockSpec((1, bv), lambda j, i: (0, j))] if has_bias else []
        dw_out = _tpu_call(
            functools.partial(_weight_grad_tpu_kernel, **statics),
            ops,
            cols_first,
            dw_shape,
            dw_specs,
            (pl.cdiv(v, bv), pl.cdiv(n, bn)),
            name="linear_ce_weight_grad",
            interpret=config.interpret,
        )
    else:
        dx_out = _gpu_call(
            functools.partial(_inputs_grad_gpu_kernel, **statics),
            ops,
            dx_shape,
            (pl.cdiv(n, bn),),
            name="linear_ce_inputs_grad",
            interpret=config.interpret,
        )
        if not has_bias:
            dw_shape = [*dw_shape, jax.ShapeDtypeStruct((1, v), dtype)]
        dw_out = _gpu_call(
            functools.partial(_weight_grad_gpu_kernel, **statics),
            ops,
            dw_shape,
            (pl.cdiv(v, bv),),
            name="linear_ce_weight_grad",
            interpret=config.interpret,
        )
    t_sum = jnp.sum(dx_out[1]) if array_t else jnp.zeros((), dtype)
    db = dw_out[1][0] if has_bias else None
    return dx_out[0], dw_out[0], db, t_sum
