"""The ``"xla"`` implementation: plain JAX with a ``custom_vjp``.

For ``[N, V]`` logits the forward pass is the tile math of `kernels._tile` applied to one block
that spans the whole vocabulary; it saves only per-example statistics (`_tile.Stats`: the max,
the mass besides it and the total target weight ``W``, float32, float64 for float64 logits)
beside its inputs. On the CPU, float32 integer labels take one pass against the label's logit
instead of the max (`_lse_at_label`). With ``return_aux`` on the CPU (and GPUs), the max and
the argmax come from one reduction over chunks of the vocabulary (`_max_and_argmax`), and on
the CPU the float32 sum against the max is taken in chunks too (`_lse_at_max`); where no aux
value is differentiated, the backward leaves their terms out (`_bwd`). The backward pass is the
kernels' own block step (`_blocks.backward_block`) on that one block: it recomputes ``p =
exp(z' - m) / s`` and forms ``(W + 2 z_loss lse) p - w q`` in one fused elementwise pass, then
applies the softcap and temperature chain rule. No ``[N, V]`` float32 copy of the logits is
kept between the two passes. A `Linear` problem (the fused loss) runs the blockwise loops of
`_xla_linear`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

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


def _spec(x):
    """The partition spec that ``x``'s type carries (explicit sharding), or None."""
    return getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)


def _vocabulary_is_sharded(x) -> bool:
    """Whether ``x``'s type carries an explicit sharding of its class axis."""
    spec = _spec(x)
    return spec is not None and len(spec) > 1 and spec[1] is not None


def _explicitly_sharded(x) -> bool:
    """Whether ``x``'s type carries an explicit sharding of any axis: its rows' gathers,
    scatters and reshapes would need shardings spelled out for every per-row value."""
    spec = _spec(x)
    return spec is not None and any(axis is not None for axis in spec)


def _pick(x, columns, lowest):
    """``x[i, columns[i, j]]`` as ``[N, k]``, for ``columns`` ``[N, k]`` clipped into ``[0, V)``.

    A gather, except on an explicitly vocabulary-sharded type, where a gather cannot partition
    and a max over the one column (``lowest`` elsewhere) picks the same value.
    """
    v = x.shape[1]
    if _vocabulary_is_sharded(x):
        onehot = _tile.onehot_block(columns, 0, v)  # k = 1: the labels
        return jnp.max(jnp.where(onehot, x, jnp.array(lowest, x.dtype)), 1, keepdims=True)
    return jnp.take_along_axis(x, jnp.clip(columns, 0, v - 1), axis=1)


