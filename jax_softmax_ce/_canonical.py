"""From the caller's shapes to the canonical ``[N, V]`` problem, validated once, and the per-row
facts that every implementation reads.

Both the logits losses and the fused loss canonicalise into one `Problem`, whose logits are either
an ``[N, V]`` array or a `Linear` projection ``inputs @ weight (+ bias)`` that an implementation
forms blockwise. The per-row rules are written here and nowhere else:

- `Rows`: each integer label's weight (the class weight of the label; 0 for an ignored example;
  NaN for a label outside ``[0, V)``, since a value cannot raise under ``jit``), the number of
  valid classes of each row, which rows count (not ignored, with a valid class), and the
  caller's per-example ``weights``;
- `mask_kind`: how the ``where`` mask is laid out (``"row"``, ``"col"`` or ``"full"``);
- `temperature`: the temperature every formula divides by (NaN for a non-positive array
  temperature, like an out-of-range label);
- `reduce`: the per-example weights and the reductions, with PyTorch's weighted mean;
- `quarantine`: the rows that contribute nothing, made safe for plain autodiff.

Every error here names the argument and the shapes involved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _sharding
from jax_softmax_ce._options import Options
from jax_softmax_ce._util import accumulation_dtype, varying_axes
from jax_softmax_ce.kernels import _blocks, _tile
from jax_softmax_ce.monitoring import CrossEntropyAux

LINEAR_LOGITS = "logits inputs @ weight"  # how errors name the logits the caller never passed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Linear:
    """Logits ``inputs @ weight (+ bias)`` that are never materialised.

    Attributes:
      inputs: ``[N, D]`` (``[..., D]`` before canonicalisation).
      weight: ``[D, V]``, or ``[V, D]`` when ``vd`` (the tied layout).
      bias: None or ``[V]``.
      vd: the weight layout (static).
    """

    inputs: jax.Array
    weight: jax.Array
    bias: jax.Array | None
    vd: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0 if self.vd else 1]

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the logits."""
        return (*self.inputs.shape[:-1], self.num_classes)

    @property
    def dtype(self):
        return self.inputs.dtype


class Rows(NamedTuple):
    """The per-row facts, as ``[N, 1]`` columns (``n_valid`` may be ``[1, 1]``, shared).

    Attributes:
      label_weight: integer labels only (else None): the class weight of each label (1 without
        class weights), 0 for an ignored example, NaN for a label outside ``[0, V)``; in the
        accumulation dtype.
      n_valid: the number of valid classes, in the accumulation dtype: ``[N, 1]`` for a
        ``"row"`` or ``"full"`` mask, else ``[1, 1]``.
      counted: bool, the examples that count: not ignored, and with at least one valid class.
      example_weight: the caller's per-example ``weights`` ``u_i`` in the accumulation dtype,
        or None without. Only `reduce` applies them; an implementation reads them only to
        find the rows that contribute nothing (`silent`).
    """

    label_weight: jax.Array | None
    n_valid: jax.Array
    counted: jax.Array
    example_weight: jax.Array | None = None


