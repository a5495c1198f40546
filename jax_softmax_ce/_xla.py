"""The ``"xla"`` implementation: plain JAX with a ``custom_vjp``.

For ``[N, V]`` logits the forward pass is the tile math of `kernels._tile` applied to one block
that spans the whole vocabulary; it saves only per-example statistics (`_tile.Stats`: the max,
the mass besides it and the total target weight ``W``, float32, float64 for float64 logits)
beside its inputs. The backward pass is the kernels' own block step (`_blocks.backward_block`)
on that one block: it recomputes ``p = exp(z' - m) / s`` and forms ``(W + 2 z_loss lse) p - w q``
in one fused elementwise pass, then applies the softcap and temperature chain rule. No
``[N, V]`` float32 copy of the logits is kept between the two passes. A `Linear` problem (the
fused loss) runs the blockwise loops of `_xla_linear`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical, _sharding, _xla_linear
from jax_softmax_ce._canonical import Linear, Problem
from jax_softmax_ce._options import Options, Xla
from jax_softmax_ce._util import accumulation_dtype
from jax_softmax_ce.kernels import _blocks, _tile


def losses(options: Options, config: Xla, problem: Problem) -> jax.Array:
    """Per-example losses ``[N]`` in the accumulation dtype, 0 for examples that do not count;
    with ``options.aux``, ``(losses, aux)``, ``aux`` a `CrossEntropyAux` of ``[N]`` arrays."""
    if isinstance(problem.logits, Linear):
        return _xla_linear.losses(options, config, problem)
    if config.block_sizes is not None:
        raise ValueError(
            "Xla(block_sizes=...) sets the tiles of linear_softmax_cross_entropy's blockwise "
            "loops; the logits losses' XLA implementation works on whole rows and takes none"
        )
    return _cross_entropy(options, problem)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(options: Options, problem: Problem):
    return _forward(options, problem)[0]


def _masked_raw(logits, where):
    """The logits in their own dtype with invalid classes at -inf."""
    return logits if where is None else jnp.where(where, logits, jnp.array(-jnp.inf, logits.dtype))


def _transform_rows(options: Options, rows, temperature):
    """`_tile.transform` of a ``[N, 1]`` value picked from the raw logits."""
    return _tile.transform(
        rows.astype(accumulation_dtype(rows.dtype)),
        softcap=options.logit_softcap,
        temperature=temperature,
    )


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


def _target_logit(options: Options, problem: Problem, temperature):
    """``z'_t`` per row, ``[N, 1]``: -inf where the target class is invalid.

    Picked from the raw logits behind a barrier (so that XLA does not share an upcast copy), then
    transformed, then masked: an invalid class is at -inf.
    """
    logits, labels, where = problem.logits, problem.labels, problem.where
    raw = jax.lax.optimization_barrier(logits)
    z_pick = _transform_rows(options, _pick(raw, labels, -jnp.inf), temperature)
    if options.mask in ("col", "full"):
        valid = _pick(jnp.broadcast_to(where, logits.shape), labels, False)
        z_pick = jnp.where(valid, z_pick, _tile.NEG_INF)
    return z_pick


def _forward(options: Options, problem: Problem):
    """``(losses [N], stats)``: what the backward needs is `_tile.Stats`. With ``options.aux``,
    ``((losses, aux), (stats, aux_rows))``: the `CrossEntropyAux` values and their
    `_tile.AuxRows`."""
    # The row max and the target logit are read from the raw logits (the transform is monotone
    # and exact on one value per row), so that no float32 copy of 16-bit logits is shared by
    # several reductions: XLA would materialise it as an [N, V] temporary.
    logits, where, rows = problem.logits, problem.where, problem.rows
    dtype = problem.accumulation_dtype
    t = _canonical.temperature(options, problem)
    raw = _masked_raw(logits, where)
    premasked = None
    if where is not None and logits.dtype != dtype:
        # 16-bit logits masked once, in their own dtype, and every sum reads that copy: a mask's
        # select, which XLA's CPU does not fuse into a reduction, would otherwise be
        # materialised in float32 after the upcast (twice the bytes), once per reduction.
        premasked = raw = jax.lax.optimization_barrier(raw)
        z = _tile.transform(raw.astype(dtype), softcap=options.logit_softcap, temperature=t)
    else:
        z = _tile.masked_transform(
            logits.astype(dtype),
            True if where is None else where,
            softcap=options.logit_softcap,
            temperature=t,
        )
    if options.logit_softcap is None:
        z_max = _transform_rows(options, jnp.max(raw, axis=1, keepdims=True), t)
    else:
        # tanh on one value per row need not round as XLA's vectorised tanh over the block
        # does, and the max must be one of the block's z' exactly.
        z_max = jnp.max(z, axis=1, keepdims=True)
    z_label = _target_logit(options, problem, t) if options.integer else None
    vocab_parallel = options.vocab_axis is not None
    besides_label = options.integer and logits.shape[1] <= _EXACT_IDS and not vocab_parallel
    if besides_label:
        # Labels behind a barrier: constant labels would have XLA fold the label's column
        # test into a logits-sized constant.
        labels = jax.lax.optimization_barrier(problem.labels[:, None])
        # With a softcap, z_label's tanh need not round as the block's does (`_target_logit`).
        exact_label = None if options.logit_softcap else z_label
        lse, ref = _tile.lse_besides_label(z, z_max, labels, exact_label)
    else:
        # The empty state built like z_max, so that it carries z_max's sharding (rows sharded
        # under an explicit mesh would not mix with a replicated constant).
        empty = _tile.Lse(jnp.full_like(z_max, _tile.NEG_INF), jnp.zeros_like(z_max))
        # The ties counted on a copy (XLA's CPU fuses that reduction), except with a softcap,
        # whose tanh in another fusion might not round as this one's.
        ties = (
            None if options.logit_softcap else functools.partial(_ties, options, problem, premasked)
        )
        lse, ref, _ = _tile.lse_merge(empty, z, z_max, ties=ties)
    if options.integer:
        label_weight = rows.label_weight
        if vocab_parallel:  # the label's term is its owner's
            owned = (problem.labels >= 0) & (problem.labels < logits.shape[1])
            label_weight = jnp.where(owned[:, None], label_weight, 0)
        target = _tile.picked_term(label_weight, z_label, ref)
    else:
        # Each sum on copies of its own: the lse's sum would share z' and z' - ref with the
        # target's, and the total weight's sum would share the upcast of 16-bit labels and the
        # class weights' broadcast with it (a shared [N, V] value is materialised).
        class_row = _class_row(problem)
        labels = problem.labels
        if premasked is not None:  # the labels masked once too, in their own dtype
            labels = jax.lax.optimization_barrier(jnp.where(where, labels, 0))
        z_t, ref_t, (labels_t, class_row_t), where_t = _copy(
            options, problem, ref, 2, (labels, class_row), premasked
        )
        valid_t = True if where_t is None or premasked is not None else where_t
        a = _blocks.target_block(options, 0, True, valid_t, labels_t, None, class_row_t, dtype)
        _, _, (labels_w, class_row_w), where_w = _copy(
            options, problem, ref, 5, (labels, class_row)
        )
        valid_w = True if where_w is None or premasked is not None else where_w
        a_total = _blocks.target_block(
            options, 0, True, valid_w, labels_w, None, class_row_w, dtype
        )
        target = jnp.sum(a_total, axis=-1, keepdims=True), _tile.weighted_sum(a, z_t - ref_t)
    smoothing = None
    if options.label_smoothing:
        z_s, ref_s, class_row_s, where_s = _copy(
            options, problem, ref, 4, _class_row(problem), premasked
        )
        weights = _tile.smoothing_weights(True if where_s is None else where_s, class_row_s, dtype)
        smoothing = _tile.Term(*_tile.dense_term(jnp.broadcast_to(weights, z.shape), z_s, ref_s))
    monitor = None
    if options.aux:
        monitor = _monitor(options, problem, ref, z_label, premasked)
    state = _tile.RowState(lse, _tile.Term(*target), smoothing, monitor)
    if vocab_parallel:
        state = _sharding.combine(state, options.vocab_axis, logits.shape[1])
    return _canonical.finish_rows(options, problem, state)


def _copy(options: Options, problem: Problem, ref, tag: int, labels=None, premasked=None):
    """``(z', ref, labels, where)`` formed from copies of the logits, the mask, ``ref`` (and
    ``labels``, any pytree: the labels, the class weights) behind a barrier, for one reduction
    of the forward: XLA on the CPU fuses each reduction with its own elementwise math only where
    they share no ``[N, V]`` value (an upcast, a transform, ``z' - ref``, a broadcast of the
    class weights); a shared one is materialised. The ``tag``, added to ``ref`` as 0, keeps XLA
    from merging two barriers (and so two copies) into one: a tag that nothing read would be
    dropped first. ``premasked``: 16-bit logits already masked (`_forward`), read instead of
    the logits, and no mask applied to them (``where`` is still returned, for the labels)."""
    source = problem.logits if premasked is None else premasked
    logits, where, ref, tag, labels = jax.lax.optimization_barrier(
        (source, problem.where, ref, jnp.full_like(ref, tag), labels)
    )
    z = _tile.masked_transform(
        logits.astype(ref.dtype),
        True if where is None or premasked is not None else where,
        softcap=options.logit_softcap,
        temperature=_canonical.temperature(options, problem),
    )
    return z, ref + tag * 0, labels, where


def _monitor(options: Options, problem: Problem, ref, z_label, premasked) -> _tile.Monitor:
    """The `_tile.Monitor` of the one block that spans the vocabulary (this shard's classes,
    their argmax a class id of the shard's own, with ``vocab_axis``): its two reductions each
    on their own `_copy` of the logits."""
    t = _tile.entropy_term(*_copy(options, problem, ref, 0, premasked=premasked)[:2])
    index = _tile.first_at_max(
        *_copy(options, problem, ref, 1, premasked=premasked)[:2], 0, float_ids=True
    )
    label = None
    if options.integer:
        labels = problem.labels  # the label's class is this block's (this shard's) or not
        found = ((labels >= 0) & (labels < problem.num_classes)).astype(ref.dtype)[:, None]
        label = _tile.Term(found, _tile.weighted(found, z_label - ref))
    return _tile.Monitor(t, index, label)


# Class ids that float32 holds exactly: `_tile.lse_besides_label` finds the label's column
# with float32 arithmetic.
_EXACT_IDS = 2**24


def _ties(options: Options, problem: Problem, premasked, ref):
    """`_tile.at_max_count` of the row max ``ref``, on a `_copy` of the logits."""
    return _tile.at_max_count(*_copy(options, problem, ref, 3, premasked=premasked)[:2])


def _class_row(problem: Problem):
    return None if problem.class_weights is None else problem.class_weights[None, :]


def _fwd(options: Options, problem: Problem):
    out, saved = _forward(options, problem)
    return out, (problem, saved)


def _bwd(options: Options, residuals, cotangent):
    problem, saved = residuals
    # The saved statistics behind a barrier: the backward's exp(z' - m) is then not the same
    # value as the forward's, which XLA would otherwise share as one [N, V] temporary.
    saved = jax.lax.optimization_barrier(saved)
    stats, cotangent, aux_grad = _canonical.unpack_saved(options, problem, saved, cotangent)
    logits, rows = problem.logits, problem.rows
    dtype = stats.m.dtype
    if logits.dtype != dtype:
        # Keeps XLA from merging this upcast with the forward's into one [N, V] float32 buffer.
        logits = jax.lax.optimization_barrier(logits)
    if not options.integer and problem.labels.dtype != dtype:
        # The same for 16-bit probability labels.
        problem = problem._replace(labels=jax.lax.optimization_barrier(problem.labels))
    ct = jnp.where(rows.counted, cotangent.astype(dtype)[:, None], 0)
    entry = None
    if options.integer:
        z_label = _target_logit(options, problem, _canonical.temperature(options, problem))
        entry = _tile.label_entry(
            z_label, stats.m, stats.r, stats.w_total, stats.w_rest, z_loss=options.z_loss
        )
    grad = _blocks.backward_block(
        options,
        logits.astype(dtype),
        0,
        jnp.ones((1, logits.shape[1]), jnp.bool_),
        True if problem.where is None else problem.where,
        _canonical.operands(
            options, problem, **stats._asdict(), ct=ct, **_canonical.aux_operands(aux_grad)
        ),
        label_entry=entry,
    )
    d_labels = None if grad.d_labels is None else grad.d_labels.astype(problem.labels.dtype)
    terms = _sharding.psum(grad.t_part, options.vocab_axis)
    d_temperature = _canonical.temperature_cotangent(terms, stats, ct, problem, options, aux_grad)
    d_logits = grad.d_logits.astype(problem.logits.dtype)
    return (Problem(d_logits, d_labels, None, None, d_temperature, None),)


_cross_entropy.defvjp(_fwd, _bwd)
