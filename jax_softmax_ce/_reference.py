"""The ``"reference"`` implementation: the contract as one plain jnp formula, autodiff only.

It restates the spec's math (the transform, the log-sum-exp, the target and its smoothing, the
z-loss) rather than calling the block functions that the other implementations share, so that it
checks them. There is no ``custom_vjp`` here, so forward mode (``jax.jvp``, ``jax.linearize``,
``jax.hessian``) works. It materialises ``[N, V]`` float32 intermediates (and, for the fused loss,
the logits) and is meant for checking and for higher-order derivatives, not for speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _canonical
from jax_softmax_ce._canonical import Linear, Problem
from jax_softmax_ce._options import Options, Reference
from jax_softmax_ce.monitoring import CrossEntropyAux


def logits_of(problem: Problem) -> jax.Array:
    """The ``[N, V]`` logits of a problem, materialised for a `Linear` one (the matmul
    accumulates in the accumulation dtype)."""
    logits = problem.logits
    if not isinstance(logits, Linear):
        return logits
    acc = problem.accumulation_dtype
    spec = "nd,vd->nv" if logits.vd else "nd,dv->nv"
    z = jnp.einsum(spec, logits.inputs, logits.weight, preferred_element_type=acc)
    return z if logits.bias is None else z + logits.bias.astype(acc)


def _transformed(options: Options, problem: Problem, z: jax.Array) -> jax.Array:
    """``softcap(z) / T`` on finite logits; an infinite logit stays as it is (so that no
    derivative meets ``0 * inf`` there)."""
    infinite = jnp.isinf(z)
    finite = jnp.where(infinite, 0, z)
    if options.logit_softcap is not None:
        finite = options.logit_softcap * jnp.tanh(finite / options.logit_softcap)
    return jnp.where(infinite, z, finite / _canonical.temperature(options, problem))


def losses(options: Options, config: Reference, problem: Problem) -> jax.Array:
    """Per-example losses ``[N]`` in the accumulation dtype, 0 for examples that do not count."""
    del config
    if options.filter_eps:
        raise NotImplementedError(
            "gradient_filter_eps is a property of the blockwise backward pass; implementation="
            '"reference" differentiates the exact formula with autodiff and cannot filter'
        )
    # A row that contributes nothing gets a zero cotangent: NaN logits there must not reach
    # autodiff's products with it.
    bad, problem = _canonical.quarantine_problem(problem)
    if options.vocab_axis is not None:
        return _vocab_parallel(options, problem, bad)
    labels, rows, v = problem.labels, problem.rows, problem.num_classes
    z, valid = _masked_logits(options, problem)

    # lse - z_k formed as log(sum exp(z - m)) - (z_k - m), never as a difference of large numbers,
    # m the logit of the (first) max class. Two ways, chosen per row, so that autodiff forms
    # every gradient entry without cancellation:
    # - a confident row (p_max > 1/2): sum exp(z - m) as 1 + r, r the mass besides the max, and
    #   lse - z_k is log1p(r) at the max, whose derivative in z_k is -r / (1 + r): the max
    #   class's entry comes from that and the other classes' weights, never as a difference of
    #   two numbers near W, which has no relative accuracy as p -> 1;
    # - any other row: m held constant (lse does not depend on it), so that the max class's
    #   entry is W p - a, not p - 1 plus 1, which has none for a small p_max.
    nonempty = jnp.max(z, axis=1, keepdims=True) != -np.inf  # a NaN max counts: NaN follows
    z_safe = jnp.where(nonempty, z, 0)  # no derivative meets -inf - (-inf) in an empty row
    first_max = jnp.arange(v) == jnp.argmax(z_safe, axis=1)[:, None]
    # The max class's logit (a reduction, not a gather, which a vocabulary-sharded type has not).
    m = jnp.max(jnp.where(first_max, z_safe, -np.inf), axis=1, keepdims=True)
    r = jnp.sum(jnp.where(first_max, 0, jnp.exp(z - m)), axis=1, keepdims=True)
    r = jnp.where(m == np.inf, np.nan, r)  # a +inf logit: a non-finite loss
    has_mass = nonempty | jnp.isnan(r)
    confident = r < 1
    m_held = jax.lax.stop_gradient(m)
    log_s = jnp.where(
        confident,
        jnp.log1p(jnp.where(confident, r, 0)),
        jnp.log(jnp.where(has_mass, jnp.sum(jnp.exp(z - m_held), axis=1, keepdims=True), 1)),
    )
    log_s = jnp.where(has_mass, log_s, 0)
    m = jnp.where(confident, m, m_held)
    nll = log_s + jnp.where(first_max & confident, 0, m - z)  # +inf at invalid classes
    lse = jnp.where(has_mass, m + log_s, -np.inf)

    losses = _finish(options, rows, _weighted_nll(options, problem, valid, nll), has_mass, lse, bad)
    if not options.aux:
        return losses
    return losses, _aux(z, lse, has_mass, labels if options.integer else None)


def _aux(z, lse, has_mass, labels, axis=None) -> CrossEntropyAux:
    """``return_aux``'s values from the ``[N, V]`` transformed, masked logits ``z`` and their
    ``lse`` (``[N, 1]``), by autodiff: ``log p = z' - lse`` on the classes of finite ``z'``.
    With a vocabulary ``axis`` (``shard_map``), ``z`` and the labels are this shard's classes
    and ids, ``lse`` the whole rows', and the sums over classes are summed over the shards;
    the argmax is the lowest global class id at the max of every shard's."""
    v = z.shape[1]

    def total(x):
        x = jnp.sum(x, axis=1)
        return x if axis is None else jax.lax.psum(x, axis)

    finite = (z != -np.inf) & has_mass
    log_p = jnp.where(finite, z - lse, 0)
    p = jnp.where(finite, jnp.exp(log_p), 0)
    z_top = jnp.where(has_mass, z, 0)
    argmax = jnp.argmax(z_top, axis=1)
    ids = jnp.arange(v, dtype=argmax.dtype)
    if axis is not None:
        ids = ids + (jax.lax.axis_index(axis) * v).astype(argmax.dtype)
        local_max = jax.lax.stop_gradient(jnp.max(z_top, axis=1))
        top = local_max == jax.lax.pmax(local_max, axis)
        argmax = jax.lax.pmin(jnp.where(top, ids[argmax], _NO_CLASS), axis)
    at_argmax = ids == argmax[:, None]
    rows = has_mass[:, 0]
    target_logprob = None
    if labels is not None:
        z_t = total(jnp.where(jnp.arange(v, dtype=labels.dtype) == labels[:, None], z, 0))
        found = total(((labels >= 0) & (labels < v)).astype(z.dtype)[:, None]) > 0
        target_logprob = jnp.where(rows, z_t - lse[:, 0], -np.inf)
        target_logprob = jnp.where(found, target_logprob, np.nan)
    return CrossEntropyAux(
        lse[:, 0],
        jnp.where(rows & (argmax != _NO_CLASS), argmax, -1).astype(jnp.int32),
        total(jnp.where(at_argmax, p, 0)),
        -total(p * log_p),
        target_logprob,
    )


