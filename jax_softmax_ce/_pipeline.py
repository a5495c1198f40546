"""One pipeline for every softmax cross-entropy loss: canonicalise, run one implementation,
reduce.

The public functions validate their Python-level arguments (`prepare`) and call `run`, one
``jit`` keyed by the static options: so an eager call reuses what an earlier call of the same
shapes and options compiled, and inside a caller's ``jit`` it is inlined. `run` canonicalises the
operands into one `_canonical.Problem` (logits, or a `_canonical.Linear` projection for the fused
loss), computes the per-row facts once, hands the problem to the implementation, and reduces.

Every implementation takes ``(options, config, problem)`` and returns per-example losses ``[N]``
in the accumulation dtype, 0 for examples that do not count; with ``options.aux``
(``return_aux=True``) it returns ``(losses, aux)``, ``aux`` a `CrossEntropyAux` of ``[N]`` arrays
from the same pass, which `run` sets to -1 and 0 for examples that do not count and reshapes to
the batch shape, like the losses. One that cannot take a case raises ``NotImplementedError`` with
the reason, and only ``implementation=None`` may choose another.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical, _options, _pallas, _reference, _sharding, _xla
from jax_softmax_ce._canonical import Linear
from jax_softmax_ce._options import Options, Pallas, Reference, Xla
from jax_softmax_ce._util import accumulation_dtype
from jax_softmax_ce.monitoring import CrossEntropyAux

IMPLEMENTATIONS = {
    Xla: _xla.losses,
    Pallas: _pallas.losses,
    Reference: _reference.losses,
}


def choose_implementation(problem: _canonical.Problem, options: Options):
    """What ``implementation=None`` runs: ``"xla"`` on every platform until a kernel has been
    measured faster there."""
    del problem, options
    return Xla()


def prepare(
    logits,
    labels,
    axis,
    where,
    class_weights,
    temperature,
    *,
    weights,
    reduction,
    implementation,
    **options,
) -> dict:
    """The keyword arguments of `run`, validated: the operands as arrays and the statics;
    ``options`` are `_options.make_options`' keywords. Raises where the caller's Python values
    are wrong."""
    temperature_array = _canonical.array_temperature(temperature)
    return dict(
        logits=logits if isinstance(logits, Linear) else _canonical.check_logits(logits),
        labels=jnp.asarray(labels),
        where=_canonical.check_where(where),
        class_weights=None if class_weights is None else jnp.asarray(class_weights),
        weights=_canonical.check_example_weights(weights),
        temperature=temperature_array,
        axis=axis,
        options=_options.make_options(
            temperature=temperature,
            temperature_is_array=temperature_array is not None,
            **options,
        ),
        reduction=_options.check_reduction(reduction),
        implementation=_options.check_implementation(implementation),
    )


@functools.partial(jax.jit, static_argnames=("axis", "options", "reduction", "implementation"))
def run(
    logits,
    labels,
    where,
    class_weights,
    weights,
    temperature,
    *,
    axis,
    options,
    reduction,
    implementation,
):
    """The loss of one call: ``logits`` is a floating array or a `_canonical.Linear`, the rest
    as `prepare` returns them."""
    dtype = accumulation_dtype(logits.dtype)
    if not isinstance(logits, Linear) and 0 in logits.shape:
        # No classes: every example has no valid class, so loss 0 and nothing counts (optax's
        # sum over an empty class axis is 0 too; its tests take an all-False mask this way).
        # The axis is still validated, on a shape with the empty axes widened to one.
        lay = _canonical.layout(tuple(max(n, 1) for n in logits.shape), axis)
        if any(logits.shape[a] == 0 for a in lay.class_axes):
            batch_shape = tuple(logits.shape[a] for a in lay.batch_axes)
            described = f"logits shape {logits.shape} without axis {axis}"
            _canonical.example_weights(weights, batch_shape, dtype, described)
            loss = jnp.zeros(batch_shape if reduction == "none" else (), dtype)
            if not options.aux:
                return loss
            return loss, _empty_aux(batch_shape, dtype, options)
    problem, options, lay = _canonical.canonicalise(
        logits, labels, axis, where, class_weights, temperature, options, weights
    )
    num_classes, sharded = problem.num_classes, ""
    if options.vocab_axis is not None:  # the argmax is a global class id
        num_classes *= _sharding.num_shards(options.vocab_axis)
        sharded = f" on each of {num_classes // problem.num_classes} shards"
    if options.aux and num_classes > MAX_AUX_CLASSES:
        raise ValueError(
            f"return_aux=True takes at most {MAX_AUX_CLASSES} classes (the argmax is carried as "
            f"a float32 class id), got {num_classes} ({logits.shape}{sharded}, axis {axis})"
        )
    if implementation is None:
        implementation = choose_implementation(problem, options)
    if problem.num_rows == 0:
        out = jnp.zeros((0,), dtype)
        if options.aux:
            out = out, _empty_aux((0,), dtype, options)
    else:
        losses = functools.partial(IMPLEMENTATIONS[type(implementation)], options, implementation)
        if isinstance(implementation, (Pallas, Reference)):
            losses = _sharding.explicit_as_auto(losses, problem, options)
        out = losses(problem)
    losses, aux = out if options.aux else (out, None)
    loss = _canonical.reduce_problem(
        losses, problem, options, reduction=reduction, batch_shape=lay.batch_shape, dtype=dtype
    )
    if not options.aux:
        return loss
    return loss, _batch_aux(aux, problem.rows.counted[:, 0], lay.batch_shape)


# Class ids that float32 holds exactly: the kernels carry the running argmax as a float.
MAX_AUX_CLASSES = 2**24


def _empty_aux(batch_shape, dtype, options: Options) -> CrossEntropyAux:
    """The `CrossEntropyAux` of examples that have no class: none counts."""
    zeros = jnp.zeros(batch_shape, dtype)
    argmax = jnp.full(batch_shape, -1, jnp.int32)
    return CrossEntropyAux(zeros, argmax, zeros, zeros, zeros if options.integer else None)


def _batch_aux(aux: CrossEntropyAux, counted, batch_shape) -> CrossEntropyAux:
    """An implementation's ``[N]`` values in the batch shape: argmax -1 and 0 for the float
    values of examples that do not count (ignored, or with no valid class)."""

    def batch(x, empty):
        if x is None:
            return None
        return jnp.where(counted, x, jnp.full((), empty, x.dtype)).reshape(batch_shape)

    return CrossEntropyAux(
        *(batch(x, -1 if name == "argmax" else 0) for name, x in aux._asdict().items())
    )
