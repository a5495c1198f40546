"""From the caller's shapes to the canonical ``[N, V]`` problem, validated once.

Implementations receive a `Problem` and never see ``axis``, tuples of axes, broadcasting or Python
validation. Every error here names the argument and the shapes involved.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce.kernels._blocks import varying_axes
from jax_softmax_ce.kernels._tile import accumulation_dtype


class Problem(NamedTuple):
    """Canonical operands of one loss call (a pytree; absent operands are None).

    Attributes:
      logits: ``[N, V]`` floating logits, in the caller's dtype.
      labels: ``[N]`` integer labels, or ``[N, V]`` probabilities.
      where: None, or a boolean mask of shape ``[N, 1]`` (whole examples), ``[1, V]`` (a
        vocabulary mask shared by every example) or ``[N, V]``.
      class_weights: None, or ``[V]`` in the accumulation dtype.
      temperature: None, or a scalar array (a Python temperature lives in `Options`).
    """

    logits: jax.Array
    labels: jax.Array
    where: jax.Array | None
    class_weights: jax.Array | None
    temperature: jax.Array | None


class Layout(NamedTuple):
    """How the caller's logits map onto ``[N, V]``: batch axes first, then the class axes."""

    batch_axes: tuple[int, ...]
    class_axes: tuple[int, ...]
    batch_shape: tuple[int, ...]
    num_classes: int

    @property
    def perm(self) -> tuple[int, ...]:
        return self.batch_axes + self.class_axes

    @property
    def num_rows(self) -> int:
        return math.prod(self.batch_shape)

    def to_rows(self, x: jax.Array) -> jax.Array:
        """``x`` of the logits' rank, already broadcast: transpose and flatten to ``[N, V]``."""
        x = jnp.transpose(x, self.perm)
        return x.reshape(self.num_rows, self.num_classes)


def explicit_mesh(arrays):
    """The mesh of the first array whose type names a mesh axis (an explicit sharding under
    ``jit``), or None. ``arrays`` may hold None."""
    for x in arrays:
        sharding = None if x is None else getattr(jax.typeof(x), "sharding", None)
        spec = getattr(sharding, "spec", None)
        if spec is not None and any(axis is not None for axis in spec):
            return sharding.mesh
    return None