# The sharded argmax of a row whose max no shard holds (a NaN logit): -1, as the kernels give.
_NO_CLASS = np.iinfo(np.int32).max


def _vocab_parallel(options: Options, problem: Problem, bad: jax.Array) -> jax.Array:
    """`losses` with the class axis split over ``options.vocab_axis`` inside ``shard_map``: the
    same formula, its sums over classes (of ``exp(z' - m)``, of the target terms, of the valid
    classes) summed over the shards and the max taken over them, differentiated by autodiff
    through those collectives (so ``shard_map``'s ``check_vma`` must be on, its default: off,
    the transpose of a ``psum`` sums the replicated cotangent once per shard). It leaves out
    `losses`' care for confident rows (the mass besides the max): it is the plain formula."""
    axis = options.vocab_axis
    bad = jax.lax.psum(bad.astype(jnp.int32), axis) > 0  # a NaN in any shard's classes
    rows = problem.rows
    z, valid = _masked_logits(options, problem)
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(z, axis=1, keepdims=True)), axis)
    m = jnp.where(jnp.isfinite(m), m, 0)
    s = jax.lax.psum(jnp.sum(jnp.exp(z - m), axis=1, keepdims=True), axis)
    has_mass = (s != 0) | jnp.isnan(s)
    log_s = jnp.where(has_mass, jnp.log(jnp.where(has_mass, s, 1)), 0)
    lse = jnp.where(has_mass, m + log_s, -np.inf)
    nll = (m + log_s) - z  # +inf at invalid classes
    # The label's one-hot is zero where another shard owns the label.
    loss = jax.lax.psum(_weighted_nll(options, problem, valid, nll, axis=axis), axis)
    losses = _finish(options, rows, loss, has_mass, lse, bad)
    if not options.aux:
        return losses
    return losses, _aux(z, lse, has_mass, problem.labels if options.integer else None, axis)


