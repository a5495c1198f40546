"""Binary (sigmoid) cross-entropy and the sigmoid focal loss: one independent binary problem per
element, in plain jnp (autodiff only, so forward mode and Hessians work)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _canonical, _options
from jax_softmax_ce._util import accumulation_dtype, weighted_term
from jax_softmax_ce.kernels._tile import weighted


def _shape(logits: jax.Array, labels: jax.Array) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(logits.shape, labels.shape)
    except ValueError:
        raise ValueError(
            f"labels shape {labels.shape} does not broadcast with logits shape {logits.shape}"
        ) from None


def _operand(name: str, value, shape: tuple[int, ...], dtype) -> jax.Array:
    """``value`` broadcast to the loss ``shape`` (an error naming ``name`` otherwise)."""
    value = jnp.asarray(value)
    try:
        broadcast = np.broadcast_shapes(value.shape, shape) == shape
    except ValueError:
        broadcast = False
    if not broadcast:
        raise ValueError(f"{name} shape {value.shape} does not broadcast to the loss shape {shape}")
    return jnp.broadcast_to(value.astype(dtype), shape)


def _weights(weights, shape: tuple[int, ...], dtype) -> jax.Array | None:
    """The per-element ``weights`` broadcast to the loss ``shape``, or None."""
    weights = _canonical.check_example_weights(weights)
    return None if weights is None else _operand("weights", weights, shape, dtype)


def _quarantine(u: jax.Array | None, x: jax.Array, y: jax.Array):
    """``(bad, x, y)``: `_canonical.quarantine` of the elements of weight 0 (``bad`` None
    without weights)."""
    if u is None:
        return None, x, y
    bad, (x, y) = _canonical.quarantine(u == 0, x, y)
    return bad, x, y


def _elementwise_reduce(
    losses: jax.Array, valid: jax.Array | None, u: jax.Array | None, bad, reduction: str
) -> jax.Array:
    """`_canonical.reduce` with every element an example of its own, of weight ``u`` (None
    for 1 each); ``bad`` (or None) marks the elements that `_quarantine` replaced."""
    if bad is not None:
        losses = jnp.where(bad, jnp.nan, losses)
    flat = losses.reshape(-1)
    counted = jnp.ones(flat.shape, jnp.bool_) if valid is None else valid.reshape(-1)
    return _canonical.reduce(
        flat,
        counted,
        None,
        example_weights=None if u is None else u.reshape(-1),
        reduction=reduction,
        batch_shape=losses.shape,
        dtype=losses.dtype,
    )


def sigmoid_binary_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_weight: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Element-wise sigmoid cross-entropy; a drop-in for optax's, with PyTorch's ``pos_weight``.

    Each element is an independent binary problem (multi-label classification). With
    ``y' = (1 - e) y + e / 2`` and the positive weight ``w_+``,

    .. math::
      \ell = -w_+ \, y' \log \sigma(x) - (1 - y') \log (1 - \sigma(x))
           = w_+ \, y' \operatorname{softplus}(-x) + (1 - y') \operatorname{softplus}(x),

    formed through ``log_sigmoid`` so that it is exact for logits of any magnitude. A term whose
    weight is 0 contributes 0 even at an infinite logit (``x = -inf`` with ``y = 0`` has loss 0).

    Decisions where optax and PyTorch leave room:

    - ``label_smoothing`` squeezes the labels towards 1/2, as Keras' ``BinaryCrossentropy`` does.
    - ``pos_weight`` multiplies the positive term only, as in PyTorch's ``BCEWithLogitsLoss``; it
      broadcasts to the loss shape (a ``[num_classes]`` vector for ``[..., num_classes]`` logits)
      and does not enter the ``"mean"`` denominator.
    - ``where`` masks elements: a masked element has loss 0 and gradient 0, and ``"mean"``
      divides by the number of unmasked elements (0 when there is none).
    - ``weights`` ``u`` weigh elements (every element is an example): element ``i``'s loss is
      ``u_i l_i`` and ``"mean"`` is ``sum_i u_i l_i / sum_i u_i`` over unmasked elements, the
      weighted mean of this library's other losses (PyTorch's ``BCEWithLogitsLoss(weight=u)``
      divides by the number of elements instead). An element of weight 0 contributes nothing,
      even at a NaN logit; the weights are differentiable.
    - The loss is accumulated, and returned, in float32 for 16-bit logits.

    Args:
      logits: Unnormalised log-odds, any shape, e.g. ``[batch_size, num_classes]``. Floating.
      labels: Targets in ``[0, 1]`` (binary or soft), broadcastable with ``logits``.
      pos_weight: Weight ``w_+`` of the positive term, broadcastable to the loss shape.
      label_smoothing: ``e`` in ``[0, 1)``.
      where: Boolean mask of the elements that count, broadcastable to the loss shape.
      weights: Per-element weights, broadcastable to the loss shape, or None; any real dtype.
      reduction: ``"none"`` (the loss per element), ``"sum"`` or ``"mean"``.

    Returns:
      The losses, of the broadcast shape of ``logits`` and ``labels`` for ``reduction="none"``,
      else a scalar; float32 for 16-bit logits, the logits' dtype otherwise.

    Raises:
      TypeError: integer logits.
      ValueError: shapes that do not broadcast, or an option out of its range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[1.5, -0.5], [-2.0, 0.5]])
      >>> labels = jnp.array([[1.0, 0.0], [1.0, 1.0]])
      >>> print(sce.sigmoid_binary_cross_entropy(logits, labels).round(4))
      [[0.2014 0.4741]
       [2.1269 0.4741]]
      >>> print(sce.sigmoid_binary_cross_entropy(
      ...     logits, labels, pos_weight=jnp.array([3.0, 1.0]), reduction="mean").round(4))
      1.9833

    References:
      PyTorch, `BCEWithLogitsLoss
      <https://pytorch.org/docs/stable/generated/torch.nn.BCEWithLogitsLoss.html>`_.
    """
    reduction = _options.check_reduction(reduction)
    label_smoothing = _options.make_options(label_smoothing=label_smoothing).label_smoothing
    logits = _canonical.check_logits(logits)
    labels = jnp.asarray(labels)
    shape = _shape(logits, labels)
    dtype = accumulation_dtype(logits.dtype)
    x = jnp.broadcast_to(logits.astype(dtype), shape)
    y = _operand("labels", labels, shape, dtype)
    valid = None if where is None else _operand("where", where, shape, jnp.bool_)
    u = _weights(weights, shape, dtype)
    if valid is not None:
        x = jnp.where(valid, x, 0)
    bad, x, y = _quarantine(u, x, y)
    if label_smoothing:
        y = (1.0 - label_smoothing) * y + 0.5 * label_smoothing
    positive = y if pos_weight is None else _operand("pos_weight", pos_weight, shape, dtype) * y
    losses = weighted_term(positive, -jax.nn.log_sigmoid(x)) + weighted_term(
        1.0 - y, -jax.nn.log_sigmoid(-x)
    )
    if valid is not None:
        losses = jnp.where(valid, losses, 0)
    return _elementwise_reduce(losses, valid, u, bad, reduction)