def _target_logit(options: Options, problem: Problem, temperature):
    """``z'_t`` per row, ``[N, 1]``: -inf where the target class is invalid; a label outside
    ``[0, V)`` picks the class it is clipped to.

    Picked from the raw logits behind a barrier (so that XLA does not share an upcast copy), then
    transformed, then masked: an invalid class is at -inf.
    """
    logits, where = problem.logits, problem.where
    labels = problem.labels[:, None]
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
    logits, where, rows = problem.logits, problem.where, problem.rows
    dtype = problem.accumulation_dtype
    t = _canonical.temperature(options, problem)
    premasked = _premasked(problem)

    def raw_and_z():
        # Formed where each is used: a value closed over by a branch of `_lse_at_label`'s
        # cond is an operand of it, materialised.
        raw = _masked_raw(logits, where) if premasked is None else premasked
        return raw, _transformed(options, problem, t, premasked)

    z_label = _target_logit(options, problem, t) if options.integer else None
    vocab_parallel = options.vocab_axis is not None
    besides_label = options.integer and logits.shape[1] <= _EXACT_IDS and not vocab_parallel
    index = None  # return_aux's argmax, where it is found apart from the monitor's reductions
    if besides_label:

        def at_max(z_max=None):
            return _lse_besides_label(options, problem, *raw_and_z(), z_label, t, z_max)

        if not options.aux and _sums_by_chunks(options, problem):
            # Measured on the CPU only: other platforms keep the row-max path.
            lse = jax.lax.platform_dependent(
                cpu=lambda: _lse_at_label(options, problem, z_label, t, fallback=at_max),
                default=at_max,
            )
        elif options.aux and _argmax_by_chunks(options, problem):

            def by_chunks(sums_by_chunks: bool):
                z_max, x_max, index = _max_and_argmax(options, problem, t)
                if sums_by_chunks:
                    lse = _lse_at_max(problem, z_label, z_max, x_max, t)
                else:
                    lse = at_max(z_max)
                # A NaN or +inf logit makes r NaN: no argmax, whatever the chunks' max saw.
                return lse, jnp.where(jnp.isnan(lse.r), _tile.NOT_AT_MAX, index)

            def by_rows():  # the max, then the monitor's own first class at it
                lse = at_max()
                ref = _tile.reference_point(lse.m)
                return lse, _first_at_max(options, problem, ref, premasked)

            # Timed on the CPU only; the sums in chunks serve there alone (as `_lse_at_label`).
            # Compiled for the targets (benchmarks.aux_goals targets), the chunks' max takes
            # less temporary memory than the two passes for an H100 or H200 and gigabytes for
            # a TPU (bf16 [8192, 128256] on a v5e), which keeps the two passes.
            sums = _sums_by_chunks(options, problem)
            lse, index = jax.lax.platform_dependent(
                cpu=lambda: by_chunks(sums),
                cuda=lambda: by_chunks(False),
                rocm=lambda: by_chunks(False),
                default=by_rows,
            )
        else:
            lse = at_max()
        ref = _tile.reference_point(lse.m)
    else:
        raw, z = raw_and_z()
        z_max = _row_max(options, raw, z, t)
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
        smoothing = _tile.Term(*_tile.dense_term(jnp.broadcast_to(weights, z_s.shape), z_s, ref_s))
    monitor = None
    if options.aux:
        monitor = _monitor(options, problem, ref, z_label, premasked, index)
    state = _tile.RowState(lse, _tile.Term(*target), smoothing, monitor)
    if vocab_parallel:
        state = _sharding.combine(state, options.vocab_axis, logits.shape[1])
    return _canonical.finish_rows(options, problem, state)


def _premasked(problem: Problem):
    """16-bit logits with a mask, masked once in their own dtype behind a barrier (every sum
    then reads that copy: a mask's select, which XLA's CPU does not fuse into a reduction, would
    otherwise be materialised in float32 after the upcast, twice the bytes, once per
    reduction); None for other logits."""
    logits, where = problem.logits, problem.where
    if where is None or logits.dtype == problem.accumulation_dtype:
        return None
    return jax.lax.optimization_barrier(_masked_raw(logits, where))


def _transformed(options: Options, problem: Problem, temperature, premasked):
    """``z'``, transformed and masked, in the accumulation dtype: of ``premasked`` where
    `_premasked` gave it."""
    dtype = problem.accumulation_dtype
    softcap = options.logit_softcap
    if premasked is not None:
        return _tile.transform(premasked.astype(dtype), softcap=softcap, temperature=temperature)
    where = problem.where
    return _tile.masked_transform(
        problem.logits.astype(dtype),
        True if where is None else where,
        softcap=softcap,
        temperature=temperature,
    )


def _scaled_differences(x, x_label, temperature):
    """``(x - x_t) / T``: ``z'_k - z'_t`` without a softcap, from raw logits ``x`` (in the
    accumulation dtype) and the label's ``x_label`` broadcast to them, for a sum only. The
    difference is taken before the scaling, so that it is exact to its own size rather than to
    that of ``z'`` (``z / T`` rounded, then differenced, is off by ``|z'|`` ulps: 3e-6 of the
    loss of a confident row). No select (`_tile.transform`'s, which XLA's CPU does not fuse into
    a reduction: it would materialise the logits' size); an infinite logit stays infinite
    under the product alone, and no derivative is taken here. ``1 / T`` is formed from
    ``x_label`` (finite where it matters): a broadcast constant is materialised at the logits'
    size."""
    d = x - x_label
    if not (isinstance(temperature, float) and temperature == 1.0):
        d = d * (x_label * 0.0 + 1.0 / temperature)
    return d


