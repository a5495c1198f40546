"""What every kernel schedule shares: the operand layout, the blocks each schedule can compile,
and the per-block steps built from `_tile`.

A schedule (`cross_entropy_tpu`, `cross_entropy_gpu`, `linear_tpu`, `linear_gpu`, and the fused
loss's XLA loops) only decides how blocks are formed, loaded, iterated and stored; what happens
to one block of logits is `forward_step` and `backward_block` here, compositions of the `_tile`
functions and nothing else.

Operands (`Operands`) are all two-dimensional, so that one layout serves every schedule: per-row
values are ``[N, 1]`` columns, per-class values ``[1, V]`` rows, and `axes` says which axis of
each operand runs over rows and which over the vocabulary. The TPU schedules pass the per-row
ones packed along lanes (`pack_rows`), since TPU memory pads an ``[N, 1]`` column to 128 lanes.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax_softmax_ce.kernels import _tile

from jax_softmax_ce._util import varying_axes

FIELDS = (
    "logits", "x", "w", "bias", "labels", "label_weight", "where", "class_weights", "n_valid",
    "temperature", "m", "r", "w_total", "w_rest", "ct", "aux_p", "aux_x", "aux_a", "aux_t",
    "argmax", "rows", "int_rows",
)  # fmt: skip
Operands = collections.namedtuple("Operands", FIELDS, defaults=(None,) * len(FIELDS))
Operands.__doc__ = """The operands of a kernel call (arrays, or refs inside a kernel); absent
    ones are None.

    Attributes:
      logits: ``[N, V]`` in the caller's dtype (logits losses).
      x: ``[N, D]`` inputs (fused loss).
      w: ``[D, V]``, or ``[V, D]`` in the tied layout (fused loss).
      bias: ``[1, V]`` (fused loss).
      labels: ``[N, 1]`` int32, or ``[N, V]`` probabilities.
      label_weight: ``[N, 1]``: each integer label's class weight, 0 for an ignored example
        and NaN for a label outside ``[0, V)``.
      where: ``[N, 1]`` or ``[1, V]`` int32, or ``[N, V]`` int8 (nonzero is valid).
      class_weights: ``[1, V]``.
      n_valid: ``[N, 1]`` or ``[1, 1]`` valid classes per row (backward, label smoothing).
      temperature: ``[1, 1]`` (an array temperature).
      m, r, w_total, w_rest: ``[N, 1]`` each (backward): the saved `_tile.Stats` (``w_rest``
        for integer labels only).
      ct: ``[N, 1]`` (backward): the loss cotangent, 0 for examples that do not count.
      aux_p, aux_x, aux_a, aux_t, argmax: ``[N, 1]`` each (backward with ``return_aux``): the
        coefficients of the auxiliary values' gradient (`_tile.AuxGrad`; ``aux_t`` for integer
        labels only) and the argmax as a float class id.
    """


def axes(name: str, options) -> tuple[int | None, int | None]:
    """``(row_axis, col_axis)`` of operand ``name``: which of its two axes runs over the rows
    (tokens) and which over the vocabulary, each None where it is shared (of size 1)."""
    if name == "logits":
        return 0, 1
    if name == "x":
        return 0, None
    if name == "w":
        return None, 0 if options.vd else 1
    if name in ("bias", "class_weights"):
        return None, 1
    if name == "labels":
        return 0, None if options.integer else 1
    if name == "where":
        return {"row": (0, None), "col": (None, 1), "full": (0, 1)}[options.mask]
    if name == "n_valid":
        return (0, None) if options.mask in ("row", "full") else (None, None)
    if name == "temperature":
        return None, None
    return 0, None  # label_weight and the backward's per-row operands


def per_row(ops: Operands, options) -> Operands:
    """For each present operand, whether its leading axis is the row axis (foldable under
    ``vmap``)."""
    return Operands(
        *(
            None if x is None else axes(n, options)[0] == 0
            for n, x in zip(ops._fields, ops, strict=True)
        )
    )


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel output's shape and dtype, varying over the same ``shard_map`` axes as ``like``,
    which a ``pallas_call`` inside ``shard_map`` needs. jax 0.10 names this
    ``manual_axis_type``, earlier versions ``vma``; with neither, none is given."""
    aval = jax.typeof(like)
    for name in ("manual_axis_type", "vma"):
        value = getattr(aval, name, None)
        if value is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{name: value})
            except TypeError:
                continue
    return jax.ShapeDtypeStruct(shape, dtype)


