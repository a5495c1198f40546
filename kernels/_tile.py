"""The per-block math of softmax cross-entropy, written once.

Every implementation that is not the plain reference (the XLA `custom_vjp`, each Pallas kernel, the
fused linear loss) calls these functions on one block of logits ``z`` of shape ``[rows, cols]``.
Per-row values are column vectors of shape ``[rows, 1]``, so that the same code broadcasts in XLA
and in a kernel body. The XLA path is the case of a single block that spans the whole vocabulary.

Notation, per row: ``z'`` the transformed and masked logits (``-inf`` on invalid classes),
``a_k`` the weight of class ``k`` in the loss (``w_k q_k``), ``W = sum_k a_k``, ``m`` the running
max of ``z'``. The loss ``sum_k a_k (lse - z'_k)`` is accumulated as ``W log s - A`` with
``s = sum exp(z' - m)`` and ``A = sum_k a_k (z'_k - m)``: both parts are sums of terms of one
sign, so there is no cancellation of large numbers even for logits of magnitude 1e4.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -np.inf


def transform(z: jax.Array, *, softcap: float | None, temperature) -> jax.Array:
    """``z' = softcap(z) / T``; ``temperature`` is a Python float or a scalar array.

    Both divisions are multiplications by the reciprocal, written out: XLA turns ``x / t`` for a
    broadcast ``t`` into ``x * (1 / t)`` in some fusions and not in others, and the backward pass
    needs ``z'`` rounded exactly as the forward's row max was (``z' - m`` is exactly 0 at the
    max, where ``lse - z' = log1p(r)`` is tiny).

    Infinite logits stay as they are: a -inf logit is a class of probability 0 and a +inf logit
    makes the loss non-finite, with or without a softcap (``c tanh(z / c)`` alone would turn
    them into ``-c`` and ``c``). Only finite values enter the formula, so that none of its
    derivatives (in ``z`` or in an array ``T``) meets ``0 * inf``.
    """
    unit_temperature = isinstance(temperature, float) and temperature == 1.0
    if softcap is None and unit_temperature:
        return z
    infinite = jnp.abs(z) == np.inf
    finite = jnp.where(infinite, jnp.zeros((), z.dtype), z)
    if softcap is not None:
        finite = softcap * jnp.tanh(finite * (1.0 / softcap))
    if not unit_temperature:
        finite = finite * (1.0 / temperature)
    return jnp.where(infinite, z, finite)


def transform_vjp(z: jax.Array, g: jax.Array, *, softcap: float | None, temperature) -> jax.Array:
    """Chain rule of `transform`: ``g * dz'/dz`` for raw logits ``z`` and ``g = dl/dz'``; the
    softcap's derivative is taken as its limit 0 at an infinite logit."""
    if not (isinstance(temperature, float) and temperature == 1.0):
        g = g / temperature
    if softcap is not None:
        # 1 - tanh(x)**2 = 4 e / (1 + e)**2 with e = exp(-2 |x|): no cancellation where the cap
        # saturates, and only exp, which every Pallas backend lowers.
        e = jnp.exp(-2.0 * jnp.abs(z / softcap))
        # weighted: a zero g (a row that does not count) stays 0 at a NaN logit.
        g = weighted(g, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return g


def masked_transform(z: jax.Array, valid, *, softcap: float | None, temperature) -> jax.Array:
    """``z' = softcap(z) / T`` on valid classes, -inf elsewhere (``valid`` broadcasts to z)."""
    return jnp.where(valid, transform(z, softcap=softcap, temperature=temperature), NEG_INF)


def onehot_block(labels: jax.Array, col0, cols: int) -> jax.Array:
    """``[rows, cols]`` bool, True where the global class id ``col0 + j`` equals the row's label."""
    ids = col0 + jax.lax.broadcasted_iota(labels.dtype, (labels.shape[0], cols), 1)
    return ids == labels


def pick(labels: jax.Array, label_weight: jax.Array, col0, ok: jax.Array, z: jax.Array):
    """``(weight, z_pick)``, each ``[rows, 1]``: the label's weight and its ``z'`` where the
    label's class is in this block (columns ``col0 + [0, cols)``, ``ok`` True), else 0. A sum
    over the block, not a gather, so that every schedule forms it alike (Triton has no boolean
    reduction, nor a gather)."""
    hit = onehot_block(labels, col0, z.shape[1]) & ok
    zero = jnp.zeros((), z.dtype)
    z_pick = jnp.sum(jnp.where(hit, z, zero), axis=-1, keepdims=True)
    weight = jnp.sum(jnp.where(hit, label_weight.astype(z.dtype), zero), axis=-1, keepdims=True)
    return weight, z_pick


def label_target(labels: jax.Array, label_weight: jax.Array, col0, ok: jax.Array) -> jax.Array:
    """``[rows, cols]`` target weights ``w_t onehot(t)`` of integer labels ``[rows, 1]``, 0 where
    ``ok`` (``[rows or 1, cols]`` bool) is False."""
    hit = onehot_block(labels, col0, ok.shape[1]) & ok
    return jnp.where(hit, label_weight, jnp.zeros((), label_weight.dtype))


def smoothing_weights(valid, class_weights, dtype) -> jax.Array:
    """Weights of the uniform smoothing target in one block: ``w_k`` on valid classes, else 0."""
    w = jnp.ones((), dtype) if class_weights is None else class_weights.astype(dtype)
    return jnp.where(valid, w, jnp.zeros((), dtype))


class Lse(NamedTuple):
    """Running log-sum-exp of one row block: ``lse = m + log1p(r)``.

    ``r`` is the mass besides the max: the sum of ``exp(z' - m)`` over every class seen but one
    instance of the max (whose term is exactly 1), so that ``s = 1 + r`` and, where a confident
    prediction has ``p_max -> 1``, ``1 - p_max = r / s`` keep float32 relative accuracy: formed
    as ``1 - exp(z' - lse)`` instead, the rounding of a float32 ``lse`` of magnitude 30 (an ulp
    is 2e-6) would be the whole error of a gradient entry of 1e-4.

    Every use downstream holds for any reference point ``m`` that is one of the row's ``z'``
    (its own term exactly 1) with ``r`` finite: `_xla._lse_at_label` uses the label's ``z'``,
    and there ``r < 1`` only where the label is the row's strict max.
    """

    m: jax.Array  # [rows, 1] max of z' seen so far; -inf when no finite valid class yet
    r: jax.Array  # [rows, 1] sum of exp(z' - m) besides one instance of the max


class Term(NamedTuple):
    """A running weighted sum: ``w = sum_k a_k`` and ``a = sum_k a_k (z'_k - m)``."""

    w: jax.Array  # [rows, 1]
    a: jax.Array  # [rows, 1]


class Monitor(NamedTuple):
    """The running statistics behind ``return_aux`` (`AuxRows`), each ``[rows, 1]``.

    The entropy is ``log s - t / s`` with ``t = sum exp(z' - m) (z' - m)``: ``log s >= 0`` and
    ``-t / s >= 0``, a sum of two terms of one sign. The argmax is a float class id (exact below
    2**24), so that every leaf of the state has one dtype (the TPU kernels pack them).
    """

    t: jax.Array  # sum of exp(z' - m) (z' - m) over the classes seen
    index: jax.Array  # the lowest class id at the running max; -1 before any finite z'
    label: Term | None  # integer labels: (1 once the label's class was seen, z'_t - m)


class RowState(NamedTuple):
    """The forward accumulators of a row block, each ``[rows, 1]``."""

    lse: Lse
    target: Term
    smoothing: Term | None
    monitor: Monitor | None = None


def lse_init(rows: int, dtype) -> Lse:
    return Lse(jnp.full((rows, 1), NEG_INF, dtype), jnp.zeros((rows, 1), dtype))


def term_init(rows: int, dtype) -> Term:
    return Term(jnp.zeros((rows, 1), dtype), jnp.zeros((rows, 1), dtype))


def monitor_init(rows: int, dtype, integer: bool) -> Monitor:
    return Monitor(
        jnp.zeros((rows, 1), dtype),
        jnp.full((rows, 1), -1.0, dtype),
        term_init(rows, dtype) if integer else None,
    )


def row_state_init(
    rows: int, dtype, smoothing: bool, *, monitor: bool = False, integer: bool = True
) -> RowState:
    return RowState(
        lse_init(rows, dtype),
        term_init(rows, dtype),
        term_init(rows, dtype) if smoothing else None,
        monitor_init(rows, dtype, integer) if monitor else None,
    )


def massless_to_zero(m: jax.Array, r: jax.Array) -> jax.Array:
    """``r``, set to 0 where the max ``m`` is -inf (no finite valid logit), unless ``r`` is NaN.

    A max can skip a NaN: Triton's maximum drops NaNs (a row of NaNs alone has max -inf on a
    GPU), and so can XLA's vectorised max on CPU. ``r`` still holds the NaN (``exp(NaN)`` joins
    its sum), and it must reach the loss, whatever the row's weights, not pass for an empty row.
    """
    return jnp.where((m == NEG_INF) & ~jnp.isnan(r), jnp.zeros_like(r), r)


def reference_point(m: jax.Array) -> jax.Array:
    """The max, or 0 for a row with no finite valid logit, so that ``z' - ref`` is never NaN."""
    return jnp.where(m == NEG_INF, jnp.zeros_like(m), m)


def lse_merge(
    state: Lse, z: jax.Array, z_max: jax.Array | None = None, ties=None
) -> tuple[Lse, jax.Array, jax.Array]:
    """Online log-sum-exp update with one block ``z`` of masked, transformed logits.

    ``z_max`` is the block's row max when the caller already has it (the transform is monotone,
    so it may come from the raw logits). Returns the new state, the new reference point ``ref``
    (``[rows, 1]``) against which this block's terms are formed, and ``shift``, how far the
    reference moved since the last block.

    The mass besides the max never subtracts 1 from a sum near 1: this block's classes at the
    new max (whose terms would be exactly 1) are counted, not summed, and one of them (or the
    old max) is the instance left out. ``ties(ref)`` gives that count (``[rows, 1]``) where the
    caller forms it apart (`at_max_count`); else it is counted here. A NaN logit makes ``r``
    NaN, whether or not the max saw it.
    """
    if z_max is None:
        z_max = jnp.max(z, axis=-1, keepdims=True)
    m_new = jnp.maximum(state.m, z_max)
    ref = reference_point(m_new)
    if ties is None:
        at_max = z == ref  # never true without a finite max: z' is -inf then
        zero = jnp.zeros((), z.dtype)
        besides = jnp.sum(jnp.where(at_max, zero, jnp.exp(z - ref)), axis=-1, keepdims=True)
        count = jnp.sum(jnp.where(at_max, 1.0, zero), axis=-1, keepdims=True)
    else:
        # Arithmetic, not a select, which XLA on the CPU cannot fuse into a reduction: a factor
        # 1 below the max and 0 at it (`below_max`; NaN for a NaN logit stays in exp).
        x = z - ref
        besides = jnp.sum(jnp.exp(x) * _below_max_indicator(z, ref), axis=-1, keepdims=True)
        count = ties(ref)
    r = jnp.where(
        m_new > state.m,  # this block holds the max: the old mass joins the rest
        (1.0 + state.r) * exp_of_difference(state.m, ref) + besides + (count - 1.0),
        state.r + besides + count,
    )
    r = massless_to_zero(m_new, r)
    shift = jnp.where(state.m == NEG_INF, jnp.zeros_like(m_new), m_new - state.m)
    return Lse(m_new, r), ref, shift


def lse_besides_label(
    z: jax.Array, z_max: jax.Array, labels: jax.Array, z_label: jax.Array | None = None
) -> tuple[Lse, jax.Array]:
    """`Lse` of one block that spans the whole vocabulary, for integer ``labels`` (``[rows,
    1]``, class ids below 2**24); returns it and ``ref``.

    ``r = sum_k exp(z'_k - ref) - 1``, with the label's term left out of the sum and added per
    row as ``exp(z'_label - ref) - 1`` (``expm1``; -1 for a label outside ``[0, V)``): where the
    label is at the max (the case where ``r`` must keep relative accuracy), that is exactly 0
    and ``r`` is the sum of the other classes' terms alone; elsewhere the sum holds the max's 1.
    The label's column is left out by `sum_besides`, and ``r`` is that reduction's result, which
    XLA does not recompute in each element of the backward.

    ``z_label`` (``[rows, 1]``) must equal the block's ``z'`` at the label exactly wherever the
    label is at the max. Where the caller cannot promise that (a softcap's ``tanh`` on one value
    per row need not round as a vectorised ``tanh`` does), it passes None and the label's term
    stays in the sum as ``exp(z'_label - ref) - 1``, which XLA's CPU fuses less well: the whole
    float32 forward at ``[2048, 32768]`` took about 42 ms that way against 39 ms on 2 cores."""
    ref = reference_point(z_max)
    in_range = (labels >= 0) & (labels < z.shape[-1])
    if z_label is None:
        one = _one_per_row(ref)
        r = jnp.sum(jnp.exp(z - ref) + (_off_column(z, 0, labels, one) - one), -1, keepdims=True)
        r = jnp.where(in_range, r, r - 1.0)
    else:
        r = sum_besides(z, ref, 0, labels) + jnp.where(in_range, jnp.expm1(z_label - ref), -1.0)
    r = massless_to_zero(z_max, r)
    return Lse(z_max, r), ref


def _off_column(z: jax.Array, col0, column: jax.Array, one: jax.Array) -> jax.Array:
    """``min(|k - column|, 1)`` over the block's class ids ``k = col0 + j``: 0 at ``column``
    (``[rows, 1]``, ids below 2**24), else 1 (``one``, `_one_per_row`), in ``z``'s dtype."""
    cols = jax.lax.broadcasted_iota(z.dtype, z.shape, z.ndim - 1)
    # The block's first id folded into the column: one subtraction per row, not per class.
    return jnp.minimum(jnp.abs(cols - (column - col0).astype(z.dtype)), one)


def sum_besides(z: jax.Array, ref: jax.Array, col0, column: jax.Array) -> jax.Array:
    """``sum_k exp(z'_k - ref)`` over the block's classes ``k = col0 + j`` but ``column``
    (``[rows, 1]``, class ids below 2**24; one outside the block leaves none out), ``[rows, 1]``.

    The column is left out by a factor `_off_column`: arithmetic, not a select, so that XLA on
    the CPU fuses it into the one reduction (a select there took three times as long); a
    product, not ``min(exp(z' - ref), |k - column|)``, because XLA's CPU reductions take a min
    that drops a NaN."""
    off = _off_column(z, col0, column, _one_per_row(ref))
    return jnp.sum(jnp.exp(z - ref) * off, axis=-1, keepdims=True)


def lse_combine(a: Lse, b: Lse) -> tuple[Lse, jax.Array, jax.Array]:
    """Two running log-sum-exps over disjoint classes (two vocabulary shards) as one; returns it
    and how far each side's reference point moved (``shift_a``, ``shift_b``), as `lse_merge`'s
    ``shift``.

    The side that holds the max (``a`` on a tie) keeps its ``r``, the mass besides that one
    instance; the other side's whole mass ``1 + r`` joins it, moved to the new max with
    `exp_of_difference`. So ``r`` keeps the relative accuracy that `lse_merge` gives it."""
    m = jnp.maximum(a.m, b.m)
    ref = reference_point(m)
    a_top = a.m >= b.m
    r_a = jnp.where(a_top, a.r, (1.0 + a.r) * exp_of_difference(a.m, ref))
    r_b = jnp.where(a_top, (1.0 + b.r) * exp_of_difference(b.m, ref), b.r)
    r = massless_to_zero(m, r_a + r_b)

    def shift(side):
        return jnp.where(side.m == NEG_INF, jnp.zeros_like(m), m - side.m)

    return Lse(m, r), shift(a), shift(b)


def term_combine(a: Term, shift_a: jax.Array, b: Term, shift_b: jax.Array) -> Term:
    """Two running weighted sums over disjoint classes, each moved to the new reference."""
    return Term(a.w + b.w, (a.a - a.w * shift_a) + (b.a - b.w * shift_b))


def monitor_combine(
    a: Monitor, lse_a: Lse, shift_a: jax.Array, b: Monitor, lse_b: Lse, shift_b: jax.Array
) -> Monitor:
    """Two `Monitor` states of the same rows over disjoint classes as one, ``a``'s classes
    before ``b``'s: ``lse_a`` and ``lse_b`` are each side's `Lse`, ``shift_a`` and ``shift_b``
    how far `lse_combine` moved each side's reference. Both argmaxes are global class ids
    (`offset_argmax`).

    The side that holds the max (``a`` on a tie) keeps its ``t``; the other's moves to the new
    reference as in `monitor_merge`, ``exp(-shift) (t - shift s)``. The argmax is ``b``'s only
    where ``b``'s max is strictly greater, so among ties across the sides the lower class id
    is kept, as across blocks. The label's term merges like any `Term` (its ``found`` flags
    add up: one side at most holds the label's class)."""
    ref = reference_point(jnp.maximum(lse_a.m, lse_b.m))
    a_top = lse_a.m >= lse_b.m
    t = jnp.where(
        a_top,
        a.t + moved_entropy_term(b.t, lse_b, ref, shift_b),
        moved_entropy_term(a.t, lse_a, ref, shift_a) + b.t,
    )
    index = jnp.where(lse_b.m > lse_a.m, b.index, a.index)
    label = None if a.label is None else term_combine(a.label, shift_a, b.label, shift_b)
    return Monitor(t, index, label)


def moved_entropy_term(t: jax.Array, lse: Lse, ref: jax.Array, shift: jax.Array) -> jax.Array:
    """A `Monitor`'s ``t``, accumulated against the max of ``lse``, moved to the reference
    ``ref`` that is ``shift`` above it: ``exp(-shift) (t - shift s)`` (0 without mass), as
    across blocks (`monitor_merge`) and across shards (`monitor_combine`)."""
    s = jnp.where(lse.m != NEG_INF, 1.0 + lse.r, jnp.zeros_like(lse.r))
    return exp_of_difference(lse.m, ref) * (t - shift * s)


def offset_argmax(monitor: Monitor, col0) -> Monitor:
    """``monitor`` with its argmax counted from class ``col0`` (a vocabulary shard's first
    class, in the monitor's dtype), so that `monitor_combine` compares global class ids; -1
    (no finite ``z'`` seen) stays -1."""
    index = monitor.index
    return monitor._replace(index=jnp.where(index >= 0, index + col0, index))


def row_state_combine(a: RowState, b: RowState) -> RowState:
    """Two forward states of the same rows over disjoint classes (vocabulary shards, ``a``'s
    classes first) as one, as if one kernel had seen both: the cross-shard step of vocabulary
    parallelism, the same merge as `lse_merge`, `term_merge` and `monitor_merge` across
    blocks. The `Term` fields are formed against the running max; the `Monitor` (its argmax a
    global class id, `offset_argmax`) has its own rule, `monitor_combine`."""
    lse, shift_a, shift_b = lse_combine(a.lse, b.lse)
    target, smoothing = [
        None if x is None else term_combine(x, shift_a, y, shift_b)
        for x, y in ((a.target, b.target), (a.smoothing, b.smoothing))
    ]
    monitor = None
    if a.monitor is not None:
        monitor = monitor_combine(a.monitor, a.lse, shift_a, b.monitor, b.lse, shift_b)
    return RowState(lse, target, smoothing, monitor)


def exp_of_difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """``exp(a - b)`` for finite ``b`` (``a`` may be -inf), with ``a - b`` exact: its rounding
    error ``e`` (Knuth's two-sum) enters as ``exp(d) (1 + e)``. Where the max moves far (a
    confident row's label found late), ``a - b`` is of magnitude 50 and its rounding alone would
    be a relative error of 2e-6 in all the mass seen so far."""
    d = a - b
    b_part = d - a  # d = a + (-b) rounded; two-sum recovers what the rounding lost
    a_part = d - b_part
    error = (a - a_part) + (-b - b_part)
    error = jnp.where(a == NEG_INF, jnp.zeros_like(error), error)
    return jnp.exp(d) * (1.0 + error)


def below_max(z: jax.Array, ref: jax.Array) -> jax.Array:
    """``ceil(ref - z')`` for ``z' <= ref``: exactly 0 where ``z' = ref``, at least 1 (up to
    inf) below it, however close, and NaN for a NaN logit. (A device that flushes subnormals,
    as XLA's CPU does, sees a subnormal difference as 0, a tie.)

    Arithmetic that XLA on the CPU fuses into a reduction, as a select is not; and cheaper than
    ``sign(z' - ref)**2``, which XLA's CPU reductions do not vectorise: `first_at_max` over
    float32 ``[2048, 32768]`` took 69 ms with the sign and 23 ms with this on 2 cores."""
    return jnp.ceil(ref - z)


def _one_per_row(ref: jax.Array) -> jax.Array:
    """1 for each row of ``ref`` (``[rows, 1]``), formed from it rather than as a constant: XLA
    shares a broadcast constant between fusions and then materialises the reductions' operands
    at the logits' size (seen with labels that are constants, and with bfloat16 logits)."""
    return ref * 0.0 + 1.0


def _below_max_indicator(z: jax.Array, ref: jax.Array) -> jax.Array:
    """1 where ``z' < ref``, 0 where ``z' = ref`` (`below_max`, capped at `_one_per_row`)."""
    return jnp.minimum(below_max(z, ref), _one_per_row(ref))


def at_max_count(z: jax.Array, ref: jax.Array) -> jax.Array:
    """How many of a row's ``z'`` equal ``ref`` (``[rows, 1]``), in arithmetic that XLA on the
    CPU fuses into one reduction: ``V`` less the count below it, which is 0 without a finite
    max (``z' = -inf``). (``1 - sign(z' - ref)**2``, which XLA's CPU reductions do not
    vectorise, took twice the time.)"""
    return z.shape[-1] - jnp.sum(_below_max_indicator(z, ref), axis=-1, keepdims=True)


class Stats(NamedTuple):
    """What the backward pass needs of a row, each ``[rows, 1]``: its ``m`` and ``r``
    (`Lse`), the total target weight ``W = sum_k a_k`` and, for integer labels, ``W - a_t``,
    the weight of every target class but the label's (0 without smoothing), formed without
    subtracting the two."""

    m: jax.Array
    r: jax.Array
    w_total: jax.Array
    w_rest: jax.Array | None


def mass(m: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(has_mass, s, log s)`` of a row with ``s = 1 + r``: no mass where no valid logit is
    finite (``m = -inf``), and then ``s = 1``, ``log s = 0`` so that nothing downstream turns
    NaN. A NaN ``r`` (from a NaN or +inf logit, which the row max need not see: XLA's
    vectorised max on CPU can skip a NaN) counts as mass, so the NaN reaches the loss instead of
    passing for an empty row."""
    has_mass = (m != NEG_INF) | jnp.isnan(r)
    log_s = jnp.where(has_mass, jnp.log1p(jnp.where(has_mass, r, 0)), 0)
    return has_mass, 1.0 + r, log_s


def weighted(weight: jax.Array, value: jax.Array) -> jax.Array:
    """``weight * value``, and 0 wherever ``weight`` is 0, even where ``value`` is infinite (a
    class with logit -inf). The infinite value sits in the branch of the ``where`` that is not
    taken, which keeps derivatives of every order finite too: ``where(w != 0, w * v, 0)`` would
    have the derivative ``v = inf`` times a zero cotangent, NaN, in its untaken branch."""
    return weight * jnp.where(weight != 0, value, 0)


def weighted_sum(weights: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_k a_k x_k`` over the last axis, ``[rows, 1]``, for ``x <= 0`` (``z' - ref``) or
    -inf: a zero weight contributes 0, even at ``x = -inf``, and a nonzero one times -inf is
    -inf. Unlike `weighted`, a NaN ``x`` gives NaN even at a zero weight: a NaN ``z'`` makes
    its row's log-sum-exp NaN anyway.

    The same as a sum of `weighted`, in arithmetic rather than a select, which XLA on the CPU
    does not fuse into a reduction (it materialised an ``[N, V]`` float32 temporary): ``x`` is
    raised to a floor, ``-M`` where ``a_k = 0`` (``M = 2**127`` in float32, half the largest
    power of two), and ``-M - M = -inf`` (it overflows) where ``a_k`` is at least the smallest
    normal number in size. Its constants are of its own: XLA shares a broadcast constant (a 1,
    the lowest finite value of `entropy_term`) with other fusions, and then materialises it."""
    info = jnp.finfo(x.dtype)
    big = 2.0 ** (info.maxexp - 1)
    floor = jnp.maximum(jnp.abs(weights) * -(1.0 / info.tiny), -big) * big - big
    return jnp.sum(weights * jnp.maximum(x, floor), axis=-1, keepdims=True)


def dense_term(weights: jax.Array, z: jax.Array, ref: jax.Array) -> tuple[jax.Array, jax.Array]:
    """This block's ``(sum_k a_k, sum_k a_k (z'_k - ref))``; a zero weight contributes 0, even at
    ``z' = -inf`` (`weighted_sum`)."""
    return jnp.sum(weights, axis=-1, keepdims=True), weighted_sum(weights, z - ref)


def picked_term(
    weight: jax.Array, z_pick: jax.Array, ref: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`dense_term` for one class per row: ``weight`` and ``z_pick`` are ``[rows, 1]``."""
    return weight, weighted(weight, z_pick - ref)


def term_merge(term: Term, shift: jax.Array, w: jax.Array, a: jax.Array) -> Term:
    """Adds one block's ``(w, a)`` after moving the accumulated ``a`` to the new reference."""
    return Term(term.w + w, term.a - term.w * shift + a)


def dense_merge(term: Term, shift: jax.Array, weights, z: jax.Array, ref: jax.Array) -> Term:
    """`term_merge` of this block's `dense_term`; ``weights`` broadcast to ``z``."""
    return term_merge(term, shift, *dense_term(jnp.broadcast_to(weights, z.shape), z, ref))


def mix(label_smoothing: float, n_valid: jax.Array, target, smoothing):
    """``(1 - e) target + e / V_valid * smoothing``: how smoothing mixes any per-row or per-class
    quantity. Rows without valid classes get no smoothing mass."""
    if label_smoothing == 0.0:
        return target
    share = jnp.where(n_valid > 0, label_smoothing / jnp.maximum(n_valid, 1), 0)
    return (1.0 - label_smoothing) * target + share.astype(target.dtype) * smoothing


def log_mass(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(has_mass, log s)`` of a row's sum of exponentials ``s``.

    ``s = 0`` means no finite valid logit: no mass, and ``log s`` is set to 0 so that nothing
    downstream turns NaN. A NaN ``s`` (from a NaN or +inf logit, which the row max need not see:
    XLA's vectorised max on CPU can skip a NaN) counts as mass, so the NaN reaches the loss
    instead of passing for an empty row.
    """
    has_mass = s != 0
    return has_mass, jnp.where(has_mass, jnp.log(jnp.where(has_mass, s, 1)), 0)


def lse_of(m: jax.Array, r: jax.Array) -> jax.Array:
    """``lse = m + log1p(r)`` per row; -inf for a row without mass."""
    has_mass, _, log_s = mass(m, r)
    return jnp.where(has_mass, reference_point(m) + log_s, NEG_INF)


def row_loss(
    lse: Lse,
    target: Term,
    smoothing: Term | None,
    n_valid: jax.Array,
    *,
    label_smoothing: float,
    z_loss: float,
) -> tuple[jax.Array, jax.Array]:
    """Final per-row ``(loss, lse)``, both ``[rows, 1]``.

    ``loss = W log(s) - A + z_loss lse**2``; a row with no finite valid logit has ``lse = -inf``,
    and its loss is +inf when it puts weight on one of those classes, 0 otherwise. A NaN or +inf
    valid logit makes ``r``, and so the loss and lse, NaN, whatever the weights (`mass`).
    """
    has_mass, _, log_s = mass(lse.m, lse.r)
    lse_value = jnp.where(has_mass, reference_point(lse.m) + log_s, NEG_INF)
    w, a = target
    if smoothing is not None:
        w = mix(label_smoothing, n_valid, w, smoothing.w)
        a = mix(label_smoothing, n_valid, a, smoothing.a)
    loss = w * log_s - a
    if z_loss:
        loss = loss + jnp.where(has_mass, z_loss * lse_value * lse_value, 0)
    return loss, lse_value


def finish(
    state: RowState,
    label_weight: jax.Array | None,
    n_valid: jax.Array,
    *,
    label_smoothing: float,
    z_loss: float,
) -> tuple[jax.Array, jax.Array, Stats]:
    """``(loss, lse, stats)`` per row, each ``[rows, 1]``, from the forward accumulators.

    ``W = sum_k w_k q_k`` after smoothing is the total target weight that the backward pass
    needs; it is produced here, once, and saved (`Stats`). With integer labels (``label_weight``
    given) the target's total weight is the label's class weight itself, so that a label
    outside ``[0, V)`` (weight NaN, found in no block) gives a NaN loss, and ``W - a_t`` is the
    smoothing mass of the other valid classes, ``e / V_valid`` times their summed weights.
    """
    target = state.target if label_weight is None else Term(label_weight, state.target.a)
    loss, lse = row_loss(
        state.lse,
        target,
        state.smoothing,
        n_valid,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    )
    w_total = target.w
    w_rest = None if label_weight is None else jnp.zeros_like(label_weight)
    if state.smoothing is not None:
        w_total = mix(label_smoothing, n_valid, w_total, state.smoothing.w)
        if w_rest is not None:
            w_rest = mix(label_smoothing, n_valid, w_rest, state.smoothing.w - label_weight)
    rows = loss.shape
    stats = Stats(
        state.lse.m,
        state.lse.r,
        jnp.broadcast_to(w_total, rows),
        None if w_rest is None else jnp.broadcast_to(w_rest, rows),
    )
    return loss, lse, stats


def coefficient(total_weight, ref, log_s, *, z_loss: float):
    """``(c, 2 z_loss lse)`` of a row: ``c = W + 2 z_loss lse`` multiplies ``p`` in the gradient;
    the z-loss term is None without a z-loss, so that adding it is never a rounding."""
    if not z_loss:
        return total_weight, None
    z_term = 2.0 * z_loss * (ref + log_s)
    return total_weight + z_term, z_term


def grad_block(
    z: jax.Array,
    m: jax.Array,
    r: jax.Array,
    total_weight: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float,
    target=None,
    label_row: bool = False,
) -> jax.Array:
    """``dl/dz' = c p - a`` for one block, with ``c = W + 2 z_loss lse`` and
    ``p = exp(z' - m) / s``, ``s = 1 + r`` (`Lse`).

    At a class at the max of a confident row (``p_max > 1/2``, where ``p -> 1`` is possible), it
    is formed as ``(c - a) - c r / s``: ``1 - p = r / s`` keeps relative accuracy, and so does
    ``c - a`` wherever ``target = (hit, w_rest)`` gives it: at the label's column ``hit``
    (``[rows, cols]``), ``c - a_t = w_rest + 2 z_loss lse`` with ``w_rest = W - a_t``
    (`Stats`), which is exactly 0 without smoothing, and the z-loss term added, not recovered
    as ``c - W``. ``z`` are masked, transformed logits, ``m``, ``r`` and
    ``total_weight`` (``W``) are ``[rows, 1]``, ``weights`` (``a``) broadcast to ``z``. A row
    without mass has ``p = 0``.

    With ``label_row``, ``target = (hit, (confident, entry))`` gives the label column's value
    where the label is the max of a confident row (`label_entry`, formed once per row), and
    every other entry is ``c p - a``: for integer labels no other class can cancel beyond the
    size of its terms, and the elementwise pass (XLA's, over the whole vocabulary) has no
    per-class test of the max.
    """
    has_mass, s, log_s = mass(m, r)
    ref = reference_point(m)
    p = jnp.exp(z - ref) * (1.0 / s)  # one division per row, not per class
    coef, z_term = coefficient(total_weight, ref, log_s, z_loss=z_loss)
    if label_row:
        hit, (confident, entry) = target
        return jnp.where(hit & confident, entry, coef * p - weights)
    c_minus_a = coef - weights
    if target is not None:
        hit, w_rest = target
        c_minus_a = jnp.where(hit, w_rest if z_term is None else w_rest + z_term, c_minus_a)
    # Only where p_max > 1/2 (r < 1): below, 1 - r / s would cancel instead (a flat softmax over
    # 32k classes has r / s = 1 - 3e-5), and c p - a has nothing to cancel there.
    confident = (z == ref) & has_mass & (r < 1.0)
    # At the max p = 1 / s exactly, so r p is r / s (formed from p, which keeps both cases of
    # the select typed like z under an explicit sharding).
    return jnp.where(confident, c_minus_a - coef * (r * p), coef * p - weights)


def label_entry(
    z_label: jax.Array,
    m: jax.Array,
    r: jax.Array,
    total_weight: jax.Array,
    w_rest: jax.Array,
    *,
    z_loss: float,
) -> tuple[jax.Array, jax.Array]:
    """``(confident, entry)``, each ``[rows, 1]``: whether the label (whose ``z'`` is
    ``z_label``) is the max of a confident row, and there the label column's ``dl/dz'`` as
    `grad_block` forms it, ``(w_rest + 2 z_loss lse) - c r / s``, from the saved `Stats`."""
    has_mass, s, log_s = mass(m, r)
    ref = reference_point(m)
    coef, z_term = coefficient(total_weight, ref, log_s, z_loss=z_loss)
    rest = w_rest if z_term is None else w_rest + z_term
    confident = (z_label == ref) & has_mass & (r < 1.0)
    return confident, rest - coef * (r / s)


def temperature_term(z: jax.Array, g: jax.Array, m: jax.Array, log_s: jax.Array) -> jax.Array:
    """``sum_k g_k (z'_k - lse)`` per row (``[rows, 1]``), the part of ``sum_k g_k z'_k`` that
    needs the logits, with ``z'_k - lse`` formed as ``(z'_k - m) - log s``; `grad_block` makes
    ``sum_k g_k = 2 z_loss lse``, which gives the rest."""
    return jnp.sum(weighted(g, (z - reference_point(m)) - log_s), axis=-1, keepdims=True)


def label_grad_block(z: jax.Array, m: jax.Array, log_s: jax.Array, valid, scale) -> jax.Array:
    """``dl/dy_k = scale_k (lse - z'_k)`` on valid classes, formed as ``log s - (z'_k - m)``,
    with ``scale = (1 - e) w_k`` times the cotangent (broadcast to ``z``); 0 on invalid classes
    and wherever ``scale_k = 0``, also at a ``-inf`` logit, where ``lse - z'_k`` is +inf (0 times
    inf would be NaN)."""
    g = weighted(scale, log_s - (z - reference_point(m)))
    return g if valid is None else jnp.where(valid, g, 0)


# ----------------------------------------------------------------------------- return_aux


def first_at_max(z: jax.Array, z_max: jax.Array, col0, *, float_ids: bool = False) -> jax.Array:
    """``[rows, 1]``: the lowest class id ``col0 + j`` of the block whose ``z'`` equals ``z_max``
    (finite, or the reference point 0 of a row without a finite ``z'``), as a float in ``z``'s
    dtype; ``2**24`` or more where none does.

    A min over ``id + 2**24 below_max(z', z_max)``, arithmetic rather than a select or an
    argmax: XLA on the CPU fuses it into the reduction (a select there would be materialised as
    an ``[N, V]`` temporary), and every schedule forms it alike. ``float_ids`` makes the ids a
    float iota, which XLA on the CPU fuses (a converted int32 iota it materialises); the
    kernels' backends make only integer iotas."""
    if float_ids:
        ids = col0 + jax.lax.broadcasted_iota(z.dtype, z.shape, z.ndim - 1)
    else:
        ids = (col0 + jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)).astype(z.dtype)
    return jnp.min(ids + NOT_AT_MAX * below_max(z, z_max), axis=-1, keepdims=True)


# Added to the class id of a class below the max in `first_at_max`: above every class id that
# the accumulation dtype holds exactly.
NOT_AT_MAX = float(2**24)


def entropy_term(z: jax.Array, ref: jax.Array) -> jax.Array:
    """``sum exp(z' - ref) (z' - ref)`` of one block, ``[rows, 1]``, with ``z' <= ref``: 0 at
    ``z' = -inf`` (``z' - ref`` is raised to the dtype's lowest finite value, where ``exp`` is
    0 anyway). Arithmetic, not a select, so that XLA on the CPU fuses it into the reduction."""
    x = z - ref
    lowest = jnp.finfo(z.dtype).min
    return jnp.sum(jnp.exp(x) * jnp.maximum(x, lowest), axis=-1, keepdims=True)


def monitor_merge(
    monitor: Monitor, old: Lse, new: Lse, z: jax.Array, ref, shift, col0, label=None
) -> Monitor:
    """`Monitor` after merging one block of masked, transformed logits ``z``: ``old`` and
    ``new`` are the `Lse` before and after `lse_merge` of this block, which returned ``ref`` and
    ``shift``; ``label`` is ``(found, z_pick)`` of `pick` with a unit weight (integer labels).

    The accumulated ``t`` moves to the new reference as
    ``exp(-shift) (t - shift s_old)``. The argmax moves only where this block's max is strictly
    greater than every earlier one, so among ties the lowest class id (blocks come in order of
    their columns) is kept."""
    t = moved_entropy_term(monitor.t, old, ref, shift) + entropy_term(z, ref)
    index = jnp.where(new.m > old.m, first_at_max(z, new.m, col0), monitor.index)
    label_term = monitor.label
    if label is not None:
        found, z_pick = label
        label_term = term_merge(label_term, shift, *picked_term(found, z_pick, ref))
    return Monitor(t, index, label_term)


class AuxRows(NamedTuple):
    """``return_aux``'s per-row values, each ``[rows, 1]`` in the accumulation dtype, and what
    their gradient needs: ``argmax`` is a float class id (-1 for a row without a finite valid
    logit), ``mean_x = E_p[z'] - m`` (``t / s``)."""

    lse: jax.Array
    argmax: jax.Array
    max_prob: jax.Array
    entropy: jax.Array
    target_logprob: jax.Array | None
    mean_x: jax.Array


def monitor_finish(lse: Lse, monitor: Monitor) -> AuxRows:
    """`AuxRows` from the accumulators. A row without a finite valid logit has ``lse = -inf``,
    ``argmax = -1`` and 0 for ``max_prob`` and the entropy, and ``target_logprob = -inf``; a label
    found in no block (outside ``[0, V)``) gives a NaN ``target_logprob``. The argmax is at the
    max, so its probability is ``1 / s`` exactly."""
    has_mass, s, log_s = mass(lse.m, lse.r)
    zero = jnp.zeros_like(lse.r)
    mean_x = jnp.where(has_mass, monitor.t / s, zero)
    index = jnp.where(has_mass & (monitor.index < NOT_AT_MAX), monitor.index, -1.0)
    target_logprob = None
    if monitor.label is not None:
        found, z_label = monitor.label
        target_logprob = jnp.where(has_mass, z_label - log_s, NEG_INF)
        target_logprob = jnp.where(found > 0, target_logprob, np.nan)
    return AuxRows(
        jnp.where(has_mass, reference_point(lse.m) + log_s, NEG_INF),
        index,
        jnp.where(has_mass, 1.0 / s, zero),
        jnp.where(has_mass, log_s - mean_x, zero),
        target_logprob,
        mean_x,
    )


class AuxGrad(NamedTuple):
    """Per-row coefficients (``[rows, 1]``) of the gradient of ``return_aux``'s float values with
    respect to ``z'``: ``aux_p p + aux_x p (z' - m)``, plus ``aux_a`` at the argmax's column and
    ``aux_t`` at the label's (`aux_grad_block`). ``total = sum_k dl/dz'_k``, the lse's
    cotangent, which an array temperature's gradient needs."""

    aux_p: jax.Array
    aux_x: jax.Array
    aux_a: jax.Array
    aux_t: jax.Array | None
    argmax: jax.Array
    total: jax.Array


def aux_coefficients(aux: AuxRows, live, d_lse, d_max_prob, d_entropy, d_target_logprob):
    """`AuxGrad` of rows with values ``aux`` (`AuxRows`) and the cotangents of each field
    (``[rows, 1]``; ``d_target_logprob`` None for probability labels), 0 where ``live`` is False
    (rows that do not count or have no finite valid logit).

    With ``p = softmax(z')`` and ``a`` the argmax: ``d lse = p``, ``d max_prob = p_a (onehot_a -
    p)``, ``d entropy = p (E_p[z'] - z')`` and ``d target_logprob = onehot_t - p``.
    """
    zero = jnp.zeros_like(d_lse)
    at_argmax = d_max_prob * aux.max_prob
    coef_p = d_lse - at_argmax + d_entropy * aux.mean_x
    if d_target_logprob is not None:
        coef_p = coef_p - d_target_logprob

    def only(x):
        return None if x is None else jnp.where(live, x, zero)

    return AuxGrad(
        only(coef_p),
        only(-d_entropy),
        only(at_argmax),
        only(d_target_logprob),
        aux.argmax,
        only(d_lse),
    )


def aux_grad_block(z, m, r, col0, hit, aux_p, aux_x, aux_a, aux_t, argmax) -> jax.Array:
    """``[rows, cols]``: the gradient with respect to the block ``z`` of masked, transformed
    logits of ``return_aux``'s values, from the coefficients of `AuxGrad` (``aux_t`` None and
    ``hit`` unused for probability labels; ``hit`` the label's column where valid). 0 in every row
    whose coefficients are all 0, whatever its logits."""
    _, s, _ = mass(m, r)
    x = z - reference_point(m)
    p = jnp.exp(x) * (1.0 / s)
    g = weighted(p, aux_p + aux_x * x)
    ids = col0 + jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
    zero = jnp.zeros((), z.dtype)
    g = g + jnp.where(ids.astype(z.dtype) == argmax, aux_a, zero)
    live = (aux_p != 0) | (aux_x != 0) | (aux_a != 0)
    if aux_t is not None:
        g = g + jnp.where(hit, aux_t, zero)
        live = live | (aux_t != 0)
    return jnp.where(live, g, zero)