def check_floating(name: str, x) -> jax.Array:
    """``x`` as an array; a TypeError naming ``name``, the dtype and the shape unless floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be floating point (float16, bfloat16, float32 or float64), got "
            f"{x.dtype} with shape {x.shape}"
        )
    return x


def check_logits(logits) -> jax.Array:
    return check_floating("logits", logits)


def layout(shape: tuple[int, ...], axis, name: str = "logits") -> Layout:
    """Validates ``axis`` (an int or a tuple of ints) against the shape of the operand ``name``
    (the logits, or the log-predictions of a divergence)."""
    ndim = len(shape)
    if isinstance(axis, numbers.Integral) and not isinstance(axis, bool):
        axes = (int(axis),)
    elif (
        isinstance(axis, tuple)
        and axis
        and all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis)
    ):
        axes = tuple(int(a) for a in axis)
    else:
        raise ValueError(f"axis must be an int or a non-empty tuple of ints, got {axis!r}")
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(f"axis {axis} is out of range for {name} of shape {shape}")
    class_axes = tuple(a % ndim for a in axes)
    if len(set(class_axes)) != len(class_axes):
        raise ValueError(f"axis {axis} names an axis twice ({name} shape {shape})")
    batch_axes = tuple(a for a in range(ndim) if a not in class_axes)
    num_classes = math.prod(shape[a] for a in class_axes)
    if num_classes == 0:
        raise ValueError(f"{name} of shape {shape} have no classes along axis {axis}")
    return Layout(batch_axes, class_axes, tuple(shape[a] for a in batch_axes), num_classes)


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def integer_labels(labels, logits_shape, lay: Layout, axis) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integers for softmax_cross_entropy_with_integer_labels, got "
            f"{labels.dtype} with shape {labels.shape}; use softmax_cross_entropy for "
            f"probability labels"
        )
    if not _broadcasts_to(labels.shape, lay.batch_shape):
        raise ValueError(
            f"labels shape {labels.shape} does not match logits shape {logits_shape} "
            f"without axis {axis} (expected {lay.batch_shape})"
        )
    return jnp.broadcast_to(labels, lay.batch_shape).reshape(lay.num_rows)


def probability_labels(labels, logits: jax.Array, lay: Layout) -> jax.Array:
    labels = jnp.asarray(labels)
    if not _broadcasts_to(labels.shape, logits.shape):
        raise ValueError(
            f"labels shape {labels.shape} does not broadcast to logits shape {logits.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(logits.dtype)
    return lay.to_rows(jnp.broadcast_to(labels, logits.shape))


def labels_to_rows(labels, logits: jax.Array, lay: Layout, axis, *, integer: bool) -> jax.Array:
    """``[N]`` integer labels, or ``[N, V]`` probability labels."""
    if integer:
        return integer_labels(labels, logits.shape, lay, axis)
    return probability_labels(labels, logits, lay)


def make_problem(
    logits: jax.Array, labels: jax.Array, lay: Layout, axis, *, where, weights, temperature
) -> Problem:
    """The `Problem` of checked ``logits`` and of labels from `labels_to_rows`; ``where`` and the
    class ``weights`` are validated here, ``temperature`` is None or from `array_temperature`."""
    return Problem(
        logits=lay.to_rows(logits),
        labels=labels,
        where=mask(where, logits.shape, lay, axis),
        class_weights=class_weights(weights, lay, logits.dtype, logits.shape),
        temperature=temperature,
    )


def mask(
    where, logits_shape: tuple[int, ...], lay: Layout, axis, name: str = "logits"
) -> jax.Array | None:
    """The ``where`` mask as ``[N, 1]``, ``[1, V]`` or ``[N, V]`` booleans.

    A ``where`` of lower rank than the logits masks whole examples (optax's rule: the class axes
    are inserted); otherwise it broadcasts against the logits (the operand ``name``).
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    given = where.shape
    if where.dtype != jnp.bool_:
        where = where.astype(jnp.bool_)
    ndim = len(logits_shape)
    if where.ndim == ndim - len(lay.class_axes) and where.ndim != ndim:
        where = jnp.expand_dims(where, lay.class_axes)
    if where.ndim != ndim or not _broadcasts_to(where.shape, logits_shape):
        raise ValueError(
            f"where shape {given} does not broadcast to {name} shape {logits_shape} (axis {axis})"
        )
    per_row = all(where.shape[a] == 1 for a in lay.class_axes)
    per_class = not per_row and all(where.shape[a] == 1 for a in lay.batch_axes)
    if per_row:
        target = tuple(1 if a in lay.class_axes else n for a, n in enumerate(logits_shape))
        return jnp.broadcast_to(where, target).reshape(lay.num_rows, 1)
    if per_class:
        target = tuple(1 if a in lay.batch_axes else n for a, n in enumerate(logits_shape))
        where = jnp.transpose(jnp.broadcast_to(where, target), lay.perm)
        return where.reshape(1, lay.num_classes)
    return lay.to_rows(jnp.broadcast_to(where, logits_shape))


def class_weights(
    weights, lay: Layout, dtype, logits_shape: tuple[int, ...], name: str = "logits"
) -> jax.Array | None:
    """``[V]`` class weights in the accumulation dtype; ``name`` and ``logits_shape`` describe
    the logits in the error message."""
    if weights is None:
        return None
    weights = jnp.asarray(weights)
    if weights.shape != (lay.num_classes,):
        raise ValueError(
            f"class_weights shape {weights.shape} must be [{lay.num_classes}], the number of "
            f"classes of the {name} (shape {logits_shape})"
        )
    return jax.lax.stop_gradient(weights.astype(accumulation_dtype(dtype)))


def array_temperature(temperature) -> jax.Array | None:
    """An array temperature as a scalar operand; None for a Python number (static)."""
    if isinstance(temperature, numbers.Real):
        return None
    temperature = jnp.asarray(temperature)
    if temperature.shape != ():
        raise ValueError(f"temperature must be a scalar, got shape {temperature.shape}")
    if not jnp.issubdtype(temperature.dtype, jnp.floating):
        temperature = temperature.astype(jnp.float32)
    return temperature


