"""The fused linear softmax cross-entropy: its tile steps and its Pallas kernels.

A tile is one ``[block_n, block_v]`` block of logits ``z = x W (+ b)``, formed by a matmul (on
GPU, a sum of matmuls over chunks of ``D``) from a ``[block_n, D]`` block of inputs and a
``[D, block_v]`` block of the projection (``[block_v, D]`` in the tied ``"vd"`` layout,
contracted without a transposed copy). The tile steps below turn one such block into the online
log-sum-exp and target updates (forward) or into the gradient block (backward). They are
compositions of `kernels._tile` and they are called both by the XLA loops of
`jax_softmax_ce.linear` and by the Pallas kernel bodies here, so the math exists once.

Kernels (``implementation="pallas"``), two schedules of the same tile steps:

- TPU (Mosaic): a grid ``(row blocks, vocabulary blocks, hidden chunks)`` whose last two axes are
  reductions. Each tile's logits are summed over ``block_d`` chunks of ``D`` into a float32 VMEM
  scratch, so no block spans the hidden size: a whole ``[block_n, D]`` block of inputs and
  ``[D, block_v]`` block of the projection, double-buffered, would take 12 MiB of VMEM at
  ``D = 4096`` in bf16 with the default tiles, and their float32 gradient blocks 8 or 16 MiB more,
  against the 16 MiB that a kernel may use by default. The forward kernel keeps its running
  ``(m, s)`` and target sums in the ``[block_n, 1]`` output blocks, which stay resident while the
  vocabulary and chunk indices move. The backward is two kernels, as in flash attention:
  ``d_inputs`` on the same grid, and ``d_weight``/``d_bias`` on the transposed grid
  ``(vocab blocks, row blocks, ...)``, each recomputing its tiles from the saved ``lse``. Their
  chunk axis has two phases: the first forms the logits and then the gradient tile, the second
  walks the chunks again and adds ``dz W_chunkᵀ`` (or ``x_chunkᵀ dz``) into a float32 VMEM
  accumulator of ``[block_n, D]`` (or ``[D, block_v]``), written out chunk by chunk during the last
  reduction step; the projection (or input) chunks are read twice per tile for that. The matmul is
  ``jax.lax.dot_general`` (``jnp.dot``) with float32 accumulation. Each kernel's VMEM need is
  estimated from its blocks (`_tpu_vmem_limit`) and passed as its limit when it exceeds the
  default; at ``D = 4096`` the ``d_weight`` kernel's accumulator alone is 8 MiB.
- GPU: the Triton backend, chosen explicitly with ``pallas.triton.CompilerParams``. Mosaic GPU, the
  default GPU backend from jax 0.11, lowers no ``dot_general``: a matmul there has to be an
  ``plgpu.wgmma`` over shared-memory references fed by a TMA pipeline, which is a different kernel,
  with a different entry point on jax 0.10 and 0.11. It could be lowered from a CPU host and run in
  Pallas' Mosaic GPU interpreter, but whether it beats this one can only be measured on a GPU,
  which no session has had yet. Triton lowers ``jnp.dot`` to ``tl.dot`` (tensor cores), and is
  available in jax 0.10 and, deprecated but present (a ``DeprecationWarning`` at each lowering), in
  0.11; the reasons are spelled out in `kernels.cross_entropy_gpu`. Triton holds a kernel's values
  in registers and shared memory, so no block may span the hidden size (a ``[D, block_v]`` block of
  the projection at ``D = 4096`` and ``block_v = 512`` holds 2**21 elements, past Triton's limit of
  2**20, let alone what registers hold): every tile is formed as a loop over ``block_d`` chunks of
  ``D``, each a ``tl.dot`` of a ``[block_n, block_d]`` block of inputs and a ``[block_d, block_v]``
  block of the projection, as Cut Cross-Entropy does. Loads are masked, so ``N``, ``D`` and ``V``
  are arbitrary; tiles are powers of two of at least 16 (``tl.dot``'s minimum). The forward is one
  program per row block, looping over vocabulary blocks with the running log-sum-exp in registers.
  The backward is one kernel over ``(row blocks, vocabulary blocks)``, all parallel: each program
  recomputes its tile, forms the gradient tile, and adds ``dz W_blockᵀ`` and ``x_blockᵀ dz`` chunk
  by chunk of ``D`` into float32 ``d_inputs`` and ``d_weight`` with atomic adds (``d_bias`` and the
  temperature rows too). Their float32 accumulators are ``O(N D + D V)``, the bound the fused loss
  allows; atomic float adds make the GPU gradients non-deterministic in their last bits. The
  accumulators are padded to whole blocks because Pallas' interpreter has no masked atomic add.

Both schedules are verified in interpret mode on CPU, and lowered for their real backends from a
CPU host at ``N=16384, D=4096, V=128256``, where the tests check that no tensor of the Triton
modules exceeds one logits tile, and that the VMEM buffers of the Mosaic kernels fit their
limits; neither has been compiled for, or timed on, a real TPU or GPU yet. Block sizes are
reasoned, not tuned.

Gradient filtering (Cut Cross-Entropy): with ``filter_eps > 0`` the backward skips the two
gradient matmuls of every tile in which all ``|dl/dz'|`` (before the cotangent) are below
``filter_eps``; the tile's logits are still recomputed, since they are what decides.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax_softmax_ce.kernels import _blocks, _tile
from jax_softmax_ce.kernels._tile import RowState, row_state_init
from jax_softmax_ce.kernels.cross_entropy_gpu import from_zero


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows (tokens), columns (vocabulary) and hidden chunk of one logits tile.

    Attributes:
      block_n: rows per tile; clipped to the number of rows except on GPU.
      block_v: vocabulary entries per tile; clipped to the vocabulary size except on GPU.
      block_d: hidden entries per matmul step of the Pallas schedules, which form each tile as
        a sum over ``block_d`` chunks of ``D`` so that no block spans the hidden size; clipped
        to ``D`` except on GPU. The XLA loops contract all of ``D`` at once and ignore it.
    """

    block_n: int = 1024
    block_v: int = 1024
    block_d: int = 128

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(cls, implementation: str = "xla", platform: str | None = None) -> BlockSizes:
        """Defaults: large tiles for XLA; for ``"pallas"``, ``(256, 512)`` tiles in 512-wide
        hidden chunks on TPU (multiples of the ``(8, 128)`` tiling, and of the MXU's 128 or
        256) and ``(64, 128)`` tiles in 64-wide hidden chunks on GPU (Triton matmul tiles).
        Reasoned, not yet tuned on either device."""
        if implementation == "xla":
            return cls(1024, 2048)
        if platform == "gpu":
            return cls(64, 128, 64)
        return cls(256, 512, 512)


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


