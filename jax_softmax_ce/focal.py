"""The multi-class (softmax) focal loss, on the canonical ``[N, V]`` layout, in log space."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical, _options
from jax_softmax_ce._util import accumulation_dtype, weighted_term
from jax_softmax_ce.cross_entropy import (
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jax_softmax_ce.kernels import _tile


def _log_softmax_and_complement(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log p, log(1 - p))`` of masked logits ``z`` (``[N, V]``, -inf on invalid classes).

    Every class but the row's top one has ``p_k <= 1/2``, so ``log1p(-p_k)`` is accurate there;
    for the top class ``1 - p`` is the mass of the other classes, summed directly rather than
    formed as the difference ``1 - p``, which keeps it exact (and its gradient finite) as
    ``p -> 1``. A row without any finite logit gets ``log p = -inf`` everywhere.
    """
    ref = _tile.reference_point(jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True)))
    shifted = z - ref
    s = jnp.sum(jnp.exp(shifted), axis=1, keepdims=True)
    _, log_s = _tile.log_mass(s)
    log_p = shifted - log_s
    is_top = jnp.arange(z.shape[1]) == jnp.argmax(z, axis=1, keepdims=True)
    # A log-sum-exp of the others (shifted by their own max inside), not log(sum(e)): the sum
    # can underflow, and the second derivative of its log would overflow 1 / rest**2.
    rest = jnp.where(is_top, _tile.NEG_INF, shifted)
    has_rest = jnp.any(rest > _tile.NEG_INF, axis=1, keepdims=True)
    rest_lse = jax.nn.logsumexp(jnp.where(has_rest, rest, 0), axis=1, keepdims=True)
    log_rest = jnp.where(has_rest, rest_lse - log_s, _tile.NEG_INF)
    p_other = jnp.where(is_top, 0, jnp.exp(log_p))
    return log_p, jnp.where(is_top, log_rest, jnp.log1p(-p_other))


def _focal_rows(problem: _canonical.Problem, options: _options.Options, gamma: float):
    """Per-example focal losses ``[N]`` in the accumulation dtype, 0 where an example does not
    count; ``problem.class_weights`` holds ``alpha``."""
    bad, problem = _canonical.quarantine_problem(problem)
    logits, labels, where, alpha = problem[:4]
    rows = problem.rows
    dtype = problem.accumulation_dtype
    z = logits.astype(dtype)
    if where is not None:
        z = jnp.where(where, z, _tile.NEG_INF)
    log_p, log_not_p = _log_softmax_and_complement(z)
    modulation = jnp.exp(gamma * log_not_p)
    if options.integer:
        target = _tile.onehot_block(labels[:, None], 0, z.shape[1]).astype(dtype)
        row_weight = rows.label_weight[:, 0]
    else:
        target = labels.astype(dtype)
        if alpha is not None:
            target = target * alpha
        if where is not None:
            target = jnp.where(where, target, 0)
        row_weight = jnp.ones(labels.shape[:1], dtype)
    losses = row_weight * jnp.sum(weighted_term(target * modulation, -log_p), axis=1)
    losses = jnp.where(bad[:, 0], jnp.nan, losses)
    return jnp.where(rows.counted[:, 0], losses, 0)