class Problem(NamedTuple):
    """Canonical operands of one loss call (a pytree; absent operands are None).

    Attributes:
      logits: ``[N, V]`` floating logits in the caller's dtype, or a `Linear` projection.
      labels: ``[N]`` int32 labels (-1 for a label outside ``[0, V)``), or ``[N, V]``
        probabilities. With a vocabulary axis (`Options.vocab_axis`), this shard's class ids:
        the global id minus the shard's first class, outside ``[0, V_local)`` for a label of
        another shard.
      where: None, or a boolean mask of shape ``[N, 1]``, ``[1, V]`` or ``[N, V]``
        (`Options.mask` names which).
      class_weights: None, or ``[V]`` in the accumulation dtype (no gradient).
      temperature: None, or a scalar array (a Python temperature lives in `Options`).
      rows: the per-row facts.
    """

    logits: jax.Array | Linear
    labels: jax.Array
    where: jax.Array | None
    class_weights: jax.Array | None
    temperature: jax.Array | None
    rows: Rows

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        logits = self.logits
        return logits.num_classes if isinstance(logits, Linear) else logits.shape[1]

    @property
    def dtype(self):
        """The dtype of the logits (of the inputs for a `Linear` problem)."""
        return self.logits.dtype

    @property
    def accumulation_dtype(self) -> np.dtype:
        return accumulation_dtype(self.logits.dtype)


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
    ``jit``), or None. ``arrays`` is a pytree."""
    for x in jax.tree.leaves(arrays):
        sharding = getattr(jax.typeof(x), "sharding", None)
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


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def integer_labels(labels, logits_shape, lay: Layout, axis, name: str = "logits") -> jax.Array:
    """``[N]`` integer labels in the caller's integer dtype."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integers for softmax_cross_entropy_with_integer_labels, got "
            f"{labels.dtype} with shape {labels.shape}; use softmax_cross_entropy for "
            f"probability labels"
        )
    if not broadcasts_to(labels.shape, lay.batch_shape):
        raise ValueError(
            f"labels shape {labels.shape} does not match {name} shape {logits_shape} "
            f"without axis {axis} (expected {lay.batch_shape})"
        )
    return jnp.broadcast_to(labels, lay.batch_shape).reshape(lay.num_rows)