def hidden_ok(k0, cols: int, hidden: int) -> jax.Array:
    """``[1, cols]`` bool: hidden indices ``k0 + k`` inside ``[0, hidden)``, the chunk of ``D``
    that a schedule forming its tiles chunk by chunk reads at ``k0``."""
    return k0 + jax.lax.broadcasted_iota(jnp.int32, (1, cols), 1) < hidden


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


class TargetTile(NamedTuple):
    """One tile's transformed logits and target weights, as both passes need them."""

    z: jax.Array  # [rows, cols] z' = softcap(z) / T, -inf where invalid
    target: jax.Array  # [rows, cols] w_t on the label's column, 0 elsewhere
    smoothing: jax.Array | None  # [rows, cols] class weights on valid columns (smoothing only)


def target_tile(
    z_raw,
    labels,
    label_weight,
    where,
    class_weights,
    temperature,
    *,
    col0,
    lo,
    num_classes: int,
    options,
) -> TargetTile:
    """The transformed tile of raw logits ``z_raw`` (`logits_tile`) for columns
    ``col0 + [0, cols)``, and its target weights. Columns below ``lo`` or at or above
    ``num_classes`` are ignored; ``where`` is None or a bool block broadcastable to the tile;
    ``temperature`` a float or a ``[1, 1]`` array."""
    ok = columns_ok(col0, lo, z_raw.shape[1], num_classes)
    valid = ok if where is None else ok & where
    z = _tile.masked_transform(z_raw, valid, softcap=options.logit_softcap, temperature=temperature)
    target = _tile.label_target(labels, label_weight, col0, ok)
    smooth = None
    if options.label_smoothing:
        smooth = _tile.smoothing_weights(valid, class_weights, z.dtype)
    return TargetTile(z, target, smooth)


def forward_tile(state: RowState, tile: TargetTile) -> RowState:
    """One forward step: ``tile`` (`target_tile`) merged into the running ``state``."""
    return forward_step(state, tile.z, tile.target, tile.smoothing)


class TileGrad(NamedTuple):
    """The backward of one tile."""

    dz: jax.Array  # [rows, cols] dl/dz (raw logits), times the cotangent; 0 on ignored entries
    keep: jax.Array | None  # scalar bool from the gradient filter, None without filtering
    temperature_row: jax.Array | None  # [rows, 1] sum_k g_k (z'_k - lse), for an array T


