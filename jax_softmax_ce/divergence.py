"""Kullback-Leibler divergences between a predicted and a target distribution, as in optax, on the
canonical ``[N, V]`` layout (plain jnp, autodiff only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical
from jax_softmax_ce._util import accumulation_dtype, weighted_term


def _rows(log_predictions, targets, axis, where, weights, target_name: str):
    """``(log_p, t, valid, layout, u, bad)`` on ``[N, V]``, masked entries replaced by 0; ``u``
    the ``[N]`` per-example weights (or None), and the rows of weight 0 with a NaN or +inf
    value replaced by 0 too and marked in ``bad`` (`_canonical.quarantine`)."""
    log_predictions = _canonical.check_floating("log_predictions", log_predictions)
    targets = _canonical.check_floating(target_name, targets)
    if axis is None:
        axis = tuple(range(log_predictions.ndim))
    if not _canonical.broadcasts_to(targets.shape, log_predictions.shape):
        raise ValueError(
            f"{target_name} shape {targets.shape} does not broadcast to log_predictions shape "
            f"{log_predictions.shape}"
        )
    # An empty class axis sums to 0, as in optax, and an empty batch gives an empty result; the
    # layout itself needs at least one class, and one row to reshape.
    shape = log_predictions.shape
    name = "log_predictions"
    lay = _canonical.layout(tuple(max(n, 1) for n in shape), axis, name)
    dtype = accumulation_dtype(log_predictions.dtype)
    batch_shape = tuple(shape[a] for a in lay.batch_axes)
    described = f"{name} shape {shape} without axis {axis}"
    u = _canonical.example_weights(weights, batch_shape, dtype, described)
    if 0 in shape:
        empty = jnp.zeros((0,) * 2, dtype)
        return empty, empty, None, lay._replace(batch_shape=batch_shape), None, None
    log_p = lay.to_rows(log_predictions).astype(dtype)
    t = _canonical.probability_labels(targets, log_predictions, lay).astype(dtype)
    valid = _canonical.mask(where, log_predictions.shape, lay, axis, name)
    if valid is not None:
        log_p = jnp.where(valid, log_p, 0)
        t = jnp.where(valid, t, 0)
    bad = None
    if u is not None:
        bad, (log_p, t) = _canonical.quarantine(u == 0, log_p, t)
    return log_p, t, valid, lay, u, bad


def _sum_valid(terms: jax.Array, valid, lay: _canonical.Layout, u, bad) -> jax.Array:
    """The divergences: ``terms`` summed over the valid classes, times the weights ``u``."""
    if terms.size == 0:
        return jnp.zeros(lay.batch_shape, terms.dtype)
    if valid is not None:
        terms = jnp.where(valid, terms, 0)
    divergences = jnp.sum(terms, axis=1)
    if bad is not None:
        divergences = jnp.where(bad, jnp.nan, divergences)
    return _canonical.reduce(
        divergences,
        jnp.ones(divergences.shape, jnp.bool_),
        None,
        example_weights=u,
        reduction="none",
        batch_shape=lay.batch_shape,
        dtype=divergences.dtype,
    )


def kl_divergence(
    log_predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence of the predictions from the targets; a drop-in for optax's.

    .. math::
      D_\mathrm{KL}(q \,\|\, p) = \sum_k q_k \left(\log q_k - \log p_k\right),

    summed over the valid classes (``where`` True). A class with ``q_k = 0`` contributes 0, even
    where ``log p_k = -inf``; a class with ``q_k > 0`` and ``log p_k = -inf`` gives +inf.

    Decisions where optax leaves room: the gradient with respect to ``targets`` is finite at
    ``q_k = 0`` (``-log p_k``, the derivative of ``q log q`` taken as 0 there); a ``where`` of the
    rank of the batch shape masks whole examples, as in this library's cross-entropy; the result
    is float32 for 16-bit inputs.

    Args:
      log_predictions: Log-probabilities ``log p``, shape ``[batch_size, num_classes]`` or any
        shape with the class axis (or axes) named by ``axis``. Floating.
      targets: Probabilities ``q``, broadcastable to ``log_predictions.shape``. Floating.
      axis: The class axis, a tuple of axes, or None for all axes.
      where: Boolean mask of the classes to include, broadcast against ``log_predictions``.
      weights: Per-example weights ``u``, broadcastable to the batch shape
        (``log_predictions.shape`` without ``axis``), or None: example ``i``'s divergence is
        ``u_i D_i``, 0 where ``u_i = 0`` (with gradient 0, even at NaN inputs).
        Differentiable, any real dtype.

    Returns:
      The divergences, shape ``log_predictions.shape`` without ``axis``; float32 for 16-bit
      inputs, the inputs' dtype otherwise.

    Raises:
      TypeError: inputs that are not floating point, or complex ``weights``.
      ValueError: shapes that do not broadcast (also ``weights``), or a bad ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> log_p = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
      >>> q = jnp.array([[0.25, 0.25, 0.5], [0.0, 0.5, 0.5]])
      >>> print(sce.kl_divergence(log_p, q).round(4))
      [0.1733 0.5697]

    References:
      Kullback and Leibler, `On Information and Sufficiency
      <https://www.jstor.org/stable/2236703>`_, 1951.
    """
    log_p, q, valid, lay, u, bad = _rows(log_predictions, targets, axis, where, weights, "targets")
    entropy_term = q * jnp.log(jnp.where(q == 0, 1, q))
    return _sum_valid(entropy_term - weighted_term(q, log_p), valid, lay, u, bad)


