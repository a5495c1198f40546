"""The ``"reference"`` implementation: the contract as one plain jnp formula, autodiff only.

There is no ``custom_vjp`` here, so forward mode (``jax.jvp``, ``jax.linearize``, ``jax.hessian``)
works. It materialises ``[N, V]`` float32 intermediates and is meant for checking and for
higher-order derivatives, not for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _canonical
from jax_softmax_ce._options import Options
from jax_softmax_ce.kernels._tile import accumulation_dtype, log_mass, transform


def cross_entropy(problem: _canonical.Problem, options: Options, *, integer: bool) -> jax.Array:
    """Per-example losses ``[N]`` in the accumulation dtype."""
    logits, labels, where, class_weights, temperature = problem
    n, v = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    t = options.temperature if temperature is None else temperature.astype(dtype)
    z = transform(logits.astype(dtype), softcap=options.logit_softcap, temperature=t)
    valid = jnp.ones((n, v), jnp.bool_) if where is None else jnp.broadcast_to(where, (n, v))
    z = jnp.where(valid, z, -np.inf)

    # lse - z_k formed as log(sum exp(z - m)) - (z_k - m), never as a difference of large numbers.
    m = jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True))
    m = jnp.where(m == -np.inf, 0, m)
    s = jnp.sum(jnp.exp(z - m), axis=1, keepdims=True)
    has_mass, log_s = log_mass(s)  # a NaN s (NaN or +inf logit) stays NaN
    nll = log_s - (z - m)  # [n, v], +inf on invalid classes and at -inf logits
    lse = jnp.where(has_mass, m + log_s, -np.inf)

    if integer:
        q = jax.nn.one_hot(labels, v, dtype=dtype)
    else:
        q = jnp.where(valid, labels.astype(dtype), 0)
    n_valid = jnp.sum(valid, axis=1, keepdims=True, dtype=dtype)
    if options.label_smoothing:
        e = options.label_smoothing
        q = (1 - e) * q + jnp.where(valid, e / jnp.maximum(n_valid, 1), 0)
    wq = q if class_weights is None else q * class_weights
    # A zero weight contributes 0 even at an infinite nll, and no branch multiplies 0 by inf. The
    # derivative in q is exact wherever nll is finite; at a -inf logit it is 0 here (it is +inf
    # in the custom_vjp implementations).
    nll = jnp.where(wq != 0, nll, jnp.where(jnp.isinf(nll), 0, nll))
    loss = jnp.sum(wq * nll, axis=1)
    if options.z_loss:
        loss = loss + jnp.where(
            has_mass[:, 0], options.z_loss * jnp.where(has_mass, lse, 0)[:, 0] ** 2, 0
        )

    if integer:
        in_range = (labels >= 0) & (labels < v)
        if options.ignore_index is not None:
            in_range = in_range | (labels == options.ignore_index)
        loss = jnp.where(in_range, loss, np.nan)
    counted = _canonical.counted_rows(problem, options.ignore_index, integer)
    return jnp.where(counted, loss, 0)