def backward_tile(
    z_raw,
    tile: TargetTile,
    n_valid,
    total_weight,
    lse,
    cotangent,
    temperature,
    *,
    options,
    filter_eps: float,
    array_temperature: bool,
) -> TileGrad:
    """The gradient of the raw logits tile ``z_raw``, recomputed in the backward pass, whose
    `target_tile` is ``tile``. Per-row operands are ``[rows, 1]``; rows with a zero ``cotangent``
    (those that do not count, or padding) get a zero gradient."""
    a = _tile.mix(options.label_smoothing, n_valid, tile.target, tile.smoothing)
    g = _tile.grad_block(tile.z, lse, total_weight, a, z_loss=options.z_loss)
    live = cotangent != 0
    g = jnp.where(live, g, 0)
    keep = keep_tile(g, filter_eps) if filter_eps else None
    g = jnp.where(live, g * cotangent, 0)
    t_row = _tile.temperature_term(tile.z, g, lse) if array_temperature else None
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
_MATMUL_OPERANDS = ("x", "w")


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """The static shape of a schedule: tile sizes, array extents and the weight layout."""

    bn: int
    bv: int
    bd: int
    num_rows: int
    num_classes: int
    hidden: int
    vd: bool

    @classmethod
    def of(cls, config, problem) -> _Geometry:
        """TPU tiles are clipped to the arrays, and their ragged last blocks padded by Pallas;
        compiled (not interpreted), they must respect Mosaic's ``(8, 128)`` tiling. GPU tiles
        are taken as given and their ragged ends masked, since Triton's ``dot`` needs
        power-of-two tiles of at least 16 in every dimension."""
        n, d = problem.inputs.shape
        v = config.num_classes
        blocks = config.block_sizes
        if config.pallas_backend == "gpu":
            sizes = (blocks.block_n, blocks.block_v, blocks.block_d)
            if any(b < 16 or b & (b - 1) for b in sizes):
                raise NotImplementedError(
                    f"the GPU (Triton) schedule of the fused kernel needs block sizes that are "
                    f"powers of two of at least 16 (Triton's dot), got {blocks}"
                )
            return cls(*sizes, n, v, d, config.vd)
        sizes = (min(blocks.block_n, n), min(blocks.block_v, v), min(blocks.block_d, d))
        tiling = ((sizes[0], n, 8), (sizes[1], v, 128), (sizes[2], d, 128))
        if not config.interpret and any(b % t and b != size for b, size, t in tiling):
            raise NotImplementedError(
                f"the TPU (Mosaic) schedule of the fused kernel needs block_n a multiple of 8 "
                f"and block_v, block_d multiples of 128, or each the whole axis (N={n}, V={v}, "
                f"D={d}), got {blocks}"
            )
        return cls(*sizes, n, v, d, config.vd)

    @property
    def chunks(self) -> int:
        """The number of ``bd`` chunks of the hidden size."""
        return pl.cdiv(self.hidden, self.bd)

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


def _operands(problem, rows, lse=None, cotangent=None) -> dict:
    """The kernel operands of a problem: 2-D arrays, ``where`` as int8, absent ones left out;
    inside ``shard_map`` all varying over the same axes, so that the outputs can be typed like
    ``x``."""
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
    return dict(zip(ops, _blocks.vary_alike(list(ops.values())), strict=True))


class _Tiles:
    """The blocks of the operands other than ``x`` and ``w`` for one tile at rows
    ``row0 + [0, bn)`` and columns ``col0 + [0, bv)``, and the tile steps on the raw logits that
    a schedule forms from ``x`` and ``w``. Rows at or past ``num_rows`` and columns at or past
    ``num_classes`` of a ragged block may hold garbage (NaN in interpret mode), so the bias, the
    lse and the cotangent are zeroed there."""

    def __init__(self, blocks: dict, options, geo: _Geometry, *, row0, col0):
        self.options, self.geo, self.col0 = options, geo, col0
        self.row_ok = rows_ok(row0, row0, geo.bn, geo.num_rows)
        self.col_ok = columns_ok(col0, col0, geo.bv, geo.num_classes)
        get = blocks.get
        self.bias = None if get("bias") is None else jnp.where(self.col_ok, get("bias"), 0)
        self.where = None if get("where") is None else get("where") != 0
        t = get("temperature")
        self.temperature = self.options.temperature if t is None else t
        self.blocks = blocks

    def row(self, name):
        value = self.blocks[name]
        if name in ("cotangent", "lse"):
            value = jnp.where(self.row_ok, value, jnp.zeros((), value.dtype))
        return value

    def target(self, z_raw, *, lo) -> TargetTile:
        """`target_tile` of the raw logits ``z_raw``; columns below ``lo`` are ignored."""
        return target_tile(
            z_raw,
            self.row("labels"),
            self.row("label_weight"),
            self.where,
            self.blocks.get("class_weights"),
            self.temperature,
            col0=self.col0,
            lo=lo,
            num_classes=self.geo.num_classes,
            options=self.options,
        )

    def backward(self, z_raw, *, lo, filter_eps: float, array_t: bool) -> TileGrad:
        """`backward_tile` of the raw logits ``z_raw``; columns below ``lo`` are ignored."""
        return backward_tile(
            z_raw,
            self.target(z_raw, lo=lo),
            self.row("n_valid"),
            self.row("total_weight"),
            self.row("lse"),
            self.row("cotangent"),
            self.temperature,
            options=self.options,
            filter_eps=filter_eps,
            array_temperature=array_t,
        )


def _state_treedef(dtype, smoothing: bool):
    return jax.tree.structure(row_state_init(1, dtype, smoothing))


def _split_refs(refs, names):
    """The input refs as a dict by name, and the output refs."""
    return dict(zip(names, refs, strict=False)), refs[len(names) :]


def _run_if_kept(keep, accumulate):
    """Runs ``accumulate`` (a side effect on refs) unless the gradient filter dropped the tile."""
    if keep is None:
        accumulate()
    else:
        pl.when(keep)(accumulate)


