"""What people watch while they train, from the same pass as the loss.

`CrossEntropyAux` is what ``return_aux=True`` returns beside the loss of
`softmax_cross_entropy`, `softmax_cross_entropy_with_integer_labels` and
`linear_softmax_cross_entropy`: per-example arrays of the batch shape, whatever the reduction.
`batch_metrics` turns them, with the loss and the labels, into the scalars to log.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_softmax_ce import _binning, _canonical
from jax_softmax_ce._util import accumulation_dtype


class CrossEntropyAux(NamedTuple):
    """Per-example statistics of ``softmax(z')``, ``z'`` the transformed valid logits.

    Ignored and fully masked examples get ``argmax = -1`` and zeros everywhere else. Every
    implementation computes them in the same pass over the logits as the loss (in a kernel,
    from running accumulators: the entropy as ``log s - t / s`` with ``s = sum exp(z' - m)``
    and ``t = sum exp(z' - m) (z' - m)``, the argmax moving only to a strictly greater max), and
    their gradients in the loss's backward pass.

    Attributes:
      lse: the log-sum-exp of ``z'``; float32 (float64 for float64 logits).
      argmax: the predicted class, int32; the lowest index among ties.
      max_prob: the softmax probability of ``argmax``.
      entropy: ``-sum_k p_k log p_k`` of ``p = softmax(z')``, with its exact gradient.
      target_logprob: ``z'_t - lse`` for integer labels (the per-token log-likelihood); None
        for probability labels.
    """

    lse: jax.Array
    argmax: jax.Array
    max_prob: jax.Array
    entropy: jax.Array
    target_logprob: jax.Array | None


_METRIC_NAMES = ("loss", "accuracy", "confidence", "entropy", "lse", "ece", "count")


def batch_metrics(
    loss: jax.typing.ArrayLike,
    aux: CrossEntropyAux,
    labels: jax.typing.ArrayLike,
    *,
    weights: jax.typing.ArrayLike | None = None,
    num_bins: int = 15,
) -> dict[str, jax.Array]:
    r"""The scalars to log for a batch, from a loss's ``(loss, aux)`` and the integer labels.

    An example counts when ``aux.argmax != -1`` (neither ``ignore_index`` nor fully masked) and
    its weight ``u_i`` (1 without ``weights``) is not 0. Over the counted examples, every metric
    but the ECE is a weighted mean

    .. math::
      \bar{x} = \frac{\sum_i u_i x_i}{\sum_i u_i} ,

    and the result holds, as scalars:

    - ``"loss"``: ``loss`` itself when it is a scalar (the loss's own reduction, e.g. PyTorch's
      weighted mean with class weights), or the mean of per-example losses of the batch shape
      (``reduction="none"``);
    - ``"accuracy"``: the mean of ``[aux.argmax_i = t_i]``;
    - ``"confidence"``, ``"entropy"``, ``"lse"``: the means of ``aux.max_prob``,
      ``aux.entropy`` (in nats) and ``aux.lse`` (which ``z_loss`` pulls towards 0);
    - ``"ece"``: the top-label expected calibration error of the batch, with the equal-width bins
      of `expected_calibration_error` (the same code) over ``aux.max_prob``, each example
      weighing ``u_i``. Without ``weights`` it equals
      ``expected_calibration_error(logits, labels, num_bins)`` when the loss had no
      ``temperature``, ``logit_softcap`` or class mask (the statistics in ``aux`` are those of
      the transformed logits ``z'``) and every counted label is in ``[0, V)``;
    - ``"count"``: ``sum_i u_i`` over the counted examples (their number without ``weights``),
      to combine the means of several batches.

    When no example counts, every value is 0, not NaN. A NaN in a counted example's loss or
    statistics reaches its metrics; a zero-weight example contributes nothing, also when it
    holds NaN. A label outside ``[0, V)`` that is not ``ignore_index`` has a NaN loss, and counts
    as a wrong prediction in the accuracy and the ECE (which `expected_calibration_error` makes
    NaN: ``V`` is not known here). Works under ``jit`` (with ``num_bins`` static) and ``vmap``;
    the metrics are for logging, not for differentiating.

    Args:
      loss: The loss as the loss function returned it: a scalar, or per-example losses of the
        batch shape, e.g. ``[batch_size]`` or ``[batch_size, seq_len]``.
      aux: The `CrossEntropyAux` of ``return_aux=True``: arrays of the batch shape.
      labels: Integer class ids of the batch shape (for probability labels, their argmax over
        the class axis).
      weights: The per-example weights given to the loss, broadcastable to the batch shape, or
        None.
      num_bins: The number of equal-width confidence bins of the ECE, a positive Python int.

    Returns:
      A dict of scalars with the keys ``"loss"``, ``"accuracy"``, ``"confidence"``,
      ``"entropy"``, ``"lse"``, ``"ece"`` and ``"count"``, in the dtype of ``aux.lse`` (float32,
      or float64 for float64 logits).

    Raises:
      TypeError: labels that are not integers.
      ValueError: labels, ``loss`` or ``weights`` whose shapes do not fit the batch shape of
        ``aux``, or a bad ``num_bins``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
      >>> labels = jnp.array([0, 2, 1, -100])  # the last example is ignored
      >>> loss, aux = sce.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, ignore_index=-100, reduction="mean", return_aux=True
      ... )
      >>> metrics = sce.batch_metrics(loss, aux, labels, num_bins=5)
      >>> for name, value in metrics.items():
      ...     print(f"{name:<10} {value:.4f}")
      loss       0.6304
      accuracy   0.6667
      confidence 0.7546
      entropy    0.6746
      lse        2.2970
      ece        0.2962
      count      3.0000
    """
    batch_shape = aux.argmax.shape
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class ids, got {labels.dtype} with shape {labels.shape}"
        )
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels shape {labels.shape} is not the batch shape {batch_shape} of aux.argmax"
        )
    loss = jnp.asarray(loss)
    if loss.ndim != 0 and loss.shape != batch_shape:
        raise ValueError(
            f"loss shape {loss.shape} is neither a scalar nor the batch shape {batch_shape} of aux"
        )
    num_bins = _binning.check_num_bins(num_bins)
    dtype = accumulation_dtype(aux.lse.dtype)
    if weights is None:
        weights = jnp.ones(batch_shape, dtype)
    else:
        weights = jnp.asarray(weights)
        if not _canonical.broadcasts_to(weights.shape, batch_shape):
            raise ValueError(
                f"weights shape {weights.shape} does not broadcast to the batch shape "
                f"{batch_shape} of aux"
            )
        weights = jnp.broadcast_to(weights.astype(dtype), batch_shape)
    counted = (aux.argmax != -1) & (weights != 0)
    u = jnp.where(counted, weights, 0)
    count = jnp.sum(u)

    def weighted(x):  # u_i x_i, 0 where not counted (even for a NaN x_i)
        return jnp.where(counted, u * x.astype(dtype), 0)

    def mean(x):
        return jnp.where(count > 0, jnp.sum(weighted(x)) / jnp.where(count > 0, count, 1), 0)

    correct = aux.argmax.astype(labels.dtype) == labels
    confidence = aux.max_prob.astype(dtype)
    _, bins = _binning.confidence_bins(confidence, num_bins)
    ece = _binning.calibration_gap(
        _binning.sum_per_bin(u, bins, num_bins),
        _binning.sum_per_bin(weighted(confidence), bins, num_bins),
        _binning.sum_per_bin(weighted(correct), bins, num_bins),
    )
    values = (
        loss.astype(dtype) if loss.ndim == 0 else mean(loss),
        mean(correct),
        mean(confidence),
        mean(aux.entropy),
        mean(aux.lse),
        ece,
        count,
    )
    return dict(zip(_METRIC_NAMES, values, strict=True))
