"""What the two cross-entropy kernel schedules share: block sizes, the static kernel
configuration, the operand layout, and the per-block steps built from `_tile`.

A schedule (`cross_entropy_tpu`, `cross_entropy_gpu`) only decides how blocks are loaded,
iterated and stored; what happens to one loaded block is `forward_step`, `forward_finish` and
`backward_block` here, which are compositions of the `_tile` functions and nothing else.

Operands, all two-dimensional so that one layout serves both schedules (per-row values are
``[N, 1]`` column vectors, per-class values ``[1, V]`` rows):

- ``logits`` ``[N, V]`` in the caller's dtype;
- ``labels`` ``[N, 1]`` int32 (integer labels) or ``[N, V]`` probabilities;
- ``label_weight`` ``[N, 1]``: the class weight of each integer label, 0 for an ignored
  example and NaN for a label outside ``[0, V)`` (`_canonical.label_weights`);
- ``where`` ``[N, 1]`` or ``[1, V]`` int32, or ``[N, V]`` int8 (nonzero is valid);
- ``class_weights`` ``[1, V]``; ``n_valid`` ``[N, 1]`` or ``[1, 1]`` (label smoothing only);
- ``temperature`` ``[1, 1]`` (an array temperature only);
- backward only: ``lse``, ``w_total`` (``sum_k w_k q_k`` after smoothing) and ``ct`` (the
  loss cotangent, 0 for examples that do not count), each ``[N, 1]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_softmax_ce.kernels import _tile

PLATFORMS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows and vocabulary columns of one kernel block.

    TPU blocks respect the ``(8, 128)`` tiling: ``block_n`` is a multiple of the sublane count of
    every row-blocked operand's dtype (8 for 32-bit, 16 for 16-bit, 32 for the int8 ``where``
    mask) and ``block_v`` a multiple of 128. GPU (Triton) blocks are powers of two. The defaults
    are reasoned, not tuned: no accelerator has measured them yet.
    """

    block_n: int
    block_v: int

    @classmethod
    def get_default(cls, n: int, v: int, dtype, platform: str) -> BlockSizes:
        """Default blocks for ``[n, v]`` logits of ``dtype`` on ``platform`` ("tpu" or "gpu")."""
        if platform == "tpu":
            rows = 32 * -(-min(n, 128) // 32)
            return cls(block_n=rows, block_v=min(2048, 128 * -(-v // 128)))
        if platform == "gpu":
            # About 16 KiB of logits per block: 4 rows of 2048 16-bit or 1024 32-bit values.
            block_v = min(pow2_ceil(v), 4096 // np.dtype(dtype).itemsize)
            return cls(block_n=min(4, pow2_ceil(n)), block_v=block_v)
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")


def varying_axes(x) -> frozenset[str]:
    """The ``shard_map`` axes over which ``x`` varies (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; before: aval.vma
    return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def vary_alike(arrays):
    """``arrays`` (a list), each made to vary over the union of their ``shard_map`` axes, so that
    a kernel's outputs can be typed like any one of them (`out_struct`); unchanged outside
    ``shard_map``."""
    axes = frozenset().union(*(varying_axes(a) for a in arrays))

    def vary(a):
        missing = tuple(sorted(axes - varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return [vary(a) for a in arrays]


def out_struct(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel output's shape and dtype, varying over the same ``shard_map`` axes as ``like``
    (the logits), which a ``pallas_call`` inside ``shard_map`` needs. jax 0.10 names this
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


def pow2_ceil(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def sublanes(dtype) -> int:
    """Rows of one TPU tile for ``dtype``: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return max(8, 32 // np.dtype(dtype).itemsize)


def block_error(blocks: BlockSizes, platform: str, row_dtypes) -> str | None:
    """Why ``blocks`` cannot run on ``platform``, or None; ``row_dtypes`` are the dtypes of the
    operands blocked along both rows and vocabulary."""
    n, v = blocks.block_n, blocks.block_v
    if n < 1 or v < 1:
        return f"block sizes must be positive, got {blocks}"
    if platform == "tpu":
        rows = max(sublanes(d) for d in row_dtypes)
        if n % rows or v % 128:
            return (
                f"TPU blocks must be multiples of ({rows}, 128) for operands of dtypes "
                f"{[np.dtype(d).name for d in row_dtypes]}, got {blocks}"
            )
    elif n != pow2_ceil(n) or v != pow2_ceil(v):
        return f"GPU (Triton) block sizes must be powers of two, got {blocks}"
    return None


@dataclasses.dataclass(frozen=True)
class Config:
    """The static part of one kernel call (hashable)."""

    integer: bool
    where: str | None  # None, "row" ([N, 1]), "col" ([1, V]) or "full" ([N, V])
    label_smoothing: float
    z_loss: float
    softcap: float | None
    temperature: float | None  # None: the temperature is an array operand


class Inputs(NamedTuple):
    """Forward operands (arrays, or refs inside a kernel); absent ones are None."""

    logits: jax.Array
    labels: jax.Array
    label_weight: jax.Array | None
    where: jax.Array | None
    class_weights: jax.Array | None
    n_valid: jax.Array | None
    temperature: jax.Array | None


class Residuals(NamedTuple):
    """The extra backward operands, each ``[N, 1]``."""

    lse: jax.Array
    w_total: jax.Array
    ct: jax.Array


def backward_out_shape(config: Config, inputs: Inputs, t_shape) -> list[jax.ShapeDtypeStruct]:
    """Outputs of a backward kernel: ``d_logits``, then ``d_labels`` (probability labels) and the
    per-block temperature terms of shape ``t_shape`` (array temperature) when asked for."""
    logits = inputs.logits
    out_shape = [out_struct(logits.shape, logits.dtype, logits)]
    if not config.integer:
        out_shape.append(out_struct(logits.shape, inputs.labels.dtype, logits))
    if config.temperature is None:
        out_shape.append(out_struct(t_shape, _tile.accumulation_dtype(logits.dtype), logits))
    return out_shape


def backward_outputs(config: Config, outs):
    """``(d_logits, d_labels, t_parts)`` in the order of `backward_out_shape`, None where not
    asked for; ``outs`` are the arrays of a backward call or the output refs of its kernel."""
    d_logits, *rest = outs
    d_labels = None if config.integer else rest.pop(0)
    t_parts = None if config.temperature is not None else rest.pop(0)
    return d_logits, d_labels, t_parts


class Grads(NamedTuple):
    """Backward outputs: ``d_logits`` ``[N, V]``, ``d_labels`` ``[N, V]`` (probability labels
    only) and ``t_row`` ``[N, 1]``, the per-row `_tile.temperature_term` (array temperature
    only)."""

    d_logits: jax.Array
    d_labels: jax.Array | None
    t_row: jax.Array | None


def forward_init(config: Config, rows: int, dtype) -> _tile.RowState:
    return _tile.row_state_init(rows, dtype, bool(config.label_smoothing))


def temperature_value(config: Config, temperature):
    return config.temperature if temperature is None else temperature


def masked_logits(config: Config, z_raw, valid, temperature):
    """``z'`` of one block: transformed, and -inf on invalid or out-of-bounds classes."""
    t = temperature_value(config, temperature)
    return _tile.masked_transform(z_raw, valid, softcap=config.softcap, temperature=t)


def target_block(
    config: Config, col0, in_bounds, valid, labels, label_weight, class_weights, dtype
):
    """``a = w q`` of one block before smoothing, ``[rows, cols]``."""
    if config.integer:
        return _tile.label_target(labels, label_weight, col0, in_bounds)
    a = labels.astype(dtype)
    if class_weights is not None:
        a = a * class_weights
    return jnp.where(valid, a, jnp.zeros((), dtype))


def forward_step(
    config: Config,
    state: _tile.RowState,
    z,
    col0,
    in_bounds,
    valid,
    *,
    labels,
    label_weight,
    class_weights,
) -> _tile.RowState:
    """Merges one block of masked logits ``z`` (``[rows, cols]``) into the running state."""
    dtype = z.dtype
    lse, ref, shift = _tile.lse_merge(state.lse, z)
    if config.integer:
        hit = _tile.onehot_block(labels, col0, z.shape[1]) & in_bounds
        z_pick = jnp.sum(jnp.where(hit, z, jnp.zeros((), dtype)), axis=-1, keepdims=True)
        # The label's weight where its class is in this block, else 0 (no boolean reduction:
        # Triton has none).
        weight = jnp.sum(jnp.where(hit, label_weight, jnp.zeros((), dtype)), -1, keepdims=True)
        term = _tile.picked_term(weight, z_pick, ref)
    else:
        a = target_block(config, col0, in_bounds, valid, labels, None, class_weights, dtype)
        term = _tile.dense_term(a, z, ref)
    target = _tile.term_merge(state.target, shift, *term)
    smoothing = state.smoothing
    if smoothing is not None:
        weights = _tile.smoothing_weights(valid, class_weights, dtype)
        smoothing = _tile.dense_merge(smoothing, shift, weights, z, ref)
    return _tile.RowState(lse, target, smoothing)


def forward_finish(config: Config, state: _tile.RowState, label_weight, n_valid):
    """``(loss, lse, w_total)`` per row, each ``[rows, 1]``.

    With integer labels the target's total weight is the label's class weight itself, so that
    a label outside ``[0, V)`` (weight NaN, found in no block) gives a NaN loss.
    """
    target = state.target
    if config.integer:
        target = _tile.Term(label_weight, target.a)
    loss, lse = _tile.row_loss(
        state.lse,
        target,
        state.smoothing,
        n_valid,
        label_smoothing=config.label_smoothing,
        z_loss=config.z_loss,
    )
    w_total = target.w
    if state.smoothing is not None:
        w_total = _tile.mix(config.label_smoothing, n_valid, w_total, state.smoothing.w)
    return loss, lse, w_total


def backward_block(
    config: Config,
    z_raw,
    col0,
    in_bounds,
    valid,
    *,
    labels,
    label_weight,
    class_weights,
    n_valid,
    temperature,
    lse,
    w_total,
    ct,
):
    """``(d_logits, d_labels, t_part)`` of one block in the accumulation dtype; the last two
    are None when not asked for (probability labels, array temperature)."""
    dtype = z_raw.dtype
    z = masked_logits(config, z_raw, valid, temperature)
    a = target_block(config, col0, in_bounds, valid, labels, label_weight, class_weights, dtype)
    if config.label_smoothing:
        smoothing = _tile.smoothing_weights(valid, class_weights, dtype)
        a = _tile.mix(config.label_smoothing, n_valid, a, smoothing)
    g = _tile.grad_block(z, lse, w_total, a, z_loss=config.z_loss)
    counted = ct != 0
    zero = jnp.zeros((), dtype)
    g = jnp.where(counted, g * ct, zero)
    t = temperature_value(config, temperature)
    d_logits = _tile.transform_vjp(z_raw, g, softcap=config.softcap, temperature=t)
    d_labels = None
    if not config.integer:
        scale = (1.0 - config.label_smoothing) * ct
        if class_weights is not None:
            scale = scale * class_weights
        d_labels = jnp.where(counted, _tile.label_grad_block(z, lse, valid, scale), zero)
    t_part = None if config.temperature is not None else _tile.temperature_term(z, g, lse)
    return d_logits, d_labels, t_part
