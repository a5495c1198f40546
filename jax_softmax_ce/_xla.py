"""The ``"xla"`` implementation: plain JAX with a ``custom_vjp``.

The forward pass is the tile math of `kernels._tile` applied to one block that spans the whole
vocabulary; it saves only the per-example log-sum-exp (float32, float64 for float64 logits) beside
its inputs. The backward pass recomputes ``p = exp(z' - lse)`` and forms
``(W + 2 z_loss lse) p - w q`` in one fused elementwise pass, then applies the softcap and
temperature chain rule. No ``[N, V]`` float32 copy of the logits is kept between the two passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical
from jax_softmax_ce._options import Options
from jax_softmax_ce.kernels import _tile


def cross_entropy(problem: _canonical.Problem, options: Options, *, integer: bool) -> jax.Array:
    """Per-example losses ``[N]`` in the accumulation dtype."""
    return _cross_entropy(options, integer, *problem)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cross_entropy(options, integer, logits, labels, where, class_weights, temperature):
    return _forward(options, integer, logits, labels, where, class_weights, temperature)[0]


def _transformed(options: Options, logits, where, temperature):
    """``(z_raw, z')``: the logits in the accumulation dtype, and transformed and masked."""
    z_raw = logits.astype(_tile.accumulation_dtype(logits.dtype))
    t = options.temperature if temperature is None else temperature.astype(z_raw.dtype)
    z = _tile.transform(z_raw, softcap=options.logit_softcap, temperature=t)
    if where is not None:
        z = jnp.where(where, z, _tile.NEG_INF)
    return z_raw, z


def _target_weights(options: Options, integer, labels, where, class_weights, shape, dtype):
    """The per-class weights ``a`` of the labels before smoothing, as ``(w_row, a)``.

    Integer labels: ``w_row`` is ``[N, 1]`` (0 for ignored examples, NaN for labels out of range)
    and ``a`` is None (the caller picks one class). Probability labels: ``a = w y`` on valid
    classes.
    """
    if integer:
        w = _canonical.label_weights(labels, class_weights, shape[1], dtype)
        if options.ignore_index is not None:
            w = jnp.where(labels == options.ignore_index, jnp.zeros((), dtype), w)
        return w[:, None], None
    a = labels.astype(dtype)
    if class_weights is not None:
        a = a * class_weights
    if where is not None:
        a = jnp.where(where, a, 0)
    return None, a


def _smoothing_weights(where, class_weights, shape, dtype):
    """Weights of the uniform smoothing target: ``w_k`` on valid classes, broadcastable."""
    w = jnp.ones((1, shape[1]), dtype) if class_weights is None else class_weights[None, :]
    return w if where is None else jnp.where(where, w, 0)


def _masked_raw(logits, where):
    """The logits in their own dtype with invalid classes at -inf."""
    return logits if where is None else jnp.where(where, logits, jnp.array(-jnp.inf, logits.dtype))


def _transform_rows(options: Options, rows, temperature):
    """`_tile.transform` of a ``[N, 1]`` value picked from the raw logits."""
    dtype = _tile.accumulation_dtype(rows.dtype)
    t = options.temperature if temperature is None else temperature.astype(dtype)
    return _tile.transform(rows.astype(dtype), softcap=options.logit_softcap, temperature=t)


def _vocabulary_is_sharded(x) -> bool:
    """Whether ``x``'s type carries an explicit sharding of its class axis."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and len(spec) > 1 and spec[1] is not None


def _pick(x, labels, lowest):
    """``x[i, labels[i]]`` as ``[N, 1]``.

    A gather, except on an explicitly vocabulary-sharded type, where a gather cannot partition
    and a max over the label's column (``lowest`` elsewhere) picks the same value.
    """
    v = x.shape[1]
    if _vocabulary_is_sharded(x):
        onehot = _tile.onehot_block(labels[:, None], 0, v)
        return jnp.max(jnp.where(onehot, x, jnp.array(lowest, x.dtype)), 1, keepdims=True)
    return jnp.take_along_axis(x, jnp.clip(labels, 0, v - 1)[:, None], axis=1)


def _target_logit(options: Options, logits, labels, where, temperature):
    """``z'_t`` per row, ``[N, 1]``: -inf where the target class is invalid.

    Picked from the raw logits behind a barrier (so that XLA does not share an upcast copy), then
    transformed, then masked: an invalid class is at -inf.
    """
    raw = jax.lax.optimization_barrier(logits)
    z_pick = _transform_rows(options, _pick(raw, labels, -jnp.inf), temperature)
    if where is not None and where.shape[1] > 1:
        valid = _pick(jnp.broadcast_to(where, logits.shape), labels, False)
        z_pick = jnp.where(valid, z_pick, _tile.NEG_INF)
    return z_pick


def _forward(options, integer, logits, labels, where, class_weights, temperature):
    # The row max and the target logit are read from the raw logits (the transform is monotone
    # and exact on one value per row), so that no float32 copy of 16-bit logits is shared by
    # several reductions: XLA would materialise it as an [N, V] temporary.
    n, v = logits.shape
    raw = _masked_raw(logits, where)
    _, z = _transformed(options, logits, where, temperature)
    dtype = z.dtype
    z_max = _transform_rows(options, jnp.max(raw, axis=1, keepdims=True), temperature)
    # The empty state built like z_max, so that it carries z_max's sharding (rows sharded
    # under an explicit mesh would not mix with a replicated constant).
    empty = _tile.Lse(jnp.full_like(z_max, _tile.NEG_INF), jnp.zeros_like(z_max))
    lse, ref, _ = _tile.lse_merge(empty, z, z_max)
    n_valid = _canonical.valid_count(where, n, v, dtype)
    w_row, a = _target_weights(options, integer, labels, where, class_weights, logits.shape, dtype)
    if integer:
        z_pick = _target_logit(options, logits, labels, where, temperature)
        target = _tile.Term(*_tile.picked_term(w_row, z_pick, ref))
    else:
        target = _tile.Term(*_tile.dense_term(a, z, ref))
    smoothing = None
    if options.label_smoothing:
        weights = jnp.broadcast_to(
            _smoothing_weights(where, class_weights, z.shape, dtype), z.shape
        )
        smoothing = _tile.Term(*_tile.dense_term(weights, z, ref))
    loss, lse_value = _tile.row_loss(
        lse,
        target,
        smoothing,
        n_valid,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    problem = _canonical.Problem(logits, labels, where, class_weights, temperature)
    counted = _canonical.counted_rows(problem, options.ignore_index, integer)
    return jnp.where(counted, loss[:, 0], 0), lse_value


def _fwd(options, integer, logits, labels, where, class_weights, temperature):
    loss, lse = _forward(options, integer, logits, labels, where, class_weights, temperature)
    return loss, (logits, labels, where, class_weights, temperature, lse)


def _bwd(options, integer, residuals, cotangent):
    logits, labels, where, class_weights, temperature, lse = residuals
    n, v = logits.shape
    if logits.dtype != _tile.accumulation_dtype(logits.dtype):
        # Keeps XLA from merging this upcast with the forward's into one [N, V] float32 buffer.
        logits = jax.lax.optimization_barrier(logits)
    z_raw, z = _transformed(options, logits, where, temperature)
    dtype = z.dtype
    n_valid = _canonical.valid_count(where, n, v, dtype)
    problem = _canonical.Problem(logits, labels, where, class_weights, temperature)
    counted = _canonical.counted_rows(problem, options.ignore_index, integer)[:, None]
    ct = jnp.where(counted, cotangent.astype(dtype)[:, None], 0)

    w_row, a = _target_weights(options, integer, labels, where, class_weights, logits.shape, dtype)
    if integer:
        a = jnp.where(_tile.onehot_block(labels[:, None], 0, v), w_row, 0)
    else:
        w_row = jnp.sum(a, axis=1, keepdims=True)
    if options.label_smoothing:
        smooth_a = _smoothing_weights(where, class_weights, z.shape, dtype)
        smooth_w = jnp.sum(jnp.broadcast_to(smooth_a, (smooth_a.shape[0], v)), 1, keepdims=True)
        w_row = _tile.mix(options.label_smoothing, n_valid, w_row, smooth_w)
        a = _tile.mix(options.label_smoothing, n_valid, a, smooth_a)
    g = _tile.grad_block(z, lse, w_row, a, z_loss=options.z_loss)
    g = jnp.where(counted, g * ct, 0)

    t = options.temperature if temperature is None else temperature.astype(dtype)
    d_logits = _tile.transform_vjp(z_raw, g, softcap=options.logit_softcap, temperature=t)
    d_labels = None
    if not integer:
        scale = (1.0 - options.label_smoothing) * ct
        if class_weights is not None:
            scale = scale * class_weights
        d_labels = _tile.label_grad_block(z, lse, where, scale)
        d_labels = jnp.where(ct != 0, d_labels, 0).astype(labels.dtype)
    d_temperature = None
    if temperature is not None:
        d_temperature = _canonical.temperature_gradient(
            _tile.temperature_term(z, g, lse), lse, ct, temperature, options.z_loss
        )
    return d_logits.astype(logits.dtype), d_labels, None, None, d_temperature


_cross_entropy.defvjp(_fwd, _bwd)
