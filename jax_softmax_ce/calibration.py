"""Class weighting and calibration: balanced class weights, the expected calibration error, the
data of a reliability diagram, and temperature scaling fitted with the fused ``temperature=``."""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _binning, _canonical, _options
from jax_softmax_ce._util import accumulation_dtype
from jax_softmax_ce.cross_entropy import (
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jax_softmax_ce.kernels import _tile


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive Python int, got {value!r}")
    return int(value)


def _check_integer_labels(labels) -> jax.Array:
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class ids, got {labels.dtype} with shape {labels.shape}"
        )
    return labels


def inverse_frequency_weights(
    labels: jax.typing.ArrayLike,
    num_classes: int,
    *,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    r"""Balanced class weights, inversely proportional to how often each class occurs.

    With ``n_k`` the number of counted labels equal to ``k`` and ``N = sum_k n_k``,

    .. math::
      w_k = \frac{N}{V \, n_k} \quad (n_k > 0), \qquad w_k = 0 \quad (n_k = 0),

    scikit-learn's ``compute_class_weight("balanced", classes=np.arange(V), y=...)`` when every
    class occurs. A class that never occurs gets 0 (scikit-learn raises there), and the others
    keep the factor ``N / (V n_k)`` with ``V`` counting every class, so they are not rescaled to
    make up for it. Labels equal to ``ignore_index`` and labels where ``where`` is False are
    not counted (neither in ``n_k`` nor in ``N``). A label outside ``[0, num_classes)`` that is
    not ``ignore_index`` (and not masked by ``where``) makes every weight NaN: ``N`` is then
    unknown, and a value cannot raise under ``jit``. The result feeds ``class_weights=`` of
    the cross-entropy directly (with the same ``ignore_index``); with ``reduction="mean"`` every
    class then carries the same total weight.

    Args:
      labels: Integer class ids, any shape, e.g. ``[batch_size]``.
      num_classes: ``V``, a positive Python int (the length of the result).
      where: Boolean mask of the labels to count, broadcastable to ``labels.shape``.
      ignore_index: A label value that is not counted (PyTorch uses -100), or None.

    Returns:
      ``[num_classes]`` weights in the default floating dtype (float64 with ``jax_enable_x64``,
      float32 otherwise).

    Raises:
      TypeError: labels that are not integers, or an ``ignore_index`` that is not an int.
      ValueError: a bad ``num_classes``, or a ``where`` that does not broadcast to the labels.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> labels = jnp.array([0, 0, 0, 1, 2, 2])
      >>> print(sce.inverse_frequency_weights(labels, 4).round(4))
      [0.5  1.5  0.75 0.  ]
      >>> labels = jnp.array([0, 0, 0, 1, -100, 2, 2])
      >>> print(sce.inverse_frequency_weights(labels, 4, ignore_index=-100).round(4))
      [0.5  1.5  0.75 0.  ]
      >>> print(sce.inverse_frequency_weights(labels, 4))
      [nan nan nan nan]

    References:
      King and Zeng, `Logistic Regression in Rare Events Data
      <https://gking.harvard.edu/files/0s.pdf>`_, 2001 (the "balanced" heuristic).
    """
    labels = _check_integer_labels(labels)
    num_classes = _positive_int("num_classes", num_classes)
    options = _options.make_options(ignore_index=ignore_index)
    dtype = jnp.result_type(float)
    flat = labels.reshape(-1)
    rows = _canonical.rows(options, flat, None, None, num_classes, dtype)
    counted = rows.counted[:, 0]  # not ignored
    if where is not None:
        where = jnp.asarray(where)
        if not _canonical.broadcasts_to(where.shape, labels.shape):
            raise ValueError(
                f"where shape {where.shape} does not broadcast to labels shape {labels.shape}"
            )
        counted = counted & jnp.broadcast_to(where.astype(jnp.bool_), labels.shape).reshape(-1)
    # The label weight is 1 in [0, V) and NaN outside: N is NaN when such a label counts.
    total = jnp.sum(jnp.where(counted, rows.label_weight[:, 0], 0))
    counts = jnp.zeros((num_classes,), dtype).at[flat].add(counted.astype(dtype), mode="drop")
    present = counts > 0
    weights = jnp.where(present, total / (num_classes * jnp.where(present, counts, 1)), 0)
    return jnp.where(jnp.isnan(total), total, weights)


class ReliabilityDiagram(NamedTuple):
    """Per-bin statistics of the top-label confidence, for plotting.

    Attributes:
      bin_edges: ``[num_bins + 1]`` edges ``i / num_bins``; bin ``i`` is
        ``(bin_edges[i], bin_edges[i + 1]]``.
      confidence: ``[num_bins]`` mean top-label probability of the examples in each bin (0 for
        an empty bin).
      accuracy: ``[num_bins]`` fraction of those examples whose top label is correct (0 for an
        empty bin).
      count: ``[num_bins]`` int32 number of examples in each bin.
    """

    bin_edges: jax.Array
    confidence: jax.Array
    accuracy: jax.Array
    count: jax.Array


def _bin_sums(logits, labels, num_bins, where, ignore_index):
    """``(edges, count, confidence_sum, correct_sum)`` per bin of the top-label confidence; the
    count is int32, the rest in the accumulation dtype."""
    num_bins = _binning.check_num_bins(num_bins)
    logits = _canonical.check_logits(logits)
    labels = _check_integer_labels(labels)
    options = _options.make_options(ignore_index=ignore_index)
    problem, _, _ = _canonical.canonicalise(logits, labels, -1, where, None, None, options)
    dtype = problem.accumulation_dtype
    z = problem.logits.astype(dtype)
    if problem.where is not None:
        z = jnp.where(problem.where, z, _tile.NEG_INF)
    m = jnp.max(z, axis=1, keepdims=True)
    s = jnp.sum(jnp.exp(z - _tile.reference_point(m)), axis=1)
    # A NaN or +inf logit makes s NaN: counted, so the NaN reaches the result. Ignored and fully
    # masked examples do not count.
    counted = (s != 0) & problem.rows.counted[:, 0]
    confidence = jnp.where(counted, 1.0 / jnp.where(counted, s, 1), 0)  # max_k p_k = 1 / s
    # A label outside [0, V) (label weight NaN) is neither right nor wrong: its correctness is
    # NaN. A select, not hit * label_weight, which XLA simplifies to a select that drops the NaN.
    hit = jnp.argmax(z, axis=1).astype(problem.labels.dtype) == problem.labels
    label_weight = problem.rows.label_weight[:, 0]
    correct = jnp.where(jnp.isnan(label_weight), label_weight, hit.astype(dtype))
    edges, bins = _binning.confidence_bins(confidence, num_bins)

    def per_bin(x):
        return _binning.sum_per_bin(jnp.where(counted, x, 0), bins, num_bins)

    count = per_bin(jnp.ones(confidence.shape, jnp.int32))
    return edges, count, per_bin(confidence), per_bin(correct)


def reliability_diagram_data(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_bins: int = 15,
    *,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
) -> ReliabilityDiagram:
    r"""Per-bin confidence, accuracy and count of the top-label predictions, for a reliability
    diagram.

    The top-label confidence ``c_i = max_k softmax(z_i)_k`` falls in bin ``b`` when
    ``c_i`` is in :math:`(b / M, (b + 1) / M]`; then, over the examples :math:`B_b` of that bin,

    .. math::
      \mathrm{conf}_b = \frac{1}{|B_b|} \sum_{i \in B_b} c_i , \qquad
      \mathrm{acc}_b = \frac{1}{|B_b|} \sum_{i \in B_b} [\arg\max_k z_{ik} = t_i] .

    An empty bin has count 0 and confidence and accuracy 0 (filter on ``count > 0`` to plot).
    Examples that do not count are in no bin: a label equal to ``ignore_index``, and a fully
    masked example (whatever its label). A value cannot raise under ``jit``, so a NaN marks
    what would otherwise be silently wrong: an example with a NaN or +inf logit is counted, with
    a NaN confidence, in the last bin; an example with a label outside ``[0, V)`` that is not
    ``ignore_index`` is counted in the bin of its confidence with a NaN correctness, so that
    bin's accuracy is NaN (its count and confidence are as usual).

    Args:
      logits: ``[batch_size, num_classes]`` logits (the class axis last, any batch shape).
      labels: Integer class ids, shape ``logits.shape[:-1]``.
      num_bins: ``M``, the number of equal-width bins, a positive Python int.
      where: Boolean mask of the valid classes, broadcast against ``logits``; a mask of the rank
        of the batch shape masks whole examples.
      ignore_index: A label value whose examples do not count (PyTorch uses -100), or None.

    Returns:
      A `ReliabilityDiagram` of ``[num_bins]`` arrays (and ``[num_bins + 1]`` edges).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[3.0, 0.0], [0.2, 0.0], [0.0, 2.0], [1.0, 0.0]])
      >>> diagram = sce.reliability_diagram_data(logits, jnp.array([0, 1, 1, 1]), num_bins=4)
      >>> print(diagram.count, diagram.accuracy, diagram.confidence.round(4))
      [0 0 2 2] [0. 0. 0. 1.] [0.     0.     0.6404 0.9167]

    References:
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, 2017.
    """
    edges, count, confidence_sum, correct_sum = _bin_sums(
        logits, labels, num_bins, where, ignore_index
    )
    nonempty = count > 0
    denominator = jnp.where(nonempty, count, 1).astype(confidence_sum.dtype)
    return ReliabilityDiagram(
        bin_edges=edges,
        confidence=jnp.where(nonempty, confidence_sum / denominator, 0),
        accuracy=jnp.where(nonempty, correct_sum / denominator, 0),
        count=count,
    )


def expected_calibration_error(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_bins: int = 15,
    *,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    r"""Top-label expected calibration error (ECE) with equal-width bins.

    With the bins of `reliability_diagram_data` and ``N`` counted examples,

    .. math::
      \mathrm{ECE} = \sum_{b=1}^{M} \frac{|B_b|}{N}
        \left| \mathrm{acc}_b - \mathrm{conf}_b \right| ,

    computed from per-bin sums, so empty bins contribute 0 and never a NaN. An example whose
    label equals ``ignore_index`` does not count (it is in no bin and not in ``N``), nor does a
    fully masked one. The ECE is 0 when no example counts, and NaN when a counted example has a
    NaN or +inf logit, or a label outside ``[0, V)`` that is not ``ignore_index`` (a value cannot
    raise under ``jit``; such a label is never silently counted as wrong or dropped). The
    gradient with respect to the logits flows through the confidences.

    Args:
      logits: ``[batch_size, num_classes]`` logits (the class axis last, any batch shape).
      labels: Integer class ids, shape ``logits.shape[:-1]``.
      num_bins: ``M``, the number of equal-width bins ``(i / M, (i + 1) / M]``.
      where: Boolean mask of the valid classes, broadcast against ``logits``; a mask of the rank
        of the batch shape masks whole examples.
      ignore_index: A label value whose examples do not count (PyTorch uses -100), or None.

    Returns:
      A scalar in ``[0, 1]``, float32 for 16-bit and float32 logits, float64 for float64 logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[3.0, 0.0], [0.2, 0.0], [0.0, 2.0], [1.0, 0.0]])
      >>> labels = jnp.array([0, 1, 1, 1])
      >>> print(sce.expected_calibration_error(logits, labels, num_bins=4).round(4))
      0.3619

    References:
      Naeini et al., `Obtaining Well Calibrated Probabilities Using Bayesian Binning
      <https://ojs.aaai.org/index.php/AAAI/article/view/9602>`_, 2015.
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, 2017.
    """
    _, count, confidence_sum, correct_sum = _bin_sums(logits, labels, num_bins, where, ignore_index)
    return _binning.calibration_gap(count, confidence_sum, correct_sum)


_MAX_NEWTON_STEPS = 50
_LOG_T_BOUND = 10.0


class TemperatureFit(NamedTuple):
    """How `fit_temperature` ended, returned beside the temperature with ``return_info=True``.

    Attributes:
      at_bound: bool scalar, True when the temperature is an end, ``e^10`` or ``e^-10``, of the
        interval it is kept in: the NLL kept falling towards that end (no minimiser inside), so
        the value is where the search stopped, not a fit. False for a NaN temperature.
      converged: bool scalar, True when the last Newton step in ``log T`` was at most
        ``sqrt(eps)``. False when the 50 steps ran out (typically at a bound, or where the NLL
        is flat to working precision, as in the ``T -> 0`` case of `fit_temperature`), and for
        a NaN temperature.
    """

    at_bound: jax.Array
    converged: jax.Array


def fit_temperature(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    return_info: bool = False,
) -> jax.Array | tuple[jax.Array, TemperatureFit]:
    r"""The temperature ``T > 0`` that minimises the mean negative log-likelihood of ``z / T``.

    .. math::
      T^\star = \arg\min_{T > 0} \frac{1}{N} \sum_i \ell_\mathrm{CE}(z_i / T, t_i) ,

    found by safeguarded Newton steps on ``u = log T`` (each step at most a factor ``e`` in ``T``,
    a gradient step where the curvature is not positive), to a step below ``sqrt(eps)``; the
    loss is our cross-entropy with the fused ``temperature=`` option and an array temperature,
    whose gradient is exact, and the curvature is its grad-of-grad (forward mode is not
    available through the ``custom_vjp``). When no minimiser exists because every counted
    example is already classified correctly, the NLL keeps falling as ``T -> 0``, and the
    result is a small ``T`` at which the NLL and its slope are 0 to working precision.

    ``T`` is kept in ``[e^-10, e^10]``. When the NLL keeps falling towards an end of that
    interval, the result is that end (``e^10`` or ``e^-10`` to the precision of the result's
    dtype), which is not a fit. It happens to logits that carry no information about the
    labels: logits that predict them worse than the uniform distribution at every temperature
    give ``e^10``, and constant logits, whose NLL does not depend on ``T``, give either end, as
    rounding has it. Pass ``return_info=True`` to detect it: the result is then ``(T, info)``,
    and ``info.at_bound`` is True exactly when ``T`` is such an end (see `TemperatureFit`).

    Examples that do not count are left out of the fit, as in the loss with
    ``reduction="mean"``: a label equal to ``ignore_index`` and a fully masked example. The
    result is 1 when no example counts. It is NaN, never a finite value, when the mean NLL is
    NaN or +inf: an integer label outside ``[0, V)`` that is not ``ignore_index`` (a value cannot
    raise under ``jit``), a NaN or +inf logit, or a target on a class of probability 0.

    The gradient of ``T*`` with respect to the logits is the implicit-function gradient
    ``-(d^2 L / du dz) / (d^2 L / du^2)``, obtained from one last Newton step whose curvature is
    held constant; the iterations themselves are not differentiated.

    Args:
      logits: ``[batch_size, num_classes]`` logits (the class axis last, any batch shape).
      labels: Integer class ids of shape ``logits.shape[:-1]``, or probabilities of the shape
        of ``logits``.
      where: Boolean mask of the valid classes, broadcast against ``logits``; a mask of the rank
        of the batch shape leaves whole examples out.
      ignore_index: A label value whose examples do not count (integer labels only), or None.
      return_info: Also return a `TemperatureFit` (a Python bool).

    Returns:
      The scalar temperature, float32 for 16-bit and float32 logits, float64 for float64 logits;
      with ``return_info=True``, the pair ``(temperature, info)``. Divide the logits by it (or
      pass it as ``temperature=``) to calibrate them.

    Raises:
      ValueError: ``ignore_index`` with probability labels.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = 3.0 * jnp.array([
      ...     [2.0, 0.0, -1.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.5], [1.0, -1.0, 0.0], [0.0, 2.0, 0.5]
      ... ])
      >>> labels = jnp.array([0, 2, 2, 1, 1])
      >>> temperature = sce.fit_temperature(logits, labels)
      >>> print(f"{temperature:.4f}")
      4.6300
      >>> wrong = jnp.argmin(logits, axis=-1)  # every prediction wrong: the NLL falls as T grows
      >>> temperature, info = sce.fit_temperature(logits, wrong, return_info=True)
      >>> print(f"{temperature:.1f}", info.at_bound, info.converged)
      22026.5 True False

    References:
      Guo et al., `On Calibration of Modern Neural Networks
      <https://arxiv.org/abs/1706.04599>`_, 2017.
    """
    logits = _canonical.check_logits(logits)
    labels = jnp.asarray(labels)
    integer = bool(jnp.issubdtype(labels.dtype, jnp.integer))
    if ignore_index is not None and not integer:
        raise ValueError(
            f"ignore_index applies to integer labels only, got labels of dtype {labels.dtype} "
            f"and shape {labels.shape}"
        )
    ignore_index = _options.make_options(ignore_index=ignore_index).ignore_index
    temperature, info = _fit_temperature(
        logits, labels, where, integer=integer, ignore_index=ignore_index
    )
    return (temperature, info) if return_info else temperature


@functools.partial(jax.jit, static_argnames=("integer", "ignore_index"))
def _fit_temperature(
    logits, labels, where, *, integer: bool, ignore_index: int | None
) -> tuple[jax.Array, TemperatureFit]:
    if integer:
        loss = functools.partial(
            softmax_cross_entropy_with_integer_labels, ignore_index=ignore_index
        )
    else:
        loss = softmax_cross_entropy
    dtype = accumulation_dtype(logits.dtype)

    def mean_nll(log_t, logits, labels):
        return loss(logits, labels, where=where, temperature=jnp.exp(log_t), reduction="mean")

    slope = jax.grad(mean_nll)
    slope_and_curvature = jax.value_and_grad(slope)
    fixed = (jax.lax.stop_gradient(logits), jax.lax.stop_gradient(labels))
    tolerance = float(np.sqrt(np.finfo(dtype).eps))

    def newton_step(log_t):
        g, h = slope_and_curvature(log_t, *fixed)
        step = jnp.where(h > 0, -g / jnp.where(h > 0, h, 1), -jnp.sign(g))
        step = jnp.clip(step, -1.0, 1.0)
        return jnp.clip(log_t + step, -_LOG_T_BOUND, _LOG_T_BOUND), step

    def not_converged(state):
        i, _, step = state
        return (i < _MAX_NEWTON_STEPS) & (jnp.abs(step) > tolerance)

    def body(state):
        i, log_t, _ = state
        return (i + 1, *newton_step(log_t))

    start = (0, jnp.zeros((), dtype), jnp.full((), np.inf, dtype))
    _, log_t, last_step = jax.lax.while_loop(not_converged, body, start)
    log_t = jax.lax.stop_gradient(log_t)
    # The last Newton step, with the curvature held constant: exact in value (the slope is ~0)
    # and carrying the implicit-function gradient to the logits and probability labels.
    curvature = jax.lax.stop_gradient(slope_and_curvature(log_t, *fixed)[1])
    at_bound = jnp.abs(log_t) >= _LOG_T_BOUND
    interior = (curvature > 0) & ~at_bound
    step = -slope(log_t, logits, labels) / jnp.where(interior, curvature, 1)
    temperature = jnp.exp(log_t + jnp.where(interior, step, 0)).astype(dtype)
    # A NaN or +inf NLL has no minimiser: NaN, whatever the iterations and clamps made of it.
    finite = jnp.isfinite(mean_nll(log_t, *fixed))
    temperature = jnp.where(finite, temperature, jnp.full((), np.nan, dtype))
    converged = finite & (jnp.abs(last_step) <= tolerance)
    return temperature, TemperatureFit(at_bound=finite & at_bound, converged=converged)