def vary_alike(arrays):
    """``arrays`` (a list), each made to vary over the union of their ``shard_map`` axes, so that
    a kernel's outputs can be typed like any one of them (`out_struct`); unchanged outside
    ``shard_map``."""
    present = [a for a in arrays if a is not None]
    every = frozenset().union(*(varying_axes(a) for a in present))

    def vary(a):
        if a is None:
            return None
        missing = tuple(sorted(every - varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return [vary(a) for a in arrays]


def sublanes(dtype) -> int:
    """Rows of one TPU tile for ``dtype``: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return max(8, 32 // np.dtype(dtype).itemsize)


def is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def compile_error(schedule: str, blocks, ops: Operands, options) -> str | None:
    """Why ``schedule`` (``"tpu"`` or ``"gpu"``), compiled, cannot take these operands with
    ``blocks``, or None. The interpreters take any operands and positive blocks.

    The TPU kernels take float32 and bfloat16 values: the TPU has no float64, and Mosaic loads
    no float16 vector (found compiling for v5e, v6e and v5p)."""
    fused = ops.x is not None
    if schedule == "tpu":
        floats = [x.dtype for x in ops if x is not None and jnp.issubdtype(x.dtype, jnp.floating)]
        unsupported = sorted({np.dtype(d).name for d in floats} & {"float16", "float64"})
        if unsupported:
            return (
                f"the TPU (Mosaic) schedule takes float32 and bfloat16 operands, not "
                f"{' or '.join(unsupported)} (the TPU has no float64, and Mosaic loads no "
                f'float16 vectors); use bfloat16, or implementation="xla"'
            )
    n = ops.labels.shape[0]
    v = ops.w.shape[0 if options.vd else 1] if fused else ops.logits.shape[1]
    sizes = (blocks.block_n, blocks.block_v) + ((blocks.block_d,) if fused else ())
    if schedule == "gpu":
        least = 16 if fused else 1
        if any(not is_pow2(b) or b < least for b in sizes):
            return (
                f"the GPU (Triton) schedule needs block sizes that are powers of two"
                f"{' of at least 16 (the minimum of its dot)' if fused else ''}, got {blocks}"
            )
        return None
    dense = [name for name in ops._fields if getattr(ops, name) is not None]
    dtypes = [getattr(ops, k).dtype for k in dense if axes(k, options) == (0, 1) or k == "x"]
    rows = max(sublanes(d) for d in dtypes)
    extents = (n, v) + ((ops.x.shape[1],) if fused else ())
    tiling = (rows, 128, 128)
    if any(b % t and b != size for b, size, t in zip(sizes, extents, tiling, strict=False)):
        names = ("block_n", "block_v", "block_d")[: len(sizes)]
        return (
            f"the TPU (Mosaic) schedule needs {names[0]} a multiple of {rows} (for operands of "
            f"dtypes {sorted({np.dtype(d).name for d in dtypes})}) and "
            f"{' and '.join(names[1:])} multiples of 128, or each the whole axis "
            f"({dict(zip(('N', 'V', 'D'), extents, strict=False))}), got {blocks}"
        )
    return None


def valid_mask(ok, where):
    """``ok`` (bool, broadcastable) where the block of the ``where`` operand is nonzero. The
    mask is compared as int32: Mosaic cannot lay out an int8 comparison combined with a mask
    that broadcasts over rows (found compiling for TPU v5e, v6e and v5p)."""
    return ok if where is None else ok & (where.astype(jnp.int32) != 0)


def temperature_value(options, temperature):
    """``T`` as the block steps take it: `Options`' float, or the array operand's value."""
    return options.temperature if temperature is None else temperature


def masked_logits(options, z_raw, valid, temperature):
    """``z'`` of one block: transformed, and -inf on invalid or out-of-bounds classes."""
    t = temperature_value(options, temperature)
    return _tile.masked_transform(z_raw, valid, softcap=options.logit_softcap, temperature=t)


def target_block(options, col0, ok, valid, labels, label_weight, class_weights, dtype):
    """``a = w q`` of one block before smoothing, ``[rows, cols]``: an integer label's weight on
    its column (where ``ok``, even if masked out: its ``z'`` is then -inf), or the weighted
    probability labels on valid classes."""
    if options.integer:
        return _tile.label_target(labels, label_weight, col0, ok)
    a = labels.astype(dtype)
    if class_weights is not None:
        a = a * class_weights
    return jnp.where(valid, a, jnp.zeros((), dtype))


def state_init(options, rows: int, dtype) -> _tile.RowState:
    """The empty forward accumulators of ``rows`` rows for ``options``."""
    return _tile.row_state_init(
        rows,
        dtype,
        bool(options.label_smoothing),
        monitor=options.aux,
        integer=options.integer,
    )


def forward_step(options, state: _tile.RowState, z, col0, ok, valid, blocks: Operands):
    """Merges one block of masked logits ``z`` (``[rows, cols]``, columns ``col0 + [0, cols)``)
    into the running state. ``ok`` marks the block's columns (and rows) that are part of the
    problem, ``valid`` those that are also unmasked; ``blocks`` holds this block's part of the
    label operands (``labels``, ``label_weight``, ``class_weights``)."""
    dtype = z.dtype
    lse, ref, shift = _tile.lse_merge(state.lse, z)
    monitor = state.monitor
    if monitor is not None:
        label = None
        if options.integer:
            label = _tile.pick(blocks.labels, jnp.ones((), dtype), col0, ok, z)
        monitor = _tile.monitor_merge(monitor, state.lse, lse, z, ref, shift, col0, label)
    labels, class_weights = blocks.labels, blocks.class_weights
    if options.integer:
        term = _tile.picked_term(*_tile.pick(labels, blocks.label_weight, col0, ok, z), ref)
    else:
        a = target_block(options, col0, ok, valid, labels, None, class_weights, dtype)
        term = _tile.dense_term(a, z, ref)
    target = _tile.term_merge(state.target, shift, *term)
    smoothing = state.smoothing
    if smoothing is not None:
        weights = _tile.smoothing_weights(valid, class_weights, dtype)
        smoothing = _tile.dense_merge(smoothing, shift, weights, z, ref)
    return _tile.RowState(lse, target, smoothing, monitor)


class BlockGrad(NamedTuple):
    """The backward of one block, in the accumulation dtype; None where not asked for."""

    d_logits: jax.Array  # [rows, cols] dl/dz (raw logits), times the cotangent
    d_labels: jax.Array | None  # [rows, cols] dl/dy, probability labels only
    t_part: jax.Array | None  # [rows, 1] sum_k g_k (z'_k - lse), an array temperature only
    keep: jax.Array | None  # scalar bool from the gradient filter, filter_eps > 0 only


def keep_block(g: jax.Array, filter_eps: float) -> jax.Array:
    """Scalar bool: whether a gradient block survives the filter (some ``|g| >= eps``, or a
    NaN)."""
    return jnp.logical_not(jnp.max(jnp.abs(g)) < filter_eps)


def backward_block(
    options,
    z_raw,
    col0,
    ok,
    valid,
    blocks: Operands,
    *,
    filter_eps: float = 0.0,
    label_entry=None,
) -> BlockGrad:
    """The gradient of one block of raw logits ``z_raw``, recomputed from the saved
    `_tile.Stats` (``blocks`` holds this block's part of them and of the other operands besides
    the logits). Rows with a zero cotangent ``ct`` (those that do not count, or padding) get a
    zero gradient. With ``filter_eps``, ``keep`` says whether any ``|dl/dz'|`` (before the
    cotangent) reaches it, or any entry of the gradient of the ``return_aux`` values, which is
    added where ``blocks`` holds its coefficients (`_tile.AuxGrad`). ``label_entry``
    (`_tile.label_entry`) is the label column's ``dl/dz'`` at a confident max where the caller
    formed it per row (a block that spans the vocabulary)."""
    dtype = z_raw.dtype
    b = blocks
    z = masked_logits(options, z_raw, valid, b.temperature)
    a = target_block(options, col0, ok, valid, b.labels, b.label_weight, b.class_weights, dtype)
    if options.label_smoothing:
        smoothing = _tile.smoothing_weights(valid, b.class_weights, dtype)
        a = _tile.mix(options.label_smoothing, b.n_valid, a, smoothing)
    target = None
    hit = None
    if options.integer:
        hit = _tile.onehot_block(b.labels, col0, z.shape[1]) & ok
        target = (hit, b.w_rest) if label_entry is None else (hit, label_entry)
    g = _tile.grad_block(
        z,
        b.m,
        b.r,
        b.w_total,
        a,
        z_loss=options.z_loss,
        target=target,
        label_row=label_entry is not None,
    )
    counted = b.ct != 0
    zero = jnp.zeros((), dtype)
    keep = None
    if filter_eps:
        keep = keep_block(jnp.where(counted, g, zero), filter_eps)
    g = jnp.where(counted, g * b.ct, zero)
    if b.aux_p is not None:
        aux_g = _tile.aux_grad_block(
            z, b.m, b.r, col0, None if hit is None else hit & valid, *_aux_coefficients(b)
        )
        if filter_eps:
            keep = keep | keep_block(aux_g, filter_eps)
        g = g + aux_g
    t = temperature_value(options, b.temperature)
    d_logits = _tile.transform_vjp(z_raw, g, softcap=options.logit_softcap, temperature=t)
    _, _, log_s = _tile.mass(b.m, b.r)
    d_labels = None
    if not options.integer:
        scale = (1.0 - options.label_smoothing) * b.ct
        if b.class_weights is not None:
            scale = scale * b.class_weights
        d_labels = _tile.label_grad_block(z, b.m, log_s, valid, scale)
        d_labels = jnp.where(counted, d_labels, zero)
    t_part = None
    if options.temperature is None:
        t_part = _tile.temperature_term(z, g, b.m, log_s)
    return BlockGrad(d_logits, d_labels, t_part, keep)


def _aux_coefficients(b: Operands):
    """The `_tile.aux_grad_block` coefficients among a block's operands, in its order."""
    return b.aux_p, b.aux_x, b.aux_a, b.aux_t, b.argmax


def store_packed(ref, state: _tile.RowState) -> None:
    """The ``[rows, 1]`` leaves of ``state`` into the rows of a ``[1, k, rows]`` output block,
    each transposed, so that the output runs along lanes as `pack_rows`' operands do."""
    for c, leaf in enumerate(jax.tree.leaves(state)):
        ref[0, c : c + 1, :] = leaf.T


def unpacked(packed: jax.Array, state_tree, n: int) -> _tile.RowState:
    """The state of ``n`` rows, each leaf ``[n, 1]``, whose leaves `store_packed` wrote into
    ``packed`` (``[row blocks, k, block_n]``)."""
    k = state_tree.num_leaves
    flat = packed.transpose(1, 0, 2).reshape(k, -1)[:, :n]
    return jax.tree.unflatten(state_tree, [flat[c][:, None] for c in range(k)])


def pack_rows(ops: Operands, options, block_n: int):
    """``(ops, packed)``: the per-row ``[N, 1]`` operands moved along lanes, the float ones
    into ``rows`` and the int32 ones into ``int_rows``, each ``[row blocks, k, block_n]``,
    whose row ``c`` of each block holds one operand for the block's rows (zero past ``N``).
    ``packed`` pairs each packed field with the names of its operands, in order; `unpack_rows`
    undoes it on a block, and `rows_spec` is the fields' BlockSpec.

    The TPU schedules pass them so. TPU memory tiles a 32-bit array in ``(8, 128)`` tiles, so
    an ``[N, 1]`` column takes 128 lanes per row in HBM and VMEM, as ``[N, 128]`` would (512
    bytes per row): the backward's dozen of them (the saved `_tile.Stats`, the cotangent, and
    ``return_aux``'s coefficients) took 2 KiB per row of v5p's HBM more with ``return_aux`` than
    without (`benchmarks.aux_goals`). Packed, each 8 operands (rounded up) take 32 bytes per
    row, where ``block_n`` is a multiple of 128. Float operands of another dtype than the
    first one stay apart."""
    groups = {"rows": [], "int_rows": []}
    for name, x in zip(ops._fields, ops, strict=True):
        if x is None or name in groups or axes(name, options) != (0, None) or x.shape[1] != 1:
            continue
        if jnp.issubdtype(x.dtype, jnp.floating):
            first = groups["rows"][:1]
            if not first or getattr(ops, first[0]).dtype == x.dtype:
                groups["rows"].append(name)
        elif x.dtype == jnp.int32:
            groups["int_rows"].append(name)
    packed = tuple((field, tuple(names)) for field, names in groups.items() if names)
    moved = {}
    for field, names in packed:
        n = getattr(ops, names[0]).shape[0]
        blocks = -(-n // block_n)
        stacked = jnp.stack([getattr(ops, name)[:, 0] for name in names])  # [k, N]
        stacked = jnp.pad(stacked, ((0, 0), (0, blocks * block_n - n)))
        moved[field] = stacked.reshape(len(names), blocks, block_n).transpose(1, 0, 2)
        moved.update(dict.fromkeys(names))
    return ops._replace(**moved), packed


def rows_spec(k: int, block_n: int, row_block) -> pl.BlockSpec:
    """The BlockSpec of a ``[row blocks, k, block_n]`` array (`pack_rows`, `store_packed`),
    whose row block is ``row_block(*grid indices)``."""
    return pl.BlockSpec(
        (1, k, block_n), lambda *grid: (row_block(*grid), first_block(), first_block())
    )


def unpack_rows(blocks: Operands, packed) -> Operands:
    """`pack_rows` undone on a block of the operands (values, not refs): each packed operand
    back as a ``[block_n, 1]`` column, from one transpose of its field's ``[1, k, block_n]``
    block."""
    columns = {}
    for field, names in packed:
        table = getattr(blocks, field)[0].T  # [block_n, k]
        columns[field] = None
        columns.update({name: table[:, c : c + 1] for c, name in enumerate(names)})
    return blocks._replace(**columns)


def present(ops: Operands) -> tuple[tuple[str, ...], list]:
    """The names and values of the operands that are not None: how a kernel call passes them."""
    names = tuple(name for name in ops._fields if getattr(ops, name) is not None)
    return names, [getattr(ops, name) for name in names]


def named(names: tuple[str, ...], refs) -> tuple[Operands, tuple]:
    """Inside a kernel: the input refs as `Operands` (by `present`'s ``names``), and the rest of
    the refs (outputs, then scratch)."""
    return Operands(**dict(zip(names, refs, strict=False))), tuple(refs[len(names) :])


def first_block():
    """Block index 0 of an index map, as int32: a Python 0 would be int64 under
    ``jax_enable_x64``, which Mosaic does not take. Called inside the index map (a value made
    outside it would be a captured constant)."""
    return jnp.int32(0)


def block_index(i, blocked: bool):
    """Grid index ``i`` where an operand is blocked along that axis, else `first_block`."""
    return i if blocked else first_block()