def _pallas_call(config, kernel, ops: dict, out_shape, grid, *, name, **specs):
    """``pallas_call`` for the configured backend; ``specs`` are the TPU BlockSpecs and scratch,
    or the GPU kernels' ``input_output_aliases``."""
    if config.pallas_backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params = pltpu.CompilerParams(
            dimension_semantics=("parallel",) + ("arbitrary",) * (len(grid) - 1),
            vmem_limit_bytes=_tpu_vmem_limit(ops, out_shape, **specs),
        )
        from jax_softmax_ce.kernels.cross_entropy_tpu import interpret_params

        interpret = interpret_params() if config.interpret else False
    else:
        blocks = config.block_sizes
        num_warps = 8 if blocks.block_n * blocks.block_v >= 128 * 128 else 4
        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=3)
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


# The smallest default scoped VMEM limit of a TPU core (v4, v5e); v6e's is 32 MiB. VMEM itself
# holds 16 MiB (v4), 64 MiB (v5p, v7x) or 128 MiB (v5e, v6e) per core.
_SCOPED_VMEM_BYTES = 16 * 2**20
# Room for the tile step's values, in float32 logits tiles (z', p, g, dz and masks).
_TILE_TEMPORARIES = 6


def _vmem_bytes(shape, dtype) -> int:
    """The VMEM footprint of one buffer: its last two axes padded to Mosaic's tiling,
    ``(8 * values per 32-bit word, 128)``."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = (1, *shape) if len(shape) == 1 else tuple(shape)
    sublanes = 8 * max(4 // itemsize, 1)
    rows, cols = -(-shape[-2] // sublanes) * sublanes, -(-shape[-1] // 128) * 128
    return math.prod(shape[:-2]) * rows * cols * itemsize


def _tpu_vmem_limit(ops: dict, out_shape, *, in_specs, out_specs, scratch_shapes) -> int | None:
    """An estimate of a TPU kernel's VMEM: two buffers (the pipeline's double buffering) of
    every input and output block, the scratch, and `_TILE_TEMPORARIES` float32 logits tiles.
    None (the compiler's default limit) when it fits in `_SCOPED_VMEM_BYTES`, else the estimate
    plus a quarter, rounded up to a MiB. Derived from the block shapes, not measured on a TPU."""
    from jax.experimental.pallas import tpu as pltpu

    blocks = [(s.block_shape, a.dtype) for s, a in zip(in_specs, ops.values(), strict=True)]
    blocks += [(s.block_shape, a.dtype) for s, a in zip(out_specs, out_shape, strict=True)]
    need = 2 * sum(_vmem_bytes(shape, dtype) for shape, dtype in blocks)
    tile = scratch_shapes[0]  # every schedule's first scratch is its logits tile
    vmem = [s for s in scratch_shapes if s.memory_space == pltpu.VMEM]
    need += sum(_vmem_bytes(s.shape, s.dtype) for s in vmem)
    need += _TILE_TEMPORARIES * _vmem_bytes(tile.shape, jnp.float32)
    if need <= _SCOPED_VMEM_BYTES:
        return None
    return -(-(need * 5 // 4) // 2**20) * 2**20


# ------------------------------------------------ TPU: a grid over hidden chunks, VMEM scratch


def _tpu_specs(ops: dict, grid_to_blocks, geo: _Geometry):
    """BlockSpecs of the operands for a grid whose indices map to ``(row block, column block,
    hidden chunk of x, hidden chunk of w)``."""

    def block_and_index(name, shape):
        if name == "x":
            return (geo.bn, geo.bd), lambda r, c, kx, kw: (r, kx)
        if name == "w" and geo.vd:
            return (geo.bv, geo.bd), lambda r, c, kx, kw: (c, kw)
        if name == "w":
            return (geo.bd, geo.bv), lambda r, c, kx, kw: (kw, c)
        row_axis, col_axis = geo.axes(name, shape)
        axes = tuple("r" if a == row_axis else "c" if a == col_axis else None for a in range(2))
        block = tuple({"r": geo.bn, "c": geo.bv}.get(a, shape[n]) for n, a in enumerate(axes))

        def index(r, c, kx, kw):
            return tuple({"r": r, "c": c}.get(a, 0) for a in axes)

        return block, index

    specs = []
    for name, value in ops.items():
        block, index = block_and_index(name, value.shape)
        specs.append(pl.BlockSpec(block, lambda *grid, index=index: index(*grid_to_blocks(*grid))))
    return specs


class _TpuTile:
    """The tile at grid position (row block ``i``, vocabulary block ``j``). Its raw logits are
    summed over the hidden chunks that the grid's last axis walks, into a float32 VMEM scratch,
    so that no block spans ``D``. Padding of a ragged block (rows, columns or hidden entries
    past the arrays) holds garbage, NaN in interpret mode, so ``x`` and ``w`` are zeroed there."""

    def __init__(self, ins: dict, options, geo: _Geometry, *, i, j):
        self.ins, self.options, self.geo = ins, options, geo
        self.row0, self.col0 = i * geo.bn, j * geo.bv
        self.row_ok = rows_ok(self.row0, self.row0, geo.bn, geo.num_rows)  # [bn, 1]
        self.col_ok = columns_ok(self.col0, self.col0, geo.bv, geo.num_classes)  # [1, bv]

    def x(self, k):
        """``[bn, bd]``: hidden chunk ``k`` of the row block of ``x``."""
        ok = self.row_ok & hidden_ok(k * self.geo.bd, self.geo.bd, self.geo.hidden)
        x = self.ins["x"][...]
        return jnp.where(ok, x, jnp.zeros((), x.dtype))

    def w(self, k):
        """``[bd, bv]`` (``[bv, bd]`` when vd): hidden chunk ``k`` of the column block of ``w``."""
        hid = hidden_ok(k * self.geo.bd, self.geo.bd, self.geo.hidden)
        ok = self.col_ok.T & hid if self.geo.vd else hid.T & self.col_ok
        w = self.ins["w"][...]
        return jnp.where(ok, w, jnp.zeros((), w.dtype))

    def add_logits(self, z_ref, k):
        """``z_ref`` becomes the sum over hidden chunks ``0..k`` of ``x_k w_k``."""
        part = logits_tile(self.x(k), self.w(k), None, vd=self.geo.vd)

        @pl.when(k == 0)
        def _first():
            z_ref[...] = part

        @pl.when(k > 0)
        def _next():
            z_ref[...] += part

    def tiles(self) -> _Tiles:
        """The tile's other operands, read once its logits are complete."""
        others = {k: r[...] for k, r in self.ins.items() if k not in _MATMUL_OPERANDS}
        return _Tiles(others, self.options, self.geo, row0=self.row0, col0=self.col0)

    @staticmethod
    def logits(z_ref, tiles: _Tiles):
        """The raw logits ``x W (+ b)`` of the tile, from the completed sum in ``z_ref``."""
        z = z_ref[...]
        return z if tiles.bias is None else z + tiles.bias.astype(z.dtype)


def _forward_tpu_kernel(*refs, names, treedef, options, geo):
    """Grid ``(row blocks, vocabulary blocks, hidden chunks)``; the running log-sum-exp and
    target sums stay in the ``[bn, 1]`` output blocks while the last two indices move."""
    i, j, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ins, (*out_refs, z_ref) = _split_refs(refs, names)
    tile = _TpuTile(ins, options, geo, i=i, j=j)

    @pl.when((j == 0) & (k == 0))
    def _init():
        init = row_state_init(geo.bn, out_refs[0].dtype, len(out_refs) > 4)
        for ref, value in zip(out_refs, jax.tree.leaves(init), strict=True):
            ref[...] = value

    tile.add_logits(z_ref, k)

    @pl.when(k == geo.chunks - 1)
    def _merge():
        tiles = tile.tiles()
        state = jax.tree.unflatten(treedef, [r[...] for r in out_refs])
        state = forward_tile(state, tiles.target(tile.logits(z_ref, tiles), lo=tile.col0))
        for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
            ref[...] = value


def _backward_tpu_kernel(*refs, names, options, geo, eps, wrt: str, n_extra: int):
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
    ins, (out_ref, *rest) = _split_refs(refs, names)
    extra, (z_ref, dz_ref, acc_ref, *keep_ref) = rest[:n_extra], rest[n_extra:]
    tile = _TpuTile(ins, options, geo, i=i, j=j)

    @pl.when(first & (step == 0))
    def _init():
        for ref in (acc_ref, *extra):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    @pl.when(step < chunks)
    def _logits():
        tile.add_logits(z_ref, step)

    @pl.when(step == chunks - 1)
    def _gradient():
        tiles = tile.tiles()
        array_t = wrt == "inputs" and bool(extra)
        grad = tiles.backward(
            tile.logits(z_ref, tiles), lo=tile.col0, filter_eps=eps, array_t=array_t
        )
        dz_ref[...] = grad.dz
        if keep_ref:
            keep_ref[0][0] = grad.keep.astype(jnp.int32)
        if wrt == "inputs":
            for ref in extra:
                ref[...] += grad.temperature_row
        else:
            _run_if_kept(grad.keep, lambda: _add_bias_grad(extra, grad.dz))

    @pl.when(step >= chunks)
    def _accumulate():
        k = step - chunks
        start = pl.multiple_of(k * geo.bd, geo.bd)
        acc = acc_ref.at[_chunk_index(wrt, geo, pl.ds(start, geo.bd))]
        dz = dz_ref[...]

        def add():
            if wrt == "inputs":
                acc[...] += input_grad(dz, tile.w(k), vd=geo.vd)
            else:
                acc[...] += weight_grad(tile.x(k), dz, vd=geo.vd)

        _run_if_kept(keep_ref[0][0] != 0 if keep_ref else None, add)

        @pl.when(last)
        def _write():
            out_ref[...] = acc[...]


def _add_bias_grad(db_refs, dz):
    for ref in db_refs:
        ref[...] += jnp.sum(dz, axis=0, keepdims=True)


def _chunk_index(wrt: str, geo: _Geometry, hidden):
    """The index of hidden chunk ``hidden`` (a slice) in a backward accumulator: columns of
    ``d_inputs`` ``[bn, D]``, rows of ``d_weight`` ``[D, bv]``, columns of ``[bv, D]`` (vd)."""
    if wrt == "inputs" or geo.vd:
        return slice(None), hidden
    return hidden, slice(None)


# ------------------------------------------------- GPU: masked loads, hidden chunks, atomic adds


def _loop(n: int, body, init):
    """``fori_loop`` over ``[0, n)`` with an int32 index."""
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(n), body, init)