def valid_count(where: jax.Array | None, num_rows: int, num_classes: int, dtype) -> jax.Array:
    """``[N, 1]`` (or ``[1, 1]``) number of valid classes per row, in ``dtype``."""
    if where is None:
        return jnp.full((1, 1), num_classes, dtype)
    if where.shape[1] == 1:
        return where.astype(dtype) * num_classes
    return jnp.sum(where, axis=1, keepdims=True, dtype=dtype)


def counted_rows(problem: Problem, ignore_index: int | None, integer: bool) -> jax.Array:
    """``[N]`` bool: the examples that count (not ignored, and with at least one valid class)."""
    n = problem.logits.shape[0]
    counted = jnp.ones((n,), jnp.bool_)
    if problem.where is not None:
        counted = jnp.broadcast_to(jnp.any(problem.where, axis=1), (n,))
    if integer and ignore_index is not None:
        counted = counted & (problem.labels != ignore_index)
    return counted


def like_primal(grad, primal):
    """A gradient summed over the ``shard_map`` axes over which it varies and its primal does
    not: a replicated operand (a projection, an array temperature) used by every shard's rows
    gets the sum of the shards' contributions, as JAX's own transpose of the implicit
    broadcast gives. A ``custom_vjp`` rule must return it so."""
    extra = varying_axes(grad) - varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def temperature_gradient(terms, lse, ct, temperature, z_loss: float):
    """``dl/dT`` of an array temperature, typed like it: ``-(sum of terms + z-loss part) / T``.

    ``terms`` are the rows' `_tile.temperature_term` values (or their sum), already times the
    cotangent; the z-loss part ``2 z_loss ct lse**2`` of each row with a finite ``lse`` is the
    rest of ``sum_k g_k z'_k``. ``lse`` and ``ct`` are per row, of one shape."""
    dtype = lse.dtype
    total = jnp.sum(terms)
    if z_loss:
        finite = jnp.isfinite(lse)
        lse2 = jnp.where(finite, lse, jnp.zeros((), dtype)) ** 2
        total = total + jnp.sum(jnp.where(finite, 2.0 * z_loss * ct * lse2, 0))
    grad = (-total / temperature.astype(dtype)).astype(temperature.dtype)
    return like_primal(grad, temperature)


def label_weights(labels: jax.Array, class_weights, num_classes: int, dtype) -> jax.Array:
    """``[N]`` class weight of each integer label (NaN for a label outside ``[0, V)``). The range
    is checked here: indexing with ``mode="fill"`` would wrap a negative label around first."""
    in_range = (labels >= 0) & (labels < num_classes)
    weights = jnp.ones((), dtype)
    if class_weights is not None:
        weights = class_weights.astype(dtype).at[labels].get(mode="clip")
    return jnp.where(in_range, weights, jnp.full((), np.nan, dtype))


def reduce_losses(
    losses: jax.Array,
    problem: Problem,
    *,
    ignore_index: int | None,
    integer: bool,
    reduction: str,
    batch_shape: tuple[int, ...],
    dtype,
) -> jax.Array:
    """Applies ``reduction`` to per-example losses ``[N]`` (already 0 where an example does not
    count) and casts to the output ``dtype``.

    ``"mean"`` is PyTorch's weighted mean ``sum_i l_i / sum_i c_i`` over counted examples, with
    ``c_i`` the class weight of an integer label (1 without class weights, and 1 for probability
    labels); it is 0 when nothing counts.
    """
    losses = losses.astype(dtype)
    if reduction == "none":
        return losses.reshape(batch_shape)
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    counted = counted_rows(problem, ignore_index, integer)
    if integer and problem.class_weights is not None:
        num_classes = problem.logits.shape[1]
        weights = label_weights(problem.labels, problem.class_weights, num_classes, dtype)
        denominator = jnp.sum(jnp.where(counted, weights, 0)).astype(dtype)
    else:
        denominator = jnp.sum(counted, dtype=dtype)
    nonzero = denominator != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, denominator, 1), jnp.zeros((), dtype))