def softmax_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: jax.typing.ArrayLike | None = None,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Multi-class focal loss: cross-entropy scaled down on the classes already predicted well.

    With ``p = softmax(z)`` over the valid classes and per-class weights ``alpha``, an integer
    label ``t`` gives

    .. math::
      \ell = -\alpha_t (1 - p_t)^\gamma \log p_t ,

    and probability labels ``y`` give :math:`\ell = -\sum_k \alpha_k y_k (1 - p_k)^\gamma \log p_k`.
    ``log p`` and ``log(1 - p)`` are formed in log space (``1 - p_t`` as the mass of the other
    classes), so the loss and its gradient stay finite and accurate as ``p_t -> 1``, for logits of
    any magnitude.

    ``gamma=0`` is exactly `softmax_cross_entropy_with_integer_labels` (or
    `softmax_cross_entropy` for probability labels) with ``class_weights=alpha``: it calls them.
    Everything else about examples follows the cross-entropy: ``ignore_index`` and fully masked
    examples have loss 0 and gradient 0, a label outside ``[0, num_classes)`` gives NaN, and
    ``"mean"`` is PyTorch's weighted mean ``sum l_i / sum alpha_{t_i}`` over counted examples for
    integer labels (the plain mean for probability labels), 0 when nothing counts. ``alpha`` gets
    a zero gradient. Per-example ``weights`` ``u`` are the cross-entropy's: example ``i``'s loss is
    ``u_i l_i``, ``"mean"`` divides by ``sum_i u_i alpha_{t_i}`` (``sum_i u_i``), and an example
    of weight 0 contributes nothing, even where its logits are NaN.

    For ``gamma > 0`` this is plain autodiff (forward mode and Hessians work); ``gamma=0`` runs the
    cross-entropy's ``custom_vjp`` (reverse mode only).

    Args:
      logits: Unnormalised log-probabilities, shape ``[batch_size, num_classes]`` or any shape
        with the class axis (or axes) named by ``axis``. Floating.
      labels: Integer class ids of shape ``logits.shape`` without ``axis``, or probabilities
        broadcastable to ``logits.shape`` (any floating dtype).
      gamma: Focusing exponent, a Python number ``>= 0`` (static).
      alpha: ``[num_classes]`` per-class weights, or None.
      axis: The class axis, or a tuple of axes that are flattened into one.
      where: Boolean mask of the valid classes, broadcast against ``logits``; a mask with the rank
        of the batch shape masks whole examples.
      ignore_index: A label value whose examples do not count (integer labels only).
      weights: Per-example weights ``u``, broadcastable to the batch shape (``logits.shape``
        without ``axis``), or None; differentiable, any real dtype.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.

    Returns:
      The losses, shape ``logits.shape`` without ``axis`` for ``reduction="none"``, else a scalar;
      float32 for 16-bit logits, the logits' dtype otherwise.

    Raises:
      TypeError: integer logits, a ``gamma`` that is not a number, or complex ``weights``.
      ValueError: shapes that do not broadcast (also ``weights``), ``alpha`` not
        ``[num_classes]``, a negative ``gamma``, ``ignore_index`` with probability labels, or
        an unknown ``reduction``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[1.0, 0.5, -1.0], [0.2, 0.1, 1.5]])
      >>> labels = jnp.array([0, 1])
      >>> print(sce.softmax_focal_loss(logits, labels).round(4))
      [0.1007 1.2758]
      >>> print(sce.softmax_focal_loss(logits, labels, gamma=0.0).round(4))
      [0.555  1.8181]

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
      2017.
    """
    gamma = _options.python_float("gamma", gamma)
    if not gamma >= 0.0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    reduction = _options.check_reduction(reduction)
    logits = _canonical.check_logits(logits)
    lay = _canonical.layout(logits.shape, axis)
    labels = jnp.asarray(labels)
    integer = bool(jnp.issubdtype(labels.dtype, jnp.integer))
    if ignore_index is not None and not integer:
        raise ValueError(
            f"ignore_index applies to integer labels only, got labels of dtype {labels.dtype} "
            f"and shape {labels.shape}"
        )
    if alpha is not None and jnp.shape(alpha) != (lay.num_classes,):
        raise ValueError(
            f"alpha shape {jnp.shape(alpha)} must be [{lay.num_classes}], the number of classes "
            f"of logits of shape {logits.shape} along axis {axis}"
        )
    if gamma == 0.0:
        if integer:
            return softmax_cross_entropy_with_integer_labels(
                logits,
                labels,
                axis,
                where,
                ignore_index=ignore_index,
                class_weights=alpha,
                weights=weights,
                reduction=reduction,
            )
        return softmax_cross_entropy(
            logits, labels, axis, where, class_weights=alpha, weights=weights, reduction=reduction
        )
    options = _options.make_options(ignore_index=ignore_index, integer=integer)
    problem, options, lay = _canonical.canonicalise(
        logits, labels, axis, _canonical.check_where(where), alpha, None, options, weights
    )
    return _canonical.reduce_problem(
        _focal_rows(problem, options, gamma),
        problem,
        options,
        reduction=reduction,
        batch_shape=lay.batch_shape,
        dtype=accumulation_dtype(logits.dtype),
    )
