"""What people watch while they train, from the same pass as the loss.

`CrossEntropyAux` is what ``return_aux=True`` returns beside the loss of
`softmax_cross_entropy`, `softmax_cross_entropy_with_integer_labels` and
`linear_softmax_cross_entropy`: per-example arrays of the batch shape, whatever the reduction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


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