def probability_labels(labels, logits: jax.Array, lay: Layout) -> jax.Array:
    """``[N, V]`` probability labels (a non-floating array is cast to the logits' dtype)."""
    labels = jnp.asarray(labels)
    if not broadcasts_to(labels.shape, logits.shape):
        raise ValueError(
            f"labels shape {labels.shape} does not broadcast to logits shape {logits.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(logits.dtype)
    return lay.to_rows(jnp.broadcast_to(labels, logits.shape))


def check_where(where):
    """``where`` as an array, refusing a Python int: that is ``ignore_index`` passed by
    position, since ``where`` is the fourth positional argument, as in optax."""
    if isinstance(where, numbers.Integral) and not isinstance(where, (bool, np.bool_)):
        raise TypeError(
            f"where must be a boolean mask, got the integer {where!r}: where is the fourth "
            f"positional argument (as in optax), so pass ignore_index={where!r} by keyword"
        )
    return None if where is None else jnp.asarray(where)


def mask(
    where, logits_shape: tuple[int, ...], lay: Layout, axis, name: str = "logits"
) -> jax.Array | None:
    """The ``where`` mask as ``[N, 1]``, ``[1, V]`` or ``[N, V]`` booleans.

    A ``where`` with the rank of the batch shape masks whole examples (optax's rule: the class
    axes are inserted); a scalar or a mask of the logits' rank broadcasts against the logits
    (the operand ``name``).
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    given = where.shape
    if where.dtype != jnp.bool_:
        where = where.astype(jnp.bool_)
    ndim = len(logits_shape)
    batch_rank = ndim - len(lay.class_axes)
    if where.ndim == batch_rank and where.ndim != ndim:
        where = jnp.expand_dims(where, lay.class_axes)
    elif where.ndim == 0:
        where = where.reshape((1,) * ndim)
    if where.ndim != ndim or not broadcasts_to(where.shape, logits_shape):
        class_shape = tuple(logits_shape[a] for a in lay.class_axes)
        suggestion = tuple(1 if a in lay.batch_axes else n for a, n in enumerate(logits_shape))
        hint = (
            f"; to mask classes, give it the {name}' rank: shape {suggestion}"
            if given == class_shape
            else ""
        )
        raise ValueError(
            f"where shape {given} does not broadcast to {name} shape {logits_shape} (axis "
            f"{axis}): a where of the batch's rank ({batch_rank}) masks whole examples and must "
            f"broadcast to the batch shape {lay.batch_shape}; one of the {name}' rank ({ndim}) "
            f"masks classes and must broadcast to {logits_shape}{hint}"
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


def mask_kind(where: jax.Array | None) -> str | None:
    """`Options.mask` of a canonical mask: None, ``"row"``, ``"col"`` or ``"full"``."""
    if where is None:
        return None
    rows, cols = where.shape
    return "row" if cols == 1 else "col" if rows == 1 else "full"


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


def check_example_weights(weights) -> jax.Array | None:
    """The per-example ``weights`` as an array, or None: any real dtype (booleans and integers
    are cast to the accumulation dtype where they are applied); a TypeError naming ``weights``
    otherwise."""
    if weights is None:
        return None
    weights = jnp.asarray(weights)
    dtype = weights.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)) and (
        dtype != jnp.bool_
    ):
        raise TypeError(
            f"weights must be real numbers (floating, integer or bool), got {weights.dtype} with "
            f"shape {weights.shape}"
        )
    return weights


def example_weights(weights, batch_shape: tuple[int, ...], dtype, described: str):
    """``[N]`` per-example weights in ``dtype``, ``weights`` broadcast to ``batch_shape``, or
    None; the error names ``weights``, its shape and the batch shape, which ``described``
    explains (``"logits shape (2, 5) without axis -1"``)."""
    weights = check_example_weights(weights)
    if weights is None:
        return None
    if not broadcasts_to(weights.shape, batch_shape):
        raise ValueError(
            f"weights shape {weights.shape} does not broadcast to the batch shape {batch_shape} "
            f"({described})"
        )
    return jnp.broadcast_to(weights.astype(dtype), batch_shape).reshape(-1)


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


def rows(
    options: Options, labels, where, weights, num_classes: int, dtype, example_weight=None
) -> Rows:
    """The per-row facts of canonical ``[N]`` integer (or ``[N, V]`` probability) ``labels``
    (integers in the caller's dtype, so that a label that does not fit in int32 is still out of
    range), the canonical ``where`` mask of kind ``options.mask``, the class ``weights`` and
    the ``[N]`` per-example weights (`example_weights`, or None). With ``options.vocab_axis``,
    ``num_classes`` counts every shard's classes, and ``where`` and ``weights`` are this
    shard's slice: the valid classes and the label's weight are summed over the shards."""
    n = labels.shape[0]
    axis = options.vocab_axis
    if options.mask is None:
        n_valid = jnp.full((1, 1), num_classes, dtype)
        counted = jnp.ones((n, 1), jnp.bool_)
    elif options.mask == "row":
        n_valid = where.astype(dtype) * num_classes
        counted = where
    elif options.vocab_axis is not None:
        n_valid = _sharding.psum(jnp.sum(where, axis=1, keepdims=True, dtype=dtype), axis)
        counted = jnp.broadcast_to(n_valid > 0, (n, 1))
    else:
        n_valid = jnp.sum(where, axis=1, keepdims=True, dtype=dtype)
        counted = jnp.broadcast_to(jnp.any(where, axis=1, keepdims=True), (n, 1))
    label_weight = None
    if options.integer:
        in_range = (labels >= 0) & (labels < num_classes)
        # The range is checked first: indexing with mode="fill" would wrap a negative label.
        weight = jnp.ones((n,), dtype)
        if weights is not None and axis is not None:
            # Each shard holds its own classes' weights: the label's owner gives it.
            local = labels - _sharding.class_offset(axis, weights.shape[0])
            owned = (local >= 0) & (local < weights.shape[0])
            weight = weights.astype(dtype).at[local].get(mode="clip")
            weight = _sharding.psum(jnp.where(owned, weight, jnp.zeros((), dtype)), axis)
        elif weights is not None:
            weight = weights.astype(dtype).at[labels].get(mode="clip")
        weight = jnp.where(in_range, weight, jnp.full((), np.nan, dtype))
        if options.ignore_index is not None:
            ignored = labels == options.ignore_index
            weight = jnp.where(ignored, jnp.zeros((), dtype), weight)
            counted = counted & ~ignored[:, None]
        label_weight = weight[:, None]
    if example_weight is not None:
        example_weight = example_weight[:, None]
    return Rows(label_weight, n_valid, counted, example_weight)


def silent(rows: Rows) -> jax.Array:
    """``[N, 1]`` bool: the rows whose loss and gradients are 0 whatever their values, those
    that do not count and those of weight 0."""
    quiet = ~rows.counted
    if rows.example_weight is not None:
        quiet = quiet | (rows.example_weight == 0)
    return quiet


def quarantine(quiet: jax.Array, *values):
    """``(bad, values)`` for a loss formed by plain autodiff, where ``quiet`` (bool, the shape of
    the leading axes of each of ``values``) marks the examples that contribute nothing: ``bad``
    marks those in which some value is NaN or +inf, and those values are set to 0 (None stays
    None). Such an example gets a zero cotangent, which autodiff would multiply by its partial
    derivatives, NaN there; with the values replaced (the double ``where``), the caller gives a
    ``bad`` example a NaN loss, non-finite as it would have been, which it or `reduce` then
    drops."""

    def poisoned(v):
        return jnp.any(jnp.isnan(v) | (v == jnp.inf), axis=tuple(range(quiet.ndim, v.ndim)))

    bad = quiet & functools.reduce(jnp.logical_or, [poisoned(v) for v in values if v is not None])

    def safe(v):
        hit = bad.reshape(bad.shape + (1,) * (v.ndim - bad.ndim))
        return jnp.where(hit, jnp.zeros((), v.dtype), v)

    return bad, [None if v is None else safe(v) for v in values]


def quarantine_problem(problem: Problem) -> tuple[jax.Array, Problem]:
    """`quarantine` of a problem's rows (their logits, or a `Linear` problem's inputs, and their
    probability labels): ``bad`` is ``[N, 1]``."""
    logits, labels = problem.logits, problem.labels
    linear = isinstance(logits, Linear)
    dense = labels if jnp.issubdtype(labels.dtype, jnp.floating) else None
    quiet = silent(problem.rows)[:, 0]
    bad, (values, dense) = quarantine(quiet, logits.inputs if linear else logits, dense)
    logits = dataclasses.replace(logits, inputs=values) if linear else values
    return bad[:, None], problem._replace(logits=logits, labels=labels if dense is None else dense)


def canonicalise(
    logits, labels, axis, where, weights, temperature, options: Options, example_weight=None
) -> tuple[Problem, Options, Layout]:
    """The `Problem` of one call, the `Options` with its mask kind set, and the `Layout` of the
    caller's logits. ``logits`` is a floating array, or a `Linear` with ``[..., D]`` inputs
    (checked by the caller); ``temperature`` is None or from `array_temperature`; ``weights``
    are the class weights and ``example_weight`` the caller's per-example ``weights``."""
    linear = isinstance(logits, Linear)
    name = LINEAR_LOGITS if linear else "logits"
    shape = logits.shape
    lay = layout(shape, -1 if linear else axis, name)
    if options.integer:
        labels = integer_labels(labels, shape, lay, axis, name)
    else:
        labels = probability_labels(labels, logits, lay)
    where = mask(where, shape, lay, axis, name)
    weights = class_weights(weights, lay, logits.dtype, shape, name)
    options = dataclasses.replace(options, mask=mask_kind(where), vd=linear and logits.vd)
    dtype = accumulation_dtype(logits.dtype)
    described = f"{name} shape {shape} without axis {-1 if linear else axis}"
    example_weight = example_weights(example_weight, lay.batch_shape, dtype, described)
    num_classes = lay.num_classes
    if options.vocab_axis is not None:
        num_classes *= _sharding.num_shards(options.vocab_axis)
    facts = rows(options, labels, where, weights, num_classes, dtype, example_weight)
    if options.integer:
        in_range = (labels >= 0) & (labels < num_classes)
        labels = jnp.where(in_range, labels, -1).astype(jnp.int32)
        if options.vocab_axis is not None:
            # This shard's class ids: a label of another shard (or -1) is outside [0, V_local).
            labels = labels - _sharding.class_offset(options.vocab_axis, lay.num_classes)
    if linear:
        inputs = logits.inputs.reshape(lay.num_rows, logits.inputs.shape[-1])
        logits = dataclasses.replace(logits, inputs=inputs)
    else:
        logits = lay.to_rows(logits)
    return Problem(logits, labels, where, weights, temperature, facts), options, lay