def _masked_logits(options: Options, problem: Problem) -> tuple[jax.Array, jax.Array]:
    """``(z', valid)``: the transformed logits ``[N, V]`` in the accumulation dtype, -inf at the
    invalid classes, and the ``[N, V]`` mask of the valid ones."""
    logits, where = logits_of(problem), problem.where
    shape = logits.shape
    valid = jnp.ones(shape, jnp.bool_) if where is None else jnp.broadcast_to(where, shape)
    z = _transformed(options, problem, logits.astype(problem.accumulation_dtype))
    return jnp.where(valid, z, -np.inf), valid


def _weighted_nll(options: Options, problem: Problem, valid, nll, *, axis=None) -> jax.Array:
    """``sum_k w_k q_k nll_k`` per row (``[N]``), ``q`` the labels with the smoothing spread over
    the valid classes (counted over the vocabulary ``axis`` too where one is given)."""
    labels, class_weights = problem.labels, problem.class_weights
    dtype = problem.accumulation_dtype
    if options.integer:
        q = jax.nn.one_hot(labels, problem.num_classes, dtype=dtype)
    else:
        q = jnp.where(valid, labels.astype(dtype), 0)
    if options.label_smoothing:
        e = options.label_smoothing
        n_valid = jnp.sum(valid, axis=1, keepdims=True, dtype=dtype)
        if axis is not None:
            n_valid = jax.lax.psum(n_valid, axis)
        q = (1 - e) * q + jnp.where(valid, e / jnp.maximum(n_valid, 1), 0)
    wq = q if class_weights is None else q * class_weights
    # A zero weight contributes 0 even at an infinite nll, and no branch multiplies 0 by inf. The
    # derivative in q is exact wherever nll is finite; at a -inf logit it is 0 here (it is +inf
    # in the custom_vjp implementations).
    nll = jnp.where(wq != 0, nll, jnp.where(jnp.isinf(nll), 0, nll))
    return jnp.sum(wq * nll, axis=1)


def _finish(options: Options, rows, loss, has_mass, lse, bad) -> jax.Array:
    """The per-example losses from the rows' weighted sums ``loss`` (``[N]``): plus the z-loss
    where a row has mass, NaN for a label outside ``[0, V)`` or a NaN logit (``bad``), 0 for
    the rows that do not count."""
    if options.z_loss:
        loss = loss + jnp.where(
            has_mass[:, 0], options.z_loss * jnp.where(has_mass, lse, 0)[:, 0] ** 2, 0
        )
    if options.integer:
        loss = jnp.where(jnp.isnan(rows.label_weight[:, 0]), np.nan, loss)
    loss = jnp.where(bad[:, 0], np.nan, loss)
    return jnp.where(rows.counted[:, 0], loss, 0)