class _GpuTile:
    """The tile at rows ``r0 + [0, bn)`` and columns ``c0 + [0, bv)``, read from whole-array
    refs with masked loads (out-of-range entries read as 0), its raw logits formed in
    ``block_d`` chunks of the hidden size, so that no block of ``x`` or ``w`` spans the whole of
    ``D``. Program ids are read once at the top of a kernel and passed in (the interpreter
    substitutes them only there, not inside a loop body)."""

    def __init__(self, ins: dict, options, geo: _Geometry, *, r0, c0):
        self.ins, self.geo, self.r0, self.c0 = ins, geo, r0, c0
        self.rows, self.cols = pl.ds(r0, geo.bn), pl.ds(c0, geo.bv)
        self.row_ok = rows_ok(r0, r0, geo.bn, geo.num_rows)  # [bn, 1]
        self.col_ok = columns_ok(c0, c0, geo.bv, geo.num_classes)  # [1, bv]
        others = {k: self._load(k) for k in ins if k not in _MATMUL_OPERANDS}
        self.tiles = _Tiles(others, options, geo, row0=r0, col0=c0)

    def _load(self, name):
        ref = self.ins[name]
        row_axis, col_axis = self.geo.axes(name, ref.shape)
        if row_axis is None and col_axis is None:
            return ref[...]
        masks = [m for m, on in ((self.row_ok, row_axis == 0), (self.col_ok, col_axis == 1)) if on]
        ok = functools.reduce(jnp.logical_and, masks)
        index = (
            self.rows if row_axis == 0 else from_zero(ref.shape[0]),
            self.cols if col_axis == 1 else from_zero(ref.shape[1]),
        )
        return pltriton.load(ref.at[index], mask=ok, other=0)

    def hidden(self, k0):
        """``[1, bd]`` bool: hidden indices ``k0 + [0, bd)`` inside ``D``, and their slice."""
        return hidden_ok(k0, self.geo.bd, self.geo.hidden), pl.ds(k0, self.geo.bd)

    def x_chunk(self, k0):
        """``[bn, bd]`` of ``x``."""
        ok, ks = self.hidden(k0)
        mask = self.row_ok & ok
        return pltriton.load(self.ins["x"].at[self.rows, ks], mask=mask, other=0)

    def w_chunk(self, k0):
        """``[bd, bv]`` of ``w`` (``[bv, bd]`` when vd)."""
        ok, ks = self.hidden(k0)
        if self.geo.vd:
            index, mask = (self.cols, ks), self.col_ok.T & ok
        else:
            index, mask = (ks, self.cols), ok.T & self.col_ok
        return pltriton.load(self.ins["w"].at[index], mask=mask, other=0)

    def over_hidden(self, body, init):
        """``body(k0, carry)`` over the hidden chunks ``k0 = 0, bd, 2 bd, ...``."""
        bd = self.geo.bd
        return _loop(pl.cdiv(self.geo.hidden, bd), lambda k, carry: body(k * bd, carry), init)

    def logits(self):
        """``[bn, bv]`` raw logits ``x W (+ b)`` in the accumulation dtype."""
        dtype = _tile.accumulation_dtype(self.ins["x"].dtype)

        def chunk(k0, z):
            return z + logits_tile(self.x_chunk(k0), self.w_chunk(k0), None, vd=self.geo.vd)

        z = self.over_hidden(chunk, jnp.zeros((self.geo.bn, self.geo.bv), dtype))
        bias = self.tiles.bias
        return z if bias is None else z + bias.astype(dtype)