def temperature(options: Options, problem: Problem, dtype=None):
    """The temperature ``T`` that every formula divides by: `Options`' Python float, or the
    array operand in ``dtype`` (the accumulation dtype by default), NaN where it is not
    positive, which makes every loss NaN (a value cannot raise under ``jit``)."""
    t = problem.temperature
    if t is None:
        return options.temperature
    t = t.astype(dtype or problem.accumulation_dtype)
    return jnp.where(t > 0, t, jnp.full((), np.nan, t.dtype))


def operands(options: Options, problem: Problem, **saved) -> _blocks.Operands:
    """The kernel operands of ``problem`` (and the backward's `_tile.Stats` fields and ``ct``,
    each ``[N, 1]``): two-dimensional, the ``where`` mask as int8 (``[N, V]``) or int32, the
    temperature resolved (`_canonical.temperature`); inside ``shard_map`` all varying over the
    same axes, so that the outputs can be typed like any of them."""
    dtype = problem.accumulation_dtype
    logits, rows = problem.logits, problem.rows
    fused = isinstance(logits, Linear)
    where = problem.where
    if where is not None:
        where = where.astype(jnp.int8 if options.mask == "full" else jnp.int32)
    bias = logits.bias if fused else None
    x = logits.inputs if fused else None
    if fused and "ct" in saved:
        # A row with a zero cotangent adds x_i^T 0 to the projection's gradient: NaN for NaN
        # inputs (an example that does not count, or of weight 0), unless x_i is 0. With
        # return_aux, a row whose auxiliary values have a cotangent has a gradient too.
        live = saved["ct"] != 0
        for name in ("aux_p", "aux_x", "aux_a", "aux_t"):
            if saved.get(name) is not None:
                live = live | (saved[name] != 0)
        x = jnp.where(live, x, jnp.zeros((), x.dtype))
    ops = _blocks.Operands(
        logits=None if fused else logits,
        x=x,
        w=logits.weight if fused else None,
        bias=None if bias is None else bias.astype(dtype)[None, :],
        labels=problem.labels[:, None] if options.integer else problem.labels,
        label_weight=rows.label_weight,
        where=where,
        class_weights=None if problem.class_weights is None else problem.class_weights[None, :],
        n_valid=rows.n_valid if saved and options.label_smoothing else None,
        temperature=None
        if problem.temperature is None
        else jnp.reshape(temperature(options, problem), (1, 1)),
        **saved,
    )
    return _blocks.Operands(*_blocks.vary_alike(list(ops)))