def kl_divergence_with_log_targets(
    log_predictions: jax.typing.ArrayLike,
    log_targets: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    weights: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence with targets given as log-probabilities; a drop-in for optax's.

    .. math::
      D_\mathrm{KL}(q \,\|\, p) = \sum_k e^{\log q_k} \left(\log q_k - \log p_k\right),

    summed over the valid classes (``where`` True). A class with ``log q_k = -inf`` contributes
    0 (and gradient 0), even where ``log p_k = -inf`` too.

    Args:
      log_predictions: Log-probabilities ``log p``, shape ``[batch_size, num_classes]`` or any
        shape with the class axis (or axes) named by ``axis``. Floating.
      log_targets: Log-probabilities ``log q``, broadcastable to ``log_predictions.shape``.
      axis: The class axis, a tuple of axes, or None for all axes.
      where: Boolean mask of the classes to include, broadcast against ``log_predictions``.
      weights: Per-example weights ``u``, broadcastable to the batch shape
        (``log_predictions.shape`` without ``axis``), or None: example ``i``'s divergence is
        ``u_i D_i``, 0 where ``u_i = 0`` (with gradient 0, even at NaN inputs).
        Differentiable, any real dtype.

    Returns:
      The divergences, shape ``log_predictions.shape`` without ``axis``; float32 for 16-bit
      inputs, the inputs' dtype otherwise.

    Raises:
      TypeError: inputs that are not floating point, or complex ``weights``.
      ValueError: shapes that do not broadcast (also ``weights``), or a bad ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> log_p = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
      >>> log_q = jnp.log(jnp.array([[0.25, 0.25, 0.5], [0.0, 0.5, 0.5]]))
      >>> print(sce.kl_divergence_with_log_targets(log_p, log_q).round(4))
      [0.1733 0.5697]

    References:
      Kullback and Leibler, `On Information and Sufficiency
      <https://www.jstor.org/stable/2236703>`_, 1951.
    """
    log_p, log_q, valid, lay, u, bad = _rows(
        log_predictions, log_targets, axis, where, weights, "log_targets"
    )
    absent = log_q == -jnp.inf
    # An absent class contributes 0, but a NaN prediction there still makes the result NaN.
    zero_or_nan = jnp.where(jnp.isnan(log_p), jnp.nan, 0).astype(log_p.dtype)
    log_q = jnp.where(absent, 0, log_q)
    log_p = jnp.where(absent, 0, log_p)
    terms = jnp.where(absent, zero_or_nan, jnp.exp(log_q) * (log_q - log_p))
    return _sum_valid(terms, valid, lay, u, bad)