def sigmoid_focal_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    alpha: jax.typing.ArrayLike | None = None,
    gamma: jax.typing.ArrayLike = 2.0,
    *,
    weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Sigmoid focal loss, element-wise; a drop-in for optax's.

    With ``p = sigmoid(x)``, ``p_t = y p + (1 - y)(1 - p)`` and
    ``alpha_t = alpha y + (1 - alpha)(1 - y)``,

    .. math::
      \ell = -\alpha_t (1 - p_t)^\gamma \log p_t ,

    where ``-log p_t`` is `sigmoid_binary_cross_entropy` and the modulating factor is formed in
    log space, ``exp(gamma log(1 - p_t))``, so that values, gradients and Hessians stay finite for
    logits of any magnitude and for ``gamma < 1``. ``gamma=0`` with ``alpha=None`` is the binary
    cross-entropy. Per-element ``weights`` multiply the losses, as in
    `sigmoid_binary_cross_entropy`: an element of weight 0 has loss 0 and gradient 0, even at a
    NaN logit.

    Args:
      logits: Unnormalised log-odds, any shape. Floating.
      labels: Targets in ``[0, 1]`` (binary or soft), broadcastable with ``logits``.
      alpha: Weight in ``[0, 1]`` of the positive class (``1 - alpha`` for the negative), or
        None for no weighting.
      gamma: Exponent ``>= 0`` of the modulating factor ``(1 - p_t)``.
      weights: Per-element weights, broadcastable to the loss shape (they may not widen it), or
        None; differentiable, any real dtype.

    Returns:
      The losses, of the broadcast shape of ``logits`` and ``labels``; float32 for 16-bit
      logits, the logits' dtype otherwise.

    Raises:
      TypeError: integer logits, or complex ``weights``.
      ValueError: ``labels``, ``alpha`` or ``weights`` that do not broadcast to the loss shape
        (``alpha`` and ``weights`` may not widen it), a Python ``gamma < 0`` or ``alpha``
        outside ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([1.0, -1.0, 1.0])
      >>> labels = jnp.array([1.0, 1.0, 0.0])
      >>> print(sce.sigmoid_focal_loss(logits, labels).round(4))
      [0.0227 0.7019 0.7019]

    References:
      Lin et al., `Focal Loss for Dense Object Detection <https://arxiv.org/abs/1708.02002>`_,
      2017.
    """
    logits = _canonical.check_logits(logits)
    labels = jnp.asarray(labels)
    shape = _shape(logits, labels)
    dtype = accumulation_dtype(logits.dtype)
    x = jnp.broadcast_to(logits.astype(dtype), shape)
    y = _operand("labels", labels, shape, dtype)
    if isinstance(gamma, numbers.Real) and not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if isinstance(alpha, numbers.Real) and not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    gamma = jnp.asarray(gamma).astype(dtype)
    u = _weights(weights, shape, dtype)
    bad, x, y = _quarantine(u, x, y)
    cross_entropy = sigmoid_binary_cross_entropy(x, y)
    # log(1 - p_t) = log((1 - y) p + y (1 - p)), as a weighted log-sum-exp of log p and log(1 - p).
    # At x = +-inf, p is exactly 1 or 0 and log(1 - p_t) is log(1 - y) or log(y), constant in x
    # (-inf where the logit is certain of its label); the log-sum-exp, whose derivatives are NaN
    # at infinite inputs, sees a finite stand-in logit there.
    infinite = jnp.isinf(x)
    x_safe = jnp.where(infinite, jnp.zeros((), dtype), x)
    log_not_p_t = jax.scipy.special.logsumexp(
        jnp.stack(
            jnp.broadcast_arrays(jax.nn.log_sigmoid(x_safe), jax.nn.log_sigmoid(-x_safe)), axis=-1
        ),
        axis=-1,
        b=jnp.stack(jnp.broadcast_arrays(1.0 - y, y), axis=-1),
    )
    log_not_p_t = jnp.where(infinite, jnp.where(x > 0, jnp.log1p(-y), jnp.log(y)), log_not_p_t)
    # gamma log(1 - p_t) is 0 for gamma = 0 even at p_t = 1: the factor is then exactly 1.
    losses = cross_entropy * jnp.exp(weighted(gamma, log_not_p_t))
    if alpha is not None:
        alpha = _operand("alpha", alpha, shape, dtype)  # must not widen the loss shape
        losses = (alpha * y + (1.0 - alpha) * (1.0 - y)) * losses
    return _elementwise_reduce(losses, None, u, bad, "none")