def _forward_gpu_kernel(*refs, names, treedef, options, geo):
    """One program per row block, looping over vocabulary blocks."""
    ins, out_refs = _split_refs(refs, names)
    r0 = pl.program_id(0) * geo.bn

    def vocab_block(j, state):
        tile = _GpuTile(ins, options, geo, r0=r0, c0=j * geo.bv)
        return forward_tile(state, tile.tiles.target(tile.logits(), lo=tile.c0))

    init = row_state_init(geo.bn, out_refs[0].dtype, len(out_refs) > 4)
    state = _loop(pl.cdiv(geo.num_classes, geo.bv), vocab_block, init)
    ok = rows_ok(r0, r0, geo.bn, geo.num_rows)
    for ref, value in zip(out_refs, jax.tree.leaves(state), strict=True):
        pltriton.store(ref.at[pl.ds(r0, geo.bn), from_zero(1)], value, mask=ok)
    del treedef


def _backward_gpu_kernel(*refs, names, options, geo, eps, array_t: bool, has_bias: bool):
    """Grid ``(row blocks, vocabulary blocks)``, all parallel: each program recomputes its tile
    and adds its contributions to ``d_inputs``, ``d_weight`` (chunk by hidden chunk), ``d_bias``
    and the temperature rows with atomic adds into zero-initialised float32 accumulators, which
    are padded to whole blocks so that no add needs a mask."""
    ins, _ = _split_refs(refs, names)
    out_refs = list(refs[len(refs) - (2 + array_t + has_bias) :])
    dx_ref, dw_ref = out_refs[:2]
    db_ref = out_refs[2] if has_bias else None
    t_ref = out_refs[-1] if array_t else None
    tile = _GpuTile(ins, options, geo, r0=pl.program_id(0) * geo.bn, c0=pl.program_id(1) * geo.bv)
    grad = tile.tiles.backward(tile.logits(), lo=tile.c0, filter_eps=eps, array_t=array_t)
    if t_ref is not None:
        pltriton.atomic_add(t_ref, (tile.rows, from_zero(1)), grad.temperature_row)

    def accumulate():
        if db_ref is not None:
            pltriton.atomic_add(
                db_ref, (from_zero(1), tile.cols), jnp.sum(grad.dz, axis=0, keepdims=True)
            )

        def chunk(k0, carry):
            ks = pl.ds(k0, geo.bd)
            pltriton.atomic_add(
                dx_ref, (tile.rows, ks), input_grad(grad.dz, tile.w_chunk(k0), vd=geo.vd)
            )
            dw = weight_grad(tile.x_chunk(k0), grad.dz, vd=geo.vd)
            pltriton.atomic_add(dw_ref, (tile.cols, ks) if geo.vd else (ks, tile.cols), dw)
            return carry

        tile.over_hidden(chunk, 0)

    _run_if_kept(grad.keep, accumulate)