def finish_rows(options: Options, problem: Problem, state: _tile.RowState):
    """``(losses [N], stats)`` from the forward accumulators of every row (`_tile.finish`),
    losses 0 for examples that do not count; with ``options.aux``, ``((losses, aux), (stats,
    aux_rows))``: the `CrossEntropyAux` values (`aux_values`) and the `_tile.AuxRows` that
    their gradient needs."""
    rows = problem.rows
    loss, _, stats = _tile.finish(
        state,
        rows.label_weight,
        rows.n_valid,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    losses = jnp.where(rows.counted, loss, jnp.zeros((), loss.dtype))[:, 0]
    if not options.aux:
        return losses, stats
    aux = _tile.monitor_finish(state.lse, state.monitor)
    return (losses, aux_values(aux)), (stats, aux)


def aux_values(aux: _tile.AuxRows) -> CrossEntropyAux:
    """An implementation's per-example ``return_aux`` values, ``[N]`` each, from its
    `_tile.AuxRows` (the argmax as int32)."""
    tlp = aux.target_logprob
    return CrossEntropyAux(
        aux.lse[:, 0],
        aux.argmax[:, 0].astype(jnp.int32),
        aux.max_prob[:, 0],
        aux.entropy[:, 0],
        None if tlp is None else tlp[:, 0],
    )


def aux_gradient(problem: Problem, m: jax.Array, aux: _tile.AuxRows, ct) -> _tile.AuxGrad:
    """The coefficients of the auxiliary values' gradient (`_tile.AuxGrad`, ``[N, 1]`` each) for
    their cotangent ``ct`` (a `CrossEntropyAux` of ``[N]`` arrays; its argmax's is ignored),
    nonzero only in rows that count and have a finite valid logit (the row max ``m``)."""
    live = problem.rows.counted & (m != _tile.NEG_INF)
    dtype = m.dtype

    def column(x):
        return None if x is None else x.astype(dtype)[:, None]

    return _tile.aux_coefficients(
        aux,
        live,
        column(ct.lse),
        column(ct.max_prob),
        column(ct.entropy),
        column(ct.target_logprob),
    )


def unpack_saved(options: Options, problem: Problem, saved, cotangent):
    """``(stats, ct, aux_grad)`` of a backward rule: the saved `_tile.Stats`, the losses'
    cotangent and, with ``options.aux``, `aux_gradient` of the auxiliary values' cotangent
    (None without), from what `finish_rows` saved and the cotangent of its outputs. With a
    vocabulary axis its argmax is a class id of this shard's (the combined forward's is
    global), as the labels are, so that the block steps find its column."""
    if not options.aux:
        return saved, cotangent, None
    (stats, aux), (cotangent, aux_ct) = saved, cotangent
    grad = aux_gradient(problem, stats.m, aux, aux_ct)
    if options.vocab_axis is not None:  # the argmax's column among this shard's classes
        local = _sharding.local_ids(grad.argmax, options.vocab_axis, problem.num_classes)
        grad = grad._replace(argmax=local)
    return stats, cotangent, grad


def aux_operands(grad: _tile.AuxGrad) -> dict:
    """The backward kernels' operands of `aux_gradient`'s coefficients (empty without)."""
    if grad is None:
        return {}
    return {k: v for k, v in grad._asdict().items() if k != "total"}


def like_primal(grad, primal):
    """A gradient summed over the ``shard_map`` axes over which it varies and its primal does
    not: a replicated operand (a projection, an array temperature) used by every shard's rows
    gets the sum of the shards' contributions, as JAX's own transpose of the implicit
    broadcast gives. A ``custom_vjp`` rule must return it so."""
    extra = varying_axes(grad) - varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def temperature_gradient(terms, lse, ct, problem: Problem, options: Options, aux_total=None):
    """``dl/dT`` of the array temperature, typed like it: ``-(sum of terms + z-loss part) / T``.

    ``terms`` are the rows' `_tile.temperature_term` values (or their sum), already times the
    cotangent; the z-loss part ``2 z_loss ct lse**2`` of each row with a finite ``lse`` is the
    rest of ``sum_k g_k z'_k``, and with ``return_aux`` so is ``aux_total lse``, where
    ``aux_total`` (`_tile.AuxGrad.total`) is the sum over classes of the auxiliary values'
    gradient. ``lse``, ``ct`` and ``aux_total`` are per row, of one shape."""
    dtype = lse.dtype
    total = jnp.sum(terms)
    finite = jnp.isfinite(lse)
    if options.z_loss:
        lse2 = jnp.where(finite, lse, jnp.zeros((), dtype)) ** 2
        total = total + jnp.sum(jnp.where(finite, 2.0 * options.z_loss * ct * lse2, 0))
    if aux_total is not None:
        total = total + jnp.sum(weighted_finite(aux_total, lse))
    t = problem.temperature
    grad = (-total / temperature(options, problem, dtype)).astype(t.dtype)
    return like_primal(grad, t)


def temperature_cotangent(terms, stats, ct, problem: Problem, options: Options, aux_grad):
    """`temperature_gradient` from a backward rule's values: the rows' temperature ``terms``
    (summed over vocabulary shards already), the saved `_tile.Stats`, the rows' cotangent and
    `unpack_saved`'s ``aux_grad``; None without an array temperature."""
    if problem.temperature is None:
        return None
    lse = _tile.lse_of(stats.m, stats.r)
    aux_total = None if aux_grad is None else aux_grad.total
    return temperature_gradient(terms, lse, ct, problem, options, aux_total)


def weighted_finite(weight: jax.Array, value: jax.Array) -> jax.Array:
    """``weight * value`` where ``value`` is finite, else 0."""
    finite = jnp.isfinite(value)
    return jnp.where(finite, weight * jnp.where(finite, value, jnp.zeros((), value.dtype)), 0)


def scaled(weight: jax.Array, value: jax.Array) -> jax.Array:
    """``weight * value``, and 0 where ``weight`` is 0 even where ``value`` is not finite (a NaN
    loss); the derivative with respect to ``weight`` stays ``value`` wherever that is finite."""
    return weight * jnp.where(
        (weight == 0) & ~jnp.isfinite(value), jnp.zeros((), value.dtype), value
    )


def reduce(
    losses: jax.Array,
    counted: jax.Array,
    weights: jax.Array | None,
    *,
    example_weights: jax.Array | None = None,
    reduction: str,
    batch_shape: tuple[int, ...],
    dtype,
) -> jax.Array:
    """Applies the per-example weights and ``reduction`` to per-example losses ``[N]`` (already
    0 where an example does not count) and casts to the output ``dtype``.

    With ``example_weights`` ``u`` (``[N]``, None for 1 each) example ``i``'s loss is
    ``u_i l_i`` over the ``counted`` examples (``[N]`` bool), and 0 where ``u_i = 0``, even
    where ``l_i`` is NaN; the weight of an example that does not count is never read.
    ``"mean"`` is PyTorch's weighted mean ``sum_i u_i l_i / sum_i u_i c_i`` over the counted
    examples, with ``c_i`` from ``weights`` (``[N]``, the class weight of each integer label;
    None for 1 each); it is 0 when that denominator is 0.
    """
    losses = losses.astype(dtype)
    if example_weights is None:
        u = counted.astype(dtype)
    else:
        u = jnp.where(counted, example_weights.astype(dtype), jnp.zeros((), dtype))
        losses = scaled(u, losses)
    if reduction == "none":
        return losses.reshape(batch_shape)
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    c = u if weights is None else scaled(u, jnp.where(counted, weights.astype(dtype), 0))
    denominator = jnp.sum(c)
    nonzero = denominator != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, denominator, 1), jnp.zeros((), dtype))


def reduce_problem(losses, problem: Problem, options: Options, *, reduction, batch_shape, dtype):
    """`reduce` of a problem's per-example losses: the weighted mean divides by the label
    weights where there are class weights and integer labels, each times its example's weight
    where there are example weights."""
    rows = problem.rows
    weighted = options.integer and problem.class_weights is not None
    return reduce(
        losses,
        rows.counted[:, 0],
        rows.label_weight[:, 0] if weighted else None,
        example_weights=None if rows.example_weight is None else rows.example_weight[:, 0],
        reduction=reduction,
        batch_shape=batch_shape,
        dtype=dtype,
    )