def _row_max(options: Options, raw, z, temperature):
    """The row max of ``z'``, ``[N, 1]``: read from the raw logits (the transform is monotone and
    exact on one value per row), so that no float32 copy of 16-bit logits is shared by several
    reductions (XLA would materialise it as an ``[N, V]`` temporary)."""
    if options.logit_softcap is None:
        return _transform_rows(options, jnp.max(raw, axis=1, keepdims=True), temperature)
    # tanh on one value per row need not round as XLA's vectorised tanh over the block does,
    # and the max must be one of the block's z' exactly.
    return jnp.max(z, axis=1, keepdims=True)


def _lse_besides_label(
    options: Options, problem: Problem, raw, z, z_label, temperature, z_max=None
):
    """`_tile.lse_besides_label` of the whole row, against its max ``z_max`` (`_row_max` where
    None)."""
    if z_max is None:
        z_max = _row_max(options, raw, z, temperature)
    # Labels behind a barrier: constant labels would have XLA fold the label's column test into
    # a logits-sized constant.
    labels = jax.lax.optimization_barrier(problem.labels[:, None])
    # With a softcap, z_label's tanh need not round as the block's does (`_target_logit`).
    exact_label = None if options.logit_softcap else z_label
    return _tile.lse_besides_label(z, z_max, labels, exact_label)[0]