# ------------------------------------------------------------------------------ entry points


def forward_pallas(options, config, problem, rows) -> RowState:
    """The forward kernel: ``RowState`` of ``[N, 1]`` accumulators (see `forward_tile`)."""
    geo = _Geometry.of(config, problem)
    n, v, bn, bv = geo.num_rows, geo.num_classes, geo.bn, geo.bv
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    ops = _operands(problem, rows)
    treedef = _state_treedef(dtype, bool(options.label_smoothing))
    n_out = treedef.num_leaves
    out_shape = [_blocks.out_struct((n, 1), dtype, ops["x"])] * n_out
    if config.pallas_backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        kernel, grid = _forward_tpu_kernel, (pl.cdiv(n, bn), pl.cdiv(v, bv), geo.chunks)
        specs = dict(
            in_specs=_tpu_specs(ops, lambda i, j, k: (i, j, k, k), geo),
            out_specs=[pl.BlockSpec((bn, 1), lambda i, j, k: (i, 0))] * n_out,
            scratch_shapes=[pltpu.VMEM((bn, bv), dtype)],
        )
    else:
        kernel, grid, specs = _forward_gpu_kernel, (pl.cdiv(n, bn),), {}
    kernel = functools.partial(kernel, names=tuple(ops), treedef=treedef, options=options, geo=geo)
    out = _pallas_call(config, kernel, ops, out_shape, grid, name="linear_ce_forward", **specs)
    return jax.tree.unflatten(treedef, out)


def backward_pallas(options, config, problem, rows, lse, cotangent):
    """The backward kernels: ``(d_inputs, d_weight, d_bias, temperature_sum)``, the gradients
    in the accumulation dtype."""
    geo = _Geometry.of(config, problem)
    ops = _operands(problem, rows, lse=lse, cotangent=cotangent)
    if config.pallas_backend == "tpu":
        return _backward_tpu(options, config, problem, geo, ops)
    return _backward_gpu(options, config, problem, geo, ops)