def _argmax_chunk(v: int) -> int | None:
    """`_max_and_argmax`'s chunk width for ``V`` classes: the largest divisor of ``V`` from 32 to
    ``min(1024, V / 8)``, or None where there is none. XLA's CPU takes the max of short rows
    more slowly, and finds the argmax of the chunk it gathers again more slowly in wide ones
    (float32 [2048, 32768] on 2 cores: the chunks' maxes 14, 11, 7 and 7 ms in chunks of 256,
    512, 1024 and 2048 columns, the gathered chunk's argmax 3, 3, 5 and 10 ms); at most
    ``V / 8``, so that the chunk read again is at most an eighth of the row."""
    return _largest_divisor(v, 32, min(1024, v // 8))


def _argmax_by_chunks(options: Options, problem: Problem) -> bool:
    """Whether `_max_and_argmax` serves ``return_aux`` on the CPU and GPUs (a TPU keeps the max
    and then `_tile.first_at_max`: `_forward`): ``V`` has a width (`_argmax_chunk`), no
    softcap (the max is then read from ``z'``, not from the raw logits: `_row_max`), no mask
    of classes (the chunks read the raw logits), no type with an explicit sharding
    (`_explicitly_sharded`)."""
    logits = problem.logits
    return (
        _argmax_chunk(logits.shape[1]) is not None
        and options.logit_softcap is None
        and options.mask in (None, "row")
        and not _explicitly_sharded(logits)
    )


@jax.named_scope("max_and_argmax")  # a name in profiles, and for the tests
def _max_and_argmax(options: Options, problem: Problem, temperature):
    """``(z_max, x_max, index)``, each ``[N, 1]``: the row max of ``z'`` (`_row_max`'s; -inf in
    a row that the row mask leaves out), the raw logits' row max, and the lowest class id at
    the max (`_tile.first_at_max`'s), from one reduction over the logits in place of two (the
    max, then the first class at it).

    The max is taken over chunks of `_argmax_chunk` columns (``[N, V / width, width]``, a
    bitcast); the row's max is the max of its chunks', and the lowest chunk whose max is the
    row's holds the lowest class at it. That one chunk is gathered again and its argmax found
    by `jnp.argmax` (the lowest index among ties), a variadic reduction into which XLA's CPU
    fuses the gather: `_tile.first_at_max`'s reduction would materialise the gathered
    ``[N, width]`` chunk. The chunks' maxes and the gathered chunk are transformed alike, value
    by value, so both tests compare ``z'``, as `_tile.first_at_max` over the whole row would.
    A row without a finite ``z'`` (no mass: its argmax is -1 downstream) gets a class of its
    first chunk, and so may a row with a NaN or +inf logit (whose chunks' max need not see it),
    which `_forward` sends to -1 by its NaN ``r``."""
    logits = problem.logits
    n, v = logits.shape
    width = _argmax_chunk(v)
    chunks = v // width
    raw = jax.lax.optimization_barrier(logits)  # the chunk is gathered from its own copy
    # Behind a barrier: XLA would fold the max of the chunks' maxes into a second reduction
    # over the logits, and form the chunks' maxes again inside the first-chunk test.
    chunk_max = jax.lax.optimization_barrier(jnp.max(logits.reshape(n, chunks, width), axis=2))
    x_max = jnp.max(chunk_max, axis=1, keepdims=True)
    z_chunks = _transform_rows(options, chunk_max, temperature)
    z_max = jnp.max(z_chunks, axis=1, keepdims=True)
    if options.mask == "row":
        z_max = jnp.where(problem.where, z_max, _tile.NEG_INF)
    first = _tile.first_at_max(z_chunks, _tile.reference_point(z_max), 0, float_ids=True)
    start = jnp.where(first < chunks, first, 0).astype(jnp.int32) * width
    # x_max made to depend on the first-chunk test, the chunks' maxes' last reader, so that
    # the sums that read it (`_lse_at_max`) do not keep them alive: a temporary of V / width
    # floats per row (a barrier does not order them: XLA's CPU drops it before scheduling).
    x_max = x_max + start.astype(x_max.dtype) * 0.0
    window = _pick(raw, start + _iota(start, width), -jnp.inf)
    at = jnp.argmax(_transform_rows(options, window, temperature), axis=1, keepdims=True)
    return z_max, x_max, (start + at.astype(jnp.int32)).astype(z_max.dtype)


def _chunk(v: int) -> int | None:
    """`_lse_at_label`'s chunk width for ``V`` classes: the largest divisor of ``V`` from 32 to
    ``min(1024, V / 128)``, or None where there is none.

    A divisor, so that ``[N, V] -> [N V / width, width]`` is a bitcast (a slice before it made
    XLA's CPU reduction several times slower); at most ``V / 128``, so that the label's chunk,
    gathered (and materialised where the transform has a select), is under 1% of the logits;
    at least 32, below which XLA's CPU reduces the short rows slowly."""
    return _largest_divisor(v, 32, min(1024, v // 128))


def _largest_divisor(v: int, low: int, high: int) -> int | None:
    """The largest divisor of ``v`` from ``low`` to ``high``, or None."""
    return next((w for w in range(high, low - 1, -1) if v % w == 0), None)


def _sums_by_chunks(options: Options, problem: Problem) -> bool:
    """Whether `_sum_besides_label` serves (`_lse_at_label`, `_lse_at_max`): integer labels,
    whole rows whose ``V`` has a chunk width (`_chunk`) on this device (no type with an
    explicit sharding: `_explicitly_sharded`), logits in the accumulation dtype (XLA's CPU
    reduces 16-bit logits reshaped into chunks about five times slower than whole rows,
    measured at [2048, 32768] bfloat16), no softcap and no mask of classes
    (`_scaled_differences`: their selects would be materialised)."""
    logits = problem.logits
    return (
        _chunk(logits.shape[1]) is not None
        and options.logit_softcap is None
        and options.mask in (None, "row")
        and logits.dtype == problem.accumulation_dtype
        and not _explicitly_sharded(logits)
    )


def _sum_besides_label(problem: Problem, raw, x_ref, temperature):
    """``sum_{k != t} exp((x_k - x_ref) / T)`` per row, ``[N, 1]``, of the raw logits ``x``
    against ``x_ref`` (``[N, 1]``, in the accumulation dtype), leaving out the column of the
    label clipped into ``[0, V)``; ``raw`` is the logits behind a barrier, which the label's
    chunk is gathered from.

    The terms are `_scaled_differences`. The sum is taken over chunks of `_chunk` columns,
    each a row of ``logits.reshape(-1, chunk)`` (a bitcast), which XLA's CPU reduces as fast as
    whole rows; the chunk that holds the label is summed again from a gathered window of the
    logits with the label's column left out (`_tile.sum_besides`), in place of its first sum.
    So the label's term never enters the sum, and the reduction over the vocabulary has no
    per-class test (`_tile.lse_besides_label`'s costs about 40% more). Short rows also keep
    XLA's CPU reduction fast where whole rows of more than about 32k classes make it three to
    nine times slower per class (measured on 2 cores, jax 0.10.2 and 0.11.2)."""
    n, v = problem.logits.shape
    dtype = problem.accumulation_dtype
    width = _chunk(v)
    chunks = v // width
    column = jnp.clip(problem.labels, 0, v - 1)[:, None]
    head = problem.logits.reshape(-1, width).astype(dtype)  # a bitcast, and the upcast fused
    d = _scaled_differences(head, jnp.repeat(x_ref, chunks, axis=0), temperature)
    sums = jnp.sum(jnp.exp(d), axis=1).reshape(n, chunks)
    label_chunk = column // width
    start = label_chunk * width
    window = _pick(raw, start + _iota(column, width), -jnp.inf)
    d = _scaled_differences(window.astype(dtype), x_ref, temperature)
    others = jnp.where(_iota(column, chunks) == label_chunk, jnp.zeros((), dtype), sums)
    return jnp.sum(others, axis=1, keepdims=True) + _tile.sum_besides(d, x_ref * 0.0, start, column)


@jax.named_scope("lse_at_label")  # a name in profiles, and for the tests
def _lse_at_label(options: Options, problem: Problem, z_label, temperature, fallback):
    """`_tile.Lse` of whole rows of integer labels with the label's ``z'`` as the reference
    point ``m`` in place of the row max: ``r = sum_{k != t} exp(z'_k - z'_t)``
    (`_sum_besides_label`), one pass over the logits instead of two (the max, then the sum).
    Not with ``return_aux``, whose argmax and entropy are formed against the row max
    (`_lse_at_max`).

    Everything downstream holds for any reference point whose own term is exactly 1 (``lse = m
    + log1p(r)``, ``z' - m`` and the terms): ``r < 1`` only where the label is the row's
    strict max (any other class at or above it adds at least 1), which is where `grad_block`
    and `_tile.label_entry` form ``1 - p_t = r / s``. A row that does not count is given no
    mass (its loss and gradient are 0 either way). Where a row that counts has a non-finite
    reference or ``r`` (a class more than about 80 above the label, a label at -inf, a NaN or
    +inf logit), every row is formed by ``fallback`` instead, against the row max (a
    `jax.lax.cond`: under `jax.vmap`, where it becomes a select, both are formed)."""
    column = jnp.clip(problem.labels, 0, problem.logits.shape[1] - 1)[:, None]
    # The raw logits (picked behind a barrier: no shared upcast), with no softcap and no mask
    # of classes here: z' is x / T, and the row mask leaves out rows that do not count.
    raw = jax.lax.optimization_barrier(problem.logits)
    x_label = _pick(raw, column, -jnp.inf).astype(problem.accumulation_dtype)
    r = _sum_besides_label(problem, raw, x_label, temperature)
    counted = problem.rows.counted
    fits = jnp.all(~counted | (jnp.isfinite(z_label) & jnp.isfinite(r)))
    lse = _tile.Lse(
        jnp.where(counted, z_label, _tile.NEG_INF), jnp.where(counted, r, jnp.zeros((), r.dtype))
    )
    return jax.lax.cond(fits, lambda: lse, fallback)


@jax.named_scope("lse_at_max")  # a name in profiles, and for the tests
def _lse_at_max(problem: Problem, z_label, z_max, x_max, temperature):
    """`_tile.lse_besides_label`'s `_tile.Lse` (against the row max ``z_max``), its sum over
    the classes besides the label formed by `_sum_besides_label` against the raw max ``x_max``
    (both ``[N, 1]``, from `_max_and_argmax`): ``return_aux``'s one pass for the sum, without
    `_tile.lse_besides_label`'s per-class test. The label's own term is added back as
    ``exp(z'_t - m) - 1``, exactly 0 where the label is at the max; a label outside ``[0,
    V)`` left out the class it is clipped to, whose ``z'`` is ``z_label`` (`_target_logit`).
    A row that the row mask leaves out has ``z_max = -inf`` (`_max_and_argmax`), so no mass,
    and a NaN in it (``r`` NaN) reaches neither its loss, aux values or gradient, which are
    those of a row that does not count (tests/test_argmax_chunks.py)."""
    dtype = problem.accumulation_dtype
    raw = jax.lax.optimization_barrier(problem.logits)
    x_ref = _tile.reference_point(x_max.astype(dtype))  # no -inf - -inf in a row without mass
    r = _sum_besides_label(problem, raw, x_ref, temperature)
    r = r + jnp.expm1(z_label - _tile.reference_point(z_max))
    return _tile.Lse(z_max, _tile.massless_to_zero(z_max, r))


def _iota(like, size: int):
    """``[[0, 1, ..., size - 1]]``, typed like ``like``."""
    return jax.lax.broadcasted_iota(like.dtype, (1, size), 1)


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


def _monitor(
    options: Options, problem: Problem, ref, z_label, premasked, index=None
) -> _tile.Monitor:
    """The `_tile.Monitor` of the one block that spans the vocabulary (this shard's classes,
    their argmax a class id of the shard's own, with ``vocab_axis``): its two reductions each
    on their own `_copy` of the logits, the argmax's only where ``index`` (`_max_and_argmax`)
    is None."""
    t = _tile.entropy_term(*_copy(options, problem, ref, 0, premasked=premasked)[:2])
    if index is None:
        index = _first_at_max(options, problem, ref, premasked)
    label = None
    if options.integer:
        labels = problem.labels  # the label's class is this block's (this shard's) or not
        found = ((labels >= 0) & (labels < problem.num_classes)).astype(ref.dtype)[:, None]
        label = _tile.Term(found, _tile.weighted(found, z_label - ref))
    return _tile.Monitor(t, index, label)


def _first_at_max(options: Options, problem: Problem, ref, premasked):
    """`_tile.first_at_max` of the row max's reference point ``ref``, on a `_copy` of the
    logits."""
    return _tile.first_at_max(
        *_copy(options, problem, ref, 1, premasked=premasked)[:2], 0, float_ids=True
    )


# Class ids that float32 holds exactly: `_tile.lse_besides_label` finds the label's column
# with float32 arithmetic.
_EXACT_IDS = 2**24


def _ties(options: Options, problem: Problem, premasked, ref):
    """`_tile.at_max_count` of the row max ``ref``, on a `_copy` of the logits."""
    return _tile.at_max_count(*_copy(options, problem, ref, 3, premasked=premasked)[:2])


def _class_row(problem: Problem):
    return None if problem.class_weights is None else problem.class_weights[None, :]


def _fwd(options: Options, problem: Problem):
    problem = jax.tree.map(lambda p: p.value, problem, is_leaf=_is_primal)
    out, saved = _forward(options, problem)
    return out, (problem, saved)


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _is_zero(x) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


def _instantiate(x):
    """A cotangent as an array: zeros for a `jax.custom_derivatives.SymbolicZero`."""
    if not _is_zero(x):
        return x
    if x.dtype == jax.dtypes.float0:  # the argmax's, which nothing reads
        return np.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros(x.shape, x.dtype)


def _bwd(options: Options, residuals, cotangent):
    """The backward rule, with JAX's symbolic zeros (`defvjp(..., symbolic_zeros=True)`): where
    no ``return_aux`` value is differentiated (a loss whose aux values are only logged), their
    terms are left out of the backward pass, as if they had not been asked for."""
    problem, saved = residuals
    if options.aux:
        loss_ct, aux_ct = cotangent
        if all(_is_zero(c) for c in jax.tree.leaves(aux_ct, is_leaf=_is_zero)):
            options, saved, cotangent = dataclasses.replace(options, aux=False), saved[0], loss_ct
    cotangent = jax.tree.map(_instantiate, cotangent, is_leaf=_is_zero)
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


_cross_entropy.defvjp(_fwd, _bwd, symbolic_zeros=True)