def _backward_tpu(options, config, problem, geo: _Geometry, ops: dict):
    """Two kernels, as in flash attention: ``d_inputs`` on the forward's grid and ``d_weight``,
    ``d_bias`` on the transposed grid, each over two phases of hidden chunks
    (`_backward_tpu_kernel`)."""
    from jax.experimental.pallas import tpu as pltpu

    n, v, bn, bv, bd, d = geo.num_rows, geo.num_classes, geo.bn, geo.bv, geo.bd, geo.hidden
    kd, rows, cols = geo.chunks, pl.cdiv(n, bn), pl.cdiv(v, bv)
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    array_t = problem.temperature is not None
    has_bias = problem.bias is not None

    def phase_chunks(s):
        """Hidden chunks at step ``s``: (the one read only while forming the logits, which then
        stays put, and the one read in both phases)."""
        return jnp.minimum(s, kd - 1), jnp.where(s < kd, s, s - kd)

    def out_chunk(is_last, s):
        return jnp.where(is_last & (s >= kd), s - kd, 0)

    def scratch(acc_shape):
        tiles = [pltpu.VMEM((bn, bv), dtype), pltpu.VMEM((bn, bv), dtype)]  # logits, dz
        keep = [pltpu.SMEM((1,), jnp.int32)] if config.filter_eps else []
        return [*tiles, pltpu.VMEM(acc_shape, dtype), *keep]

    statics = dict(names=tuple(ops), options=options, geo=geo, eps=config.filter_eps)
    dx_shape = [_blocks.out_struct((n, d), dtype, ops["x"])]
    dx_blocks = [pl.BlockSpec((bn, bd), lambda i, j, s: (i, out_chunk(j == cols - 1, s)))]
    if array_t:
        dx_shape.append(_blocks.out_struct((n, 1), dtype, ops["x"]))
        dx_blocks.append(pl.BlockSpec((bn, 1), lambda i, j, s: (i, 0)))
    dx_out = _pallas_call(
        config,
        functools.partial(_backward_tpu_kernel, wrt="inputs", n_extra=int(array_t), **statics),
        ops,
        dx_shape,
        (rows, cols, 2 * kd),
        name="linear_ce_inputs_grad",
        in_specs=_tpu_specs(ops, lambda i, j, s: (i, j, *phase_chunks(s)), geo),
        out_specs=dx_blocks,
        scratch_shapes=scratch((bn, kd * bd)),
    )

    dw_shape = [_blocks.out_struct(problem.weight.shape, dtype, ops["x"])]
    if geo.vd:
        dw_blocks = [pl.BlockSpec((bv, bd), lambda j, i, s: (j, out_chunk(i == rows - 1, s)))]
    else:
        dw_blocks = [pl.BlockSpec((bd, bv), lambda j, i, s: (out_chunk(i == rows - 1, s), j))]
    if has_bias:
        dw_shape.append(_blocks.out_struct((1, v), dtype, ops["x"]))
        dw_blocks.append(pl.BlockSpec((1, bv), lambda j, i, s: (0, j)))
    dw_out = _pallas_call(
        config,
        functools.partial(_backward_tpu_kernel, wrt="weight", n_extra=int(has_bias), **statics),
        ops,
        dw_shape,
        (cols, rows, 2 * kd),
        name="linear_ce_weight_grad",
        in_specs=_tpu_specs(ops, lambda j, i, s: (i, j, *phase_chunks(s)[::-1]), geo),
        out_specs=dw_blocks,
        scratch_shapes=scratch((bv, kd * bd) if geo.vd else (kd * bd, bv)),
    )
    t_sum = jnp.sum(dx_out[1]) if array_t else jnp.zeros((), dtype)
    return dx_out[0], dw_out[0], dw_out[1][0] if has_bias else None, t_sum


def _backward_gpu(options, config, problem, geo: _Geometry, ops: dict):
    """One kernel over ``(row blocks, vocabulary blocks)`` with atomic adds into padded float32
    accumulators, sliced to the arrays' shapes afterwards."""
    n, v, bn, bv, bd, d = geo.num_rows, geo.num_classes, geo.bn, geo.bv, geo.bd, geo.hidden
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    array_t = problem.temperature is not None
    has_bias = problem.bias is not None
    rows_p, cols_p, hidden_p = bn * pl.cdiv(n, bn), bv * pl.cdiv(v, bv), bd * pl.cdiv(d, bd)
    accumulators = {
        "dx": jnp.zeros((rows_p, hidden_p), dtype),
        "dw": jnp.zeros((cols_p, hidden_p) if geo.vd else (hidden_p, cols_p), dtype),
    }
    if has_bias:
        accumulators["db"] = jnp.zeros((1, cols_p), dtype)
    if array_t:
        accumulators["t"] = jnp.zeros((rows_p, 1), dtype)
    varying = _blocks.vary_alike([*accumulators.values(), ops["x"]])[:-1]
    accumulators = dict(zip(accumulators, varying, strict=True))
    kernel = functools.partial(
        _backward_gpu_kernel,
        names=tuple(ops),
        options=options,
        geo=geo,
        eps=config.filter_eps,
        array_t=array_t,
        has_bias=has_bias,
    )
    out = _pallas_call(
        config,
        kernel,
        {**ops, **accumulators},
        [_blocks.out_struct(a.shape, a.dtype, ops["x"]) for a in accumulators.values()],
        (pl.cdiv(n, bn), pl.cdiv(v, bv)),
        name="linear_ce_backward",
        input_output_aliases={len(ops) + k: k for k in range(len(accumulators))},
    )
    out = dict(zip(accumulators, out, strict=True))
    dw = out["dw"][:v, :d] if geo.vd else out["dw"][:d, :v]
    db = out["db"][0, :v] if has_bias else None
    t_sum = jnp.sum(out["t"][:n]) if array_t else jnp.zeros((), dtype)
    return out["dx"][:n, :d], dw, db, t_sum
