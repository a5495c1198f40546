"""Tests of `linear_softmax_cross_entropy` against the float64 NumPy reference.

The expected values are `numpy_reference`'s on the float64 logits ``x @ w + b``, with the
gradients carried to ``x``, ``w`` and ``b`` by the chain rule, so every implementation is compared
with something other than itself. Shapes are ragged (V prime, N and D not multiples of any block
size), and the Pallas schedules run in interpret mode on tiny shapes.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from platforms import interpret

import jax_softmax_ce as sce
from jax_softmax_ce import BlockSizes, _xla_linear

N, D, V = 37, 13, 53
SMALL_BLOCKS = BlockSizes(8, 16)
# Triton's dot needs tiles of at least 16 in every dimension; the GPU schedule masks the ragged
# ends of all three (N = 37 and V = 53 are not multiples of 16, nor is D = 40).
GPU_BLOCKS, GPU_D = BlockSizes(16, 16, 16), 40
# Corners of the grids that repeat what other cases check (the "vd" layout of every option case,
# more option cases of the second derivatives): with the slow tests, which CI runs, so that the
# README's test command stays short.
SLOW = pytest.mark.slow


def implementation_of(implementation, block_sizes=None, schedule=None, accumulator_bytes=None):
    """The ``implementation`` value for a name and blocks: `sce.Xla` with the blocks of its
    loops (also for None, the automatic choice), `sce.Pallas` for ``schedule`` (compiled where
    the test machine runs it natively, interpreted elsewhere), or ``"reference"``."""
    if implementation == "pallas":
        return sce.Pallas(
            block_sizes=block_sizes,
            schedule=schedule,
            interpret=interpret(schedule),
            accumulator_bytes=accumulator_bytes,
        )
    if implementation in ("xla", None) and block_sizes is not None:
        return sce.Xla(block_sizes)
    return implementation


def linear_ce(
    *args, implementation=None, block_sizes=None, schedule=None, accumulator_bytes=None, **kwargs
):
    """`sce.linear_softmax_cross_entropy` with the implementation of `implementation_of`."""
    impl = implementation_of(implementation, block_sizes, schedule, accumulator_bytes)
    return sce.linear_softmax_cross_entropy(*args, implementation=impl, **kwargs)


def _pallas_args(schedule: str, d: int = D) -> tuple[int, dict]:
    """The hidden size and keyword arguments of a ``"pallas"`` call of ``schedule``."""
    # The TPU schedule sums each tile over hidden chunks: two here, the last one ragged for odd D.
    blocks = GPU_BLOCKS if schedule == "gpu" else BlockSizes(8, 16, -(-d // 2))
    return (GPU_D if schedule == "gpu" else d), {"schedule": schedule, "block_sizes": blocks}


def numpy_linear_ce(
    x,
    w,
    labels,
    *,
    bias=None,
    where=None,
    class_weights=None,
    temperature=1.0,
    reduction="sum",
    **options,
):
    """``(value, losses, dx, dw, db, dT)`` in float64 for ``w`` ``[D, V]``: `numpy_reference`
    on the logits ``x @ w + b``, its logits gradient carried through the matmul."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    labels = np.asarray(labels)
    u = x @ w + (0 if bias is None else np.asarray(bias, np.float64))
    kwargs = dict(
        integer=True,
        where=where,
        class_weights=class_weights,
        temperature=temperature,
        **options,
    )
    plain = numpy_reference.cross_entropy(u, labels, **kwargs)
    cw = None if class_weights is None else np.asarray(class_weights, np.float64)
    ct = numpy_reference.reduction_cotangent(
        plain, labels, integer=True, class_weights=cw, reduction=reduction
    )
    result = numpy_reference.cross_entropy(u, labels, cotangent=ct, **kwargs)
    value = numpy_reference.reduce(
        result, labels, integer=True, class_weights=cw, reduction=reduction
    )
    dz = result.dlogits
    return value, result.loss, dz @ w.T, x.T @ dz, dz.sum(0), result.dtemperature


def _data(seed=0, n=N, d=D, v=V, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * scale
    w = rng.normal(size=(d, v)) / np.sqrt(d)
    b = rng.normal(size=(v,)) * 0.1
    y = rng.integers(0, v, size=(n,))
    return x, w, b, y


def _where_full(y, seed=1, n=N, v=V):
    mask = np.random.default_rng(seed).uniform(size=(n, v)) > 0.3
    mask[np.arange(n), y] = True
    mask[3] = False  # a fully masked example: loss 0, gradient 0
    return mask


OPTIONS = {
    "plain": {},
    "smoothing_weights": {
        "label_smoothing": 0.1,
        "class_weights": np.random.default_rng(5).uniform(0.5, 2.0, size=V),
    },
    "zloss_softcap_temperature": {"z_loss": 1e-2, "logit_softcap": 2.0, "temperature": 1.7},
    "ignore_index": {"ignore_index": -100},
    "where_full": {"where": "full", "label_smoothing": 0.2},
    "where_classes": {"where": "classes", "label_smoothing": 0.1},
    "where_rows": {"where": "rows"},
}


def _resolve(options, y):
    options = dict(options)
    y = np.array(y)
    if options.get("ignore_index") is not None:
        y[::4] = options["ignore_index"]
    where = options.get("where")
    if where == "full":
        options["where"] = _where_full(y)
    elif where == "classes":
        mask = np.ones((1, V), bool)
        mask[0, 1::5] = False
        y = np.where(np.isin(y, np.arange(1, V, 5)), 0, y)
        options["where"] = mask
    elif where == "rows":
        options["where"] = np.arange(N) % 3 != 1
    return options, y


def _jax_options(options):
    out = dict(options)
    for key in ("where", "class_weights"):
        if out.get(key) is not None:
            out[key] = jnp.asarray(out[key])
    return out


def _numpy_options(options):
    out = dict(options)
    if out.get("where") is not None and np.ndim(out["where"]) == 1:
        out["where"] = np.asarray(out["where"])[:, None]
    return out


def _value_and_grads(implementation, x, w, b, y, *, layout="dv", reduction="sum", **kwargs):
    def loss(x, w, b):
        return linear_ce(
            x,
            w if layout == "dv" else w.T,
            y,
            bias=b,
            implementation=implementation,
            weight_layout=layout,
            reduction=reduction,
            **kwargs,
        )

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)


# Every option with "xla" in the "dv" layout; the "vd" layout and the reference on three of them
# (no option, the transforms, a mask) outside the slow set, and the reference in "vd" only there.
_FEW_OPTIONS = ("plain", "zloss_softcap_temperature", "where_full")
_LAYOUTS = [("xla", "dv"), ("xla", "vd"), ("reference", "dv"), ("reference", "vd")]


def _slow_layout(name: str, implementation: str, layout: str) -> bool:
    if (implementation, layout) == ("reference", "vd"):
        return True
    return (implementation, layout) != ("xla", "dv") and name not in _FEW_OPTIONS


@pytest.mark.parametrize(
    ("name", "implementation", "layout"),
    [
        pytest.param(*case, marks=[SLOW] if _slow_layout(*case) else [])
        for case in ((name, *pair) for name in OPTIONS for pair in _LAYOUTS)
    ],
)
def test_values_and_gradients_match_numpy(name, implementation, layout):
    x, w, b, y = _data()
    options, y = _resolve(OPTIONS[name], y)
    reduction = "mean" if name in ("ignore_index", "smoothing_weights") else "sum"
    expected = numpy_linear_ce(x, w, y, bias=b, reduction=reduction, **_numpy_options(options))
    value, (dx, dw, db) = _value_and_grads(
        implementation,
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(b),
        jnp.asarray(y),
        layout=layout,
        reduction=reduction,
        block_sizes=SMALL_BLOCKS,
        **_jax_options(options),
    )
    assert value.dtype == jnp.float64 and dx.shape == (N, D) and dw.shape == (D, V)
    np.testing.assert_allclose(value, expected[0], rtol=1e-10)
    np.testing.assert_allclose(dx, expected[2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dw, expected[3], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(db, expected[4], rtol=1e-9, atol=1e-12)
    losses = linear_ce(
        jnp.asarray(x),
        jnp.asarray(w),
        jnp.asarray(y),
        bias=jnp.asarray(b),
        implementation=implementation,
        block_sizes=SMALL_BLOCKS,
        **_jax_options(options),
    )
    np.testing.assert_allclose(losses, expected[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_array_temperature_gradient(implementation):
    x, w, b, y = _data()
    expected = numpy_linear_ce(x, w, y, bias=b, temperature=1.3, z_loss=0.05, label_smoothing=0.1)

    def loss(t):
        return linear_ce(
            jnp.asarray(x),
            jnp.asarray(w),
            jnp.asarray(y),
            bias=jnp.asarray(b),
            temperature=t,
            z_loss=0.05,
            label_smoothing=0.1,
            reduction="sum",
            implementation=implementation,
            block_sizes=SMALL_BLOCKS,
        )

    value, d_t = jax.value_and_grad(loss)(jnp.asarray(1.3))
    np.testing.assert_allclose(value, expected[0], rtol=1e-10)
    np.testing.assert_allclose(d_t, expected[5], rtol=1e-9)


@pytest.mark.parametrize("blocks", [BlockSizes(1, 1), BlockSizes(5, 7), BlockSizes(64, 64)])
def test_block_sizes_do_not_change_the_result(blocks):
    x, w, b, y = _data(n=23, d=6, v=31)
    expected = numpy_linear_ce(x, w, y, bias=b)
    x, w, b, y = (jnp.asarray(a) for a in (x, w, b, y))
    value, (dx, dw, db) = _value_and_grads("xla", x, w, b, y, block_sizes=blocks)
    np.testing.assert_allclose(value, expected[0], rtol=1e-10)
    np.testing.assert_allclose(dx, expected[2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dw, expected[3], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(db, expected[4], rtol=1e-9, atol=1e-12)


PALLAS_CASES = {
    "plain": {},
    "options": {"label_smoothing": 0.1, "z_loss": 1e-2, "logit_softcap": 3.0, "ignore_index": -1},
    "where_full": {"where": "full"},
    "where_classes": {"where": "classes", "temperature": 1.5},
}


@pytest.mark.parametrize("layout", ["dv", pytest.param("vd", marks=SLOW)])
@pytest.mark.parametrize(
    ("name", "schedule", "accumulator_bytes"),
    # One byte of accumulators makes the GPU backward run its two passes of one-block chunks:
    # three of rows (N = 37, the last one starting early) and four of columns (V = 53), for every
    # case outside the slow set; the one-pass GPU backward there only without options. The
    # strict TPU interpreter, the slowest, runs two of the option cases outside the slow set.
    [
        pytest.param(
            name,
            schedule,
            accumulator_bytes,
            marks=[SLOW]
            if (schedule == "tpu" and name in ("options", "where_classes"))
            or (schedule == "gpu" and accumulator_bytes is None and name != "plain")
            else [],
        )
        for name in PALLAS_CASES
        for schedule, accumulator_bytes in [("tpu", None), ("gpu", None), ("gpu", 1)]
    ],
)
def test_pallas_matches_numpy(name, schedule, accumulator_bytes, layout):
    d, pallas = _pallas_args(schedule)
    pallas["accumulator_bytes"] = accumulator_bytes
    x, w, b, y = _data(n=N, d=d, v=V)
    options, y = _resolve(PALLAS_CASES[name], y)
    expected = numpy_linear_ce(x, w, y, bias=b, **_numpy_options(options))
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w, b)]
    value, (dx, dw, db) = _value_and_grads(
        "pallas",
        *f32,
        jnp.asarray(y, jnp.int32),
        layout=layout,
        **pallas,
        **_jax_options(options),
    )
    assert value.dtype == jnp.float32 and dx.dtype == jnp.float32
    np.testing.assert_allclose(value, expected[0], rtol=2e-5)
    np.testing.assert_allclose(dx, expected[2], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(dw, expected[3], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(db, expected[4], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    ("schedule", "accumulator_bytes"),
    [("tpu", None), pytest.param("gpu", None, marks=SLOW), ("gpu", 1)],
)
def test_pallas_array_temperature_gradient(schedule, accumulator_bytes):
    d, pallas = _pallas_args(schedule)
    x, w, b, y = _data(n=N, d=d, v=V)
    expected = numpy_linear_ce(x, w, y, bias=b, temperature=1.3, z_loss=0.05, label_smoothing=0.1)

    def loss(x, w, b, t):
        return linear_ce(
            x,
            w,
            jnp.asarray(y, jnp.int32),
            bias=b,
            temperature=t,
            z_loss=0.05,
            label_smoothing=0.1,
            reduction="sum",
            implementation="pallas",
            accumulator_bytes=accumulator_bytes,
            **pallas,
        )

    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w, b)]
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*f32, jnp.float32(1.3))
    np.testing.assert_allclose(value, expected[0], rtol=2e-5)
    for got, want in zip(grads, (expected[2], expected[3], expected[4], expected[5]), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_pallas_on_cpu_runs_the_interpreter():
    """implementation="pallas" on a CPU runs the kernels in Pallas' interpreter, as it does for
    the logits losses (it used to raise for the fused loss)."""
    x, w, b, y = _data()
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w, b)]
    losses = sce.linear_softmax_cross_entropy(
        f32[0], f32[1], jnp.asarray(y), bias=f32[2], implementation="pallas"
    )
    np.testing.assert_allclose(losses, numpy_linear_ce(x, w, y, bias=b)[1], rtol=2e-5)


def test_three_dimensional_inputs_and_vmap():
    x, w, b, y = _data(n=24)
    x3, y3 = x.reshape(2, 3, 4, D), y.reshape(2, 3, 4)
    expected = numpy_linear_ce(x, w, y, bias=b)[1]
    out = linear_ce(jnp.asarray(x3), jnp.asarray(w), jnp.asarray(y3), bias=jnp.asarray(b))
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out.reshape(-1), expected, rtol=1e-10)

    def per_batch(xb, yb):
        return linear_ce(xb, jnp.asarray(w), yb, bias=jnp.asarray(b), block_sizes=SMALL_BLOCKS)

    batched = jax.vmap(per_batch)(jnp.asarray(x3), jnp.asarray(y3))
    np.testing.assert_allclose(batched.reshape(-1), expected, rtol=1e-10)
    grads = jax.vmap(jax.grad(lambda xb, yb: per_batch(xb, yb).sum()))(
        jnp.asarray(x3), jnp.asarray(y3)
    )
    np.testing.assert_allclose(
        grads.reshape(-1, D), numpy_linear_ce(x, w, y, bias=b)[2], rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("layout", ["dv", pytest.param("vd", marks=SLOW)])
@pytest.mark.parametrize("engine", ["xla", "pallas:tpu", "pallas:gpu"])
def test_bfloat16_inputs_accumulate_in_float32(engine, layout):
    implementation, _, schedule = engine.partition(":")
    d, pallas = _pallas_args(schedule, d=32) if schedule else (32, {"block_sizes": SMALL_BLOCKS})
    x, w, b, y = _data(n=32, d=d, v=97)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    expected = numpy_linear_ce(
        np.asarray(xb, np.float64), np.asarray(wb, np.float64), y, bias=b, reduction="mean"
    )
    value, (dx, dw, db) = _value_and_grads(
        implementation,
        xb,
        wb,
        jnp.asarray(b, jnp.float32),
        jnp.asarray(y),
        layout=layout,
        reduction="mean",
        **pallas,
    )
    assert value.dtype == jnp.float32
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    # The gradient tile is rounded to bfloat16 before its two matmuls (like Cut Cross-Entropy).
    np.testing.assert_allclose(np.asarray(dx, np.float64), expected[2], rtol=2e-2, atol=2e-4)
    np.testing.assert_allclose(np.asarray(dw, np.float64), expected[3], rtol=2e-2, atol=2e-4)
    np.testing.assert_allclose(db, expected[4], rtol=1e-4, atol=1e-6)


def test_gradient_filter_error_is_bounded():
    x, w, b, y = _data(n=32, d=16, v=211, scale=4.0)  # sharp softmax: most |p - q| are tiny
    eps = 1e-3
    blocks = BlockSizes(4, 8)
    args = [jnp.asarray(a) for a in (x, w, b, y)]
    exact = _value_and_grads("xla", *args, block_sizes=blocks)
    filtered = _value_and_grads("xla", *args, block_sizes=blocks, gradient_filter_eps=eps)
    np.testing.assert_allclose(filtered[0], exact[0], rtol=1e-12)  # the forward is exact
    dx_err = np.abs(np.asarray(filtered[1][0] - exact[1][0]))
    dw_err = np.abs(np.asarray(filtered[1][1] - exact[1][1]))
    # Each skipped |dl/dz| < eps (cotangent 1): the bounds of the docstring.
    assert np.all(dx_err <= eps * np.abs(w).sum(1)[None, :] + 1e-12)
    assert np.all(dw_err <= eps * np.abs(x).sum(0)[:, None] + 1e-12)
    assert dx_err.max() > 0  # some tiles were skipped
    # Two hidden chunks on TPU, whose backward then skips the second phase of a dropped tile.
    for name, pallas_blocks in (("tpu", BlockSizes(16, 64, 8)), ("gpu", BlockSizes(16, 64))):
        out = _value_and_grads(
            "pallas",
            *[a.astype(jnp.float32) if a.dtype == jnp.float64 else a for a in args],
            block_sizes=pallas_blocks,
            gradient_filter_eps=eps,
            schedule=name,
        )
        err = np.abs(np.asarray(out[1][0], np.float64) - np.asarray(exact[1][0]))
        assert np.all(err <= eps * np.abs(w).sum(1)[None, :] + 1e-4)


def test_reference_implementation_supports_forward_mode_but_not_filtering():
    x, w, b, y = _data()
    args = [jnp.asarray(a) for a in (x, w, b)]

    def loss(x):
        return linear_ce(
            x, args[1], jnp.asarray(y), bias=args[2], implementation="reference", reduction="sum"
        )

    _, tangent = jax.jvp(loss, (args[0],), (jnp.ones_like(args[0]),))
    expected = numpy_linear_ce(x, w, y, bias=b)[2].sum()
    np.testing.assert_allclose(tangent, expected, rtol=1e-9)
    with pytest.raises(NotImplementedError, match="gradient_filter_eps"):
        linear_ce(x, w, y, implementation="reference", gradient_filter_eps=1e-3)


def _float32_losses(implementation, x, w, b, y, class_weights, **kwargs):
    """Per-example losses of float32 ``x``, ``w``, ``b`` with class weights."""
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return linear_ce(
        f32(x),
        f32(w),
        jnp.asarray(y),
        bias=f32(b),
        class_weights=f32(class_weights),
        implementation=implementation,
        **kwargs,
    )


@pytest.mark.parametrize("engine", ["xla", "pallas:tpu"])
def test_eager_calls_compile_once(engine, compilations):
    """A second eager call with the same shapes and options compiles nothing on the test's
    thread (the blockwise loops and the kernels used to be traced and compiled again on every
    call)."""
    implementation, _, schedule = engine.partition(":")
    d, pallas = _pallas_args(schedule) if schedule else (D, {"block_sizes": SMALL_BLOCKS})
    (x, w, b, y), (x2, *_) = _data(d=d), _data(d=d, seed=1)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    args = [f32(x), f32(x2), f32(w), f32(b), jnp.asarray(y)]

    def loss(inputs):
        return linear_ce(
            inputs, args[2], args[4], bias=args[3], implementation=implementation, **pallas
        )

    first = loss(args[0])
    before = compilations()
    second = loss(args[1])
    assert compilations() == before, compilations.names(before)
    for inputs, got in ((x, first), (x2, second)):
        want = numpy_linear_ce(inputs, w, y, bias=b)[1]
        np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.parametrize("engine", ["xla", "pallas:tpu", "pallas:gpu"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_non_finite_logits_are_never_hidden(engine, softcap):
    """A NaN input row, an input row whose logits overflow to +-inf, and a NaN input row whose
    label has class weight 0 all give non-finite losses, with or without a softcap (it caps
    finite logits only); the other rows keep their float64 values."""
    implementation, _, schedule = engine.partition(":")
    d, pallas = _pallas_args(schedule) if schedule else (D, {"block_sizes": SMALL_BLOCKS})
    x, w, b, y = _data(d=d)
    x[0, 0] = np.nan
    x[1] = 3e38 * np.sign(w[:, 0])  # logits x W reach +inf
    x[2, -1] = np.nan
    y[2] = np.setdiff1d(np.arange(V), y[3:])[0]  # a class no other row has
    cw = np.ones(V)
    cw[y[2]] = 0.0
    losses = _float32_losses(implementation, x, w, b, y, cw, logit_softcap=softcap, **pallas)
    assert not np.any(np.isfinite(losses[:3]))
    want = numpy_linear_ce(x[3:], w, y[3:], bias=b, logit_softcap=softcap)[1]
    np.testing.assert_allclose(losses[3:], want, rtol=2e-5)


@pytest.mark.parametrize("engine", ["xla", "pallas:tpu", "pallas:gpu"])
def test_a_nan_logit_in_a_wide_block_is_never_hidden(engine):
    """One NaN logit per row (a NaN bias) in ``[32, 128]`` tiles, where XLA's vectorised max on
    CPU skips it, on a class of weight 0 that no label names: every loss is NaN."""
    implementation, _, schedule = engine.partition(":")
    blocks = {"tpu": BlockSizes(32, 128, 8), "gpu": BlockSizes(32, 128, 16)}
    kwargs = {"block_sizes": blocks.get(schedule, BlockSizes(32, 128))}
    if schedule:
        kwargs.update(schedule=schedule)
    x, w, b, y = _data(n=32, d=16, v=128)
    b[3] = np.nan
    y[y == 3] = 4
    cw = np.ones(128)
    cw[3] = 0.0
    losses = _float32_losses(implementation, x, w, b, y, cw, **kwargs)
    assert np.all(np.isnan(losses))


@pytest.mark.parametrize("engine", [None, "xla", "pallas:tpu", "pallas:gpu"])
def test_out_of_range_label_gives_nan_and_masked_label_gives_inf(engine):
    implementation, _, schedule = (engine or "").partition(":")
    d, pallas = _pallas_args(schedule) if schedule else (D, {})
    x, w, _, y = _data(d=d)
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    y = np.array(y)
    y[0], y[2] = V, -1
    kwargs = dict(implementation=implementation or None, **pallas)
    out = linear_ce(x, w, jnp.asarray(y), **kwargs)
    assert np.isnan(out[0]) and np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, [0, 2])))
    # With class weights, a negative label must not wrap around to the last class's weight.
    out = linear_ce(x, w, jnp.asarray(y), class_weights=np.ones(V), **kwargs)
    assert np.isnan(out[0]) and np.isnan(out[2])
    where = np.ones((1, V), bool)
    where[0, y[1]] = False
    out = linear_ce(x, w, jnp.asarray(y), where=where, **kwargs)
    assert np.isposinf(out[1])


@pytest.mark.parametrize("engine", ["xla", "pallas:tpu", "pallas:gpu"])
def test_large_logits_and_nothing_counted(engine):
    """Logits around 1e4 keep float32 relative accuracy; a mean over no counted example is 0,
    with zero gradients. The inputs are small multiples of 1/4, so that every logit is exact in
    float32 and the float64 reference sees the logits the loss sees."""
    implementation, _, schedule = engine.partition(":")
    d, pallas = _pallas_args(schedule) if schedule else (D, {"block_sizes": SMALL_BLOCKS})
    rng = np.random.default_rng(12)
    y = rng.integers(0, V, N)
    x32 = jnp.asarray(rng.integers(-2, 3, (N, d)), jnp.float32)
    w32 = jnp.asarray(rng.integers(-2, 3, (d, V)) / 4, jnp.float32)
    b32 = jnp.asarray(1e4 + rng.integers(-8, 9, V) / 4, jnp.float32)
    losses = linear_ce(x32, w32, jnp.asarray(y), bias=b32, implementation=implementation, **pallas)
    want = numpy_linear_ce(x32, w32, y, bias=b32)[1]
    np.testing.assert_allclose(losses, want, rtol=3e-6)

    value, grads = _value_and_grads(
        implementation,
        x32,
        w32,
        b32,
        jnp.full_like(jnp.asarray(y), -1),
        ignore_index=-1,
        reduction="mean",
        **pallas,
    )
    assert value == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


def test_compiled_temporary_memory_does_not_grow_with_logits():
    n, d, v = 4096, 64, 8192  # f32 logits: 128 MiB
    blocks = BlockSizes(256, 512)
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jnp.zeros((n,), jnp.int32)

    def loss(x, w):
        return linear_ce(x, w, y, reduction="mean", block_sizes=blocks)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    tile = blocks.block_n * blocks.block_v * 4
    bound = 16 * tile + 4 * (n * d + d * blocks.block_v + n) * 4
    logits = n * v * 4
    assert bound < logits / 4
    assert temp <= bound, (temp, bound, logits)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": np.zeros((D + 1, V))}, ValueError, r"weight shape \(14, 53\).*inputs shape"),
        ({"weight_layout": "vd"}, ValueError, r"expected \[V, D\]"),
        ({"labels": np.zeros(N + 1, int)}, ValueError, r"labels shape \(38,\)"),
        ({"labels": np.zeros(N)}, TypeError, "labels must be integers"),
        ({"bias": np.zeros(V + 1)}, ValueError, r"bias shape \(54,\) must be \[53\]"),
        (
            {"class_weights": np.ones(V - 1)},
            ValueError,
            r"class_weights shape .* inputs @ weight \(shape",
        ),
        (
            {"where": np.ones((N, V + 1), bool)},
            ValueError,
            r"where shape .* logits inputs @ weight shape",
        ),
        ({"inputs": np.zeros((N, D), int)}, TypeError, "inputs must be floating"),
        ({"weight": np.zeros((D, V), np.float32)}, TypeError, "weight dtype float32"),
        ({"gradient_filter_eps": -1.0}, ValueError, "gradient_filter_eps"),
        ({"weight_layout": "dd"}, ValueError, "weight_layout"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"implementation": "cuda"}, ValueError, "implementation"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
    ],
)
def test_errors_name_the_argument_and_shapes(kwargs, error, match):
    args = {
        "inputs": np.zeros((N, D)),
        "weight": np.zeros((D, V)),
        "labels": np.zeros(N, int),
    }
    args.update(kwargs)
    inputs, weight, labels = args.pop("inputs"), args.pop("weight"), args.pop("labels")
    with pytest.raises(error, match=match):
        sce.linear_softmax_cross_entropy(inputs, weight, labels, **args)


def _numpy_input_hvp(x, w, b, u):
    """``d/dx <dL/dx, u>`` for the plain summed loss: per row ``W (diag p - p p^T) W^T u``."""
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    wu = u @ w  # [N, V]: (W^T u_i) per row
    hz = p * wu - p * (p * wu).sum(1, keepdims=True)
    return hz @ w.T


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_grad_of_grad_is_the_softmax_hessian(layout):
    x, w, b, y = _data(seed=21)
    u = np.random.default_rng(22).normal(size=x.shape)

    def loss(x):
        return linear_ce(
            x,
            jnp.asarray(w if layout == "dv" else w.T),
            jnp.asarray(y),
            bias=jnp.asarray(b),
            weight_layout=layout,
            reduction="sum",
            block_sizes=SMALL_BLOCKS,
        )

    hvp = jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), jnp.asarray(u))))(jnp.asarray(x))
    assert hvp.shape == x.shape and hvp.dtype == jnp.float64
    np.testing.assert_allclose(hvp, _numpy_input_hvp(x, w, b, u), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ["tpu", "gpu"])
def test_pallas_grad_of_grad_is_the_softmax_hessian(schedule):
    """The Pallas kernels have no derivative rules; their custom_vjp rules are XLA's, so grad of
    grad is exact: the input Hessian-vector product against float64 NumPy."""
    d, pallas = _pallas_args(schedule)
    x, w, b, y = _data(seed=21, d=d)
    u = np.random.default_rng(22).normal(size=x.shape)

    def loss(x):
        return linear_ce(
            x,
            jnp.asarray(w),
            jnp.asarray(y),
            bias=jnp.asarray(b),
            reduction="sum",
            implementation="pallas",
            **pallas,
        )

    hvp = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), jnp.asarray(u)))(jnp.asarray(x))
    assert hvp.shape == x.shape and hvp.dtype == jnp.float64
    np.testing.assert_allclose(hvp, _numpy_input_hvp(x, w, b, u), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ["tpu", "gpu"])
def test_pallas_under_vmap(schedule):
    """vmap over a batch of token blocks sharing the projection: losses, and per-batch gradients
    (vmap of grad), against float64 NumPy per batch element."""
    d, pallas = _pallas_args(schedule)
    x, w, b, y = _data(seed=27, n=24, d=d)
    x3, y3 = x.reshape(2, 12, d), y.reshape(2, 12)

    def loss(x, w, y):
        return linear_ce(x, w, y, bias=jnp.asarray(b), implementation="pallas", **pallas)

    args = (jnp.asarray(x3, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y3))
    losses = jax.vmap(loss, in_axes=(0, None, 0))(*args)
    grads = jax.vmap(
        jax.grad(lambda x, w, y: loss(x, w, y).sum(), argnums=(0, 1)), in_axes=(0, None, 0)
    )(*args)
    for k in range(2):
        want = numpy_linear_ce(x3[k], w, y3[k], bias=b)
        np.testing.assert_allclose(losses[k], want[1], rtol=2e-5)
        np.testing.assert_allclose(grads[0][k], want[2], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(grads[1][k], want[3], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("smoothing_weights", marks=SLOW),
        "zloss_softcap_temperature",
        pytest.param("where_full", marks=SLOW),
    ],
)
def test_grad_of_grad_with_options_matches_reference(name):
    """Second derivatives with respect to inputs and weight, through the custom_vjp's backward
    loops, against autodiff of the materialised formula ("reference")."""
    x, w, b, y = _data(seed=23)
    options, y = _resolve(OPTIONS[name], y)
    rng = np.random.default_rng(24)
    u, t = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape))

    def hvp(implementation):
        def loss(x, w):
            return linear_ce(
                x,
                w,
                jnp.asarray(y),
                bias=jnp.asarray(b),
                implementation=implementation,
                reduction="mean",
                **({"block_sizes": SMALL_BLOCKS} if implementation == "xla" else {}),
                **_jax_options(options),
            )

        def directional(x, w):
            dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
            return jnp.vdot(dx, u) + jnp.vdot(dw, t)

        return jax.grad(directional, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))

    got, want = hvp("xla"), hvp("reference")
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == jnp.float64
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("axis", ["tokens", "vocabulary"])
def test_sharded_inputs_under_jit(axis, mesh):
    """Inputs sharded over tokens, or the projection over the vocabulary, give the unsharded
    values and gradients (XLA partitions the loops)."""
    P = jax.sharding.PartitionSpec
    x, w, b, y = _data(seed=25, n=16, v=52)  # divisible by any mesh size up to 4
    expected = numpy_linear_ce(x, w, y, bias=b, reduction="mean")
    put = {
        "tokens": (P("d", None), P(None, None), P(None)),
        "vocabulary": (P(None, None), P(None, "d"), P("d")),
    }[axis]
    args = [
        jax.device_put(jnp.asarray(a), jax.NamedSharding(mesh, spec))
        for a, spec in zip((x, w, b), put, strict=True)
    ]
    fn = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: linear_ce(
                x, w, jnp.asarray(y), bias=b, reduction="mean", block_sizes=SMALL_BLOCKS
            ),
            argnums=(0, 1, 2),
        )
    )
    value, grads = fn(*args)
    np.testing.assert_allclose(value, expected[0], rtol=1e-10)
    for got, want in zip(grads, expected[2:5], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.fixture
def mesh_axes(monkeypatch):
    """``mesh_axes(*sizes)``: on one device, the XLA loops group rows and classes as for
    operands on a mesh of automatic axes of these sizes (`_xla_linear._groups`). Returns the
    ``(size, groups)`` that the loops choose, as they trace; jit caches are cleared around, so
    that no trace crosses the change."""
    chosen = []
    groups = _xla_linear._groups

    def spy(x, size, block):
        chosen.append((size, groups(x, size, block)))
        return chosen[-1][1]

    def force(*sizes):
        monkeypatch.setattr(_xla_linear, "_automatic_axis_sizes", lambda x: list(sizes))
        monkeypatch.setattr(_xla_linear, "_groups", spy)
        jax.clear_caches()
        return chosen

    yield force
    jax.clear_caches()


# (N, V, blocks, mesh axes' sizes, (row groups, class groups)). "ragged": the groups' 9 rows and
# 13 classes are not multiples of a block's 2 and 4 from each; "odd": three groups, folded
# unevenly; "clipped": a block wider than the vocabulary, one block of 3 classes per group.
GROUPED = {
    "exact": (32, 64, BlockSizes(8, 16), (2, 4), (8, 8)),
    "ragged": (36, 52, BlockSizes(8, 16), (2, 4), (4, 4)),
    "odd": (30, 45, BlockSizes(6, 15), (3,), (3, 3)),
    "clipped": (16, 24, BlockSizes(8, 64), (2, 4), (8, 8)),
}


def _grouped_options(name, n, v, y):
    rng = np.random.default_rng(31)
    if name == "options":
        return dict(
            label_smoothing=0.1,
            class_weights=rng.uniform(0.5, 2.0, size=v),
            z_loss=1e-2,
            logit_softcap=2.0,
            temperature=1.7,
        )
    if name == "where_full":
        where = rng.uniform(size=(n, v)) > 0.3
        where[np.arange(n), y] = True
        where[3] = False
        return dict(where=where, label_smoothing=0.2)
    if name == "where_rows":
        return dict(where=np.arange(n) % 3 != 1, ignore_index=-100)
    return {}


# Each geometry with two option cases, each option case in two geometries and each layout in
# four: every pair of a geometry and an option case or a layout, not their whole product.
GROUPED_CASES = [
    ("exact", "plain", "dv"),
    ("exact", "options", "vd"),
    ("ragged", "where_full", "dv"),
    ("ragged", "where_rows", "vd"),
    ("odd", "options", "dv"),
    ("odd", "where_full", "vd"),
    ("clipped", "where_rows", "dv"),
    ("clipped", "plain", "vd"),
]


@pytest.mark.parametrize(("geometry", "name", "layout"), GROUPED_CASES)
def test_grouped_loops_match_numpy(geometry, name, layout, mesh_axes):
    """The loops' groups of rows and of classes (which XLA's partitioner splits over mesh axes,
    `_xla_linear._Loops`), forced on one device: values and gradients as the float64 NumPy
    reference's, with exact and ragged groups, an odd number of them, and a clipped block."""
    n, v, blocks, sizes, want_groups = GROUPED[geometry]
    chosen = mesh_axes(*sizes)
    x, w, b, y = _data(seed=30, n=n, v=v)
    options = _grouped_options(name, n, v, y)
    if name == "where_rows":
        y[::4] = -100
    expected = numpy_linear_ce(x, w, y, bias=b, **_numpy_options(options))
    value, (dx, dw, db) = _value_and_grads(
        "xla",
        *(jnp.asarray(a) for a in (x, w, b, y)),
        layout=layout,
        block_sizes=blocks,
        **_jax_options(options),
    )
    assert set(chosen) == {(n, want_groups[0]), (v, want_groups[1])}
    np.testing.assert_allclose(value, expected[0], rtol=1e-10)
    np.testing.assert_allclose(dx, expected[2], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dw, expected[3], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(db, expected[4], rtol=1e-9, atol=1e-12)


@SLOW
@pytest.mark.parametrize("layout", ["dv"])  # "vd": test_grouped_loops_match_numpy
def test_grouped_loops_grad_of_grad_and_vmap(layout, mesh_axes):
    """Grouped loops (`test_grouped_loops_match_numpy`) keep what the custom_vjp gives: grad of
    grad against autodiff of the materialised formula ("reference"), and vmap of grad with an
    array temperature and a gradient filter (that drops nothing) against the ungrouped loops."""
    n, v, blocks, sizes, _ = GROUPED["ragged"]
    x, w, b, y = _data(seed=32, n=n, v=v)
    w = w if layout == "dv" else w.T
    rng = np.random.default_rng(33)
    u, t = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape))
    labels = jnp.asarray(y)

    def loss(x, w, implementation, temperature=1.0, y=labels, **kwargs):
        return linear_ce(
            x,
            w,
            y,
            bias=jnp.asarray(b),
            implementation=implementation,
            block_sizes=blocks if implementation == "xla" else None,
            weight_layout=layout,
            label_smoothing=0.1,
            z_loss=1e-2,
            temperature=temperature,
            reduction="mean",
            **kwargs,
        )

    def hvp(implementation):
        def directional(x, w):
            dx, dw = jax.grad(loss, argnums=(0, 1))(x, w, implementation)
            return jnp.vdot(dx, u) + jnp.vdot(dw, t)

        return jax.grad(directional, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))

    def batched():
        x2, y2 = jnp.asarray(x).reshape(2, n // 2, D), jnp.asarray(y).reshape(2, n // 2)

        def grad(x, w, t, y):
            return jax.grad(loss, (0, 1, 3))(x, w, "xla", t, y, gradient_filter_eps=1e-30)

        return jax.vmap(grad, in_axes=(0, None, 0, 0))(
            x2, jnp.asarray(w), jnp.asarray([0.8, 1.3]), y2
        )

    ungrouped = batched()
    chosen = mesh_axes(*sizes)
    want = hvp("reference")
    for got, exact in zip(hvp("xla"), want, strict=True):
        np.testing.assert_allclose(got, exact, rtol=1e-8, atol=1e-11)
    for got, exact in zip(batched(), ungrouped, strict=True):
        np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-13)
    assert set(chosen) == {(n, 4), (v, 4), (n // 2, 2)}


@pytest.mark.parametrize("layout", ["dv"])  # "vd": test_grouped_loops_match_numpy
def test_grouped_loops_return_aux(layout, mesh_axes):
    """``return_aux`` with grouped loops (`test_grouped_loops_match_numpy`): the groups' monitors
    fold into the ungrouped loops' values, the argmax the lowest class id also where the max
    ties across groups of classes (classes 3 and 40 of groups 0 and 3 have the same weights),
    and the gradient of the loss plus the entropy is the same."""
    n, v, blocks, sizes, want_groups = GROUPED["ragged"]
    x, w, b, y = _data(seed=34, n=n, v=v)
    w[:, 40], b[40] = w[:, 3], b[3]
    x[:5] = 4.0 * w[:, 3]  # rows whose max is the tie
    w = w if layout == "dv" else w.T

    def value_and_grads():
        def loss(x, w, b):
            losses, aux = linear_ce(
                x,
                w,
                jnp.asarray(y),
                bias=b,
                block_sizes=blocks,
                weight_layout=layout,
                label_smoothing=0.1,
                return_aux=True,
            )
            return jnp.sum(losses) + jnp.sum(aux.entropy), aux

        args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*args)

    want_grads, want = value_and_grads()
    chosen = mesh_axes(*sizes)
    grads, aux = value_and_grads()
    assert set(chosen) == {(n, want_groups[0]), (v, want_groups[1])}
    np.testing.assert_array_equal(aux.argmax[:5], 3)
    np.testing.assert_array_equal(aux.argmax, want.argmax)
    got, exact = (*jax.tree.leaves(aux), *grads), (*jax.tree.leaves(want), *want_grads)
    for g, e in zip(got, exact, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("engine", ["xla", "reference", "pallas:tpu", "pallas:gpu"])
def test_inside_shard_map_data_parallel(engine, mesh):
    """Data parallelism: each shard takes its tokens and the whole, replicated projection. The
    loss is summed across shards with psum; the gradients of the replicated weight and bias come
    back already summed over the shards, as JAX's autodiff gives for replicated operands (the
    "reference" implementation is plain autodiff). The kernels' outputs are typed to vary over
    the mesh axis, which shard_map checks. Pallas' generic interpreter (the GPU schedule off a
    GPU) fails that check by itself (see test_pallas.test_inside_shard_map), and unchecked,
    shard_map does not track which values vary, so that case runs on a GPU host only."""
    P = jax.sharding.PartitionSpec
    implementation, _, schedule = engine.partition(":")
    if schedule == "gpu" and interpret(schedule):
        pytest.skip("the GPU schedule's interpreter fails shard_map's varying-axes check")
    d, kwargs = _pallas_args(schedule) if schedule else (D, {})
    if implementation == "xla":
        kwargs = {"block_sizes": BlockSizes(2, 16)}
    x, w, b, y = _data(seed=26, n=16, d=d)
    expected = numpy_linear_ce(x, w, y, bias=b)
    if schedule:
        x, w, b = (np.asarray(a, np.float32) for a in (x, w, b))

    def per_shard(x, w, b, y):
        def loss(x, w, b):
            return linear_ce(
                x, w, y, bias=b, reduction="sum", implementation=implementation, **kwargs
            )

        value, (dx, dw, db) = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b)
        return jax.lax.psum(value, "d"), dx, dw, db

    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(P("d"), P(), P(), P("d")),
            out_specs=(P(), P("d"), P(), P()),
        )
    )
    sharding = jax.NamedSharding(mesh, P("d"))
    value, dx, dw, db = fn(
        jax.device_put(jnp.asarray(x), sharding),
        jnp.asarray(w),
        jnp.asarray(b),
        jax.device_put(jnp.asarray(y), sharding),
    )
    rtol, atol = (2e-5, 2e-5) if schedule else (1e-9, 1e-12)
    np.testing.assert_allclose(value, expected[0], rtol=max(rtol, 1e-10))
    np.testing.assert_allclose(dx, expected[2], rtol=rtol, atol=atol)
    np.testing.assert_allclose(dw, expected[3], rtol=rtol, atol=atol)
    np.testing.assert_allclose(db, expected[4], rtol=rtol, atol=atol)


def test_pallas_with_explicitly_sharded_inputs(mesh):
    """Rows sharded over an explicit mesh under jit run the fused kernels per shard (the
    8-device checks in tests/_sharded.py cover the vocabulary-sharded projection)."""
    x, w, _, y = _data(n=16)
    explicit = jax.make_mesh(
        mesh.axis_sizes, mesh.axis_names, axis_types=(jax.sharding.AxisType.Explicit,)
    )

    def fn(implementation):
        return jax.jit(
            lambda x: linear_ce(x, jnp.asarray(w), jnp.asarray(y), implementation=implementation)
        )

    with jax.set_mesh(explicit):
        got = fn("pallas")(jax.device_put(jnp.asarray(x), jax.sharding.PartitionSpec("d")))
    np.testing.assert_allclose(got, fn("xla")(jnp.asarray(x)), rtol=1e-5)


def _lower_fused(schedule, lowering_target, *, n, d, v, blocks, vd=False, bias=True, **options):
    """Lowers (without running) ``jit(grad)`` of the fused loss through the ``"pallas"`` kernels
    for ``schedule``'s real backend (Mosaic for TPU, Triton for CUDA), from this host: the
    kernel is chosen when lowering. A CPU-only host names an H100 through an abstract mesh for
    Triton."""
    import warnings

    s = jax.ShapeDtypeStruct
    array_t = options.pop("temperature", 1.0) is None

    def loss(x, w, b, y, t):
        return jnp.sum(
            sce.linear_softmax_cross_entropy(
                x,
                w,
                y,
                bias=b,
                temperature=1.0 if t is None else t,
                weight_layout="vd" if vd else "dv",
                implementation=sce.Pallas(block_sizes=blocks),
                **options,
            )
        )

    args = (
        s((n, d), jnp.bfloat16),
        s((v, d) if vd else (d, v), jnp.bfloat16),
        s((v,), jnp.bfloat16) if bias else None,
        s((n,), jnp.int32),
        s((), jnp.float32) if array_t else None,
    )
    platform = {"tpu": "tpu", "gpu": "cuda"}[schedule]
    with warnings.catch_warnings(), lowering_target(schedule):
        warnings.simplefilter("ignore", DeprecationWarning)  # jax >= 0.11 deprecates Triton
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 4) if array_t else (0, 1)))
        return grad.trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("schedule", ["tpu", "gpu"])
def test_fused_kernels_lower_for_their_backend(schedule, lowering_target):
    """At a realistic tile size and with options on, which checks the kernels against the
    backends' lowering rules (Triton's dot and block shapes, Mosaic's tiling); interpret mode
    does not."""
    lowered = _lower_fused(
        schedule,
        lowering_target,
        n=512,
        d=256,
        v=1000,
        blocks=BlockSizes(128, 256, 128),
        gradient_filter_eps=2.0**-12,
        label_smoothing=0.1,
        z_loss=1e-4,
        logit_softcap=30.0,
        temperature=None,
        ignore_index=-100,
    )
    target = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[schedule]
    assert len(_kernel_calls(lowered, target)) == {"tpu": 3, "gpu": 2}[schedule]


def test_tpu_schedule_rejects_blocks_off_the_mosaic_tiling(lowering_target):
    """Compiled for a TPU, a hidden chunk of 64 (neither a multiple of 128 nor all of D) is
    refused with the reason, before Mosaic sees it."""
    with pytest.raises(NotImplementedError, match=r"block_d multiples of 128.*'D': 256"):
        _lower_fused("tpu", lowering_target, n=512, d=256, v=1000, blocks=BlockSizes(128, 256, 64))


@pytest.mark.parametrize("schedule", ["tpu", "gpu"])
def test_path_to_the_kernel_body_is_at_most_seven_frames(schedule, kernel_paths):
    """From the public loss to the body of each fused kernel, forward and backward, at most
    seven frames of this package's code are on the stack while the kernel is traced."""
    d, pallas = _pallas_args(schedule, d=D + 1)  # a shape of its own
    x, w, b, y = _data(d=d)
    _value_and_grads("pallas", *(jnp.asarray(a, jnp.float32) for a in (x, w, b)), y, **pallas)
    forward, backward = kernel_paths["_forward_kernel"], kernel_paths["_backward_kernel"]
    assert forward[0] == "linear_softmax_cross_entropy", forward
    assert len(forward) <= 7 and len(backward) <= 7, (forward, backward)


def _kernel_calls(lowered, target: str) -> list:
    """The attributes of every ``target`` custom call (one per kernel) of a lowered computation."""
    from jax._src.lib.mlir import ir

    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    attrs = child.operation.attributes
                    if child.operation.name == "stablehlo.custom_call" and (
                        ir.StringAttr(attrs["call_target_name"]).value == target
                    ):
                        calls.append(attrs)
                    walk(child.operation)

    walk(lowered.compiler_ir().operation)
    return calls


def _triton_tensor_shapes(lowered) -> list[tuple[int, ...]]:
    """The shape of every tensor in the Triton kernels of a lowered computation (each kernel is
    a Triton module serialised into its custom call's backend config)."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    kernels = [
        ir.StringAttr(attrs["mhlo.backend_config"]["ir"])
        for attrs in _kernel_calls(lowered, "__gpu$xla.gpu.triton")
    ]
    shapes = []
    with triton_lowering._new_ir_context():
        for kernel in kernels:
            text = str(ir.Module.parse(kernel.value_bytes))
            for dims in re.findall(r"tensor<((?:\d+x)+)", text):
                shapes.append(tuple(int(x) for x in dims.rstrip("x").split("x")))
    assert len(kernels) == 3, "the forward kernel and the backward's two passes"
    return shapes


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_gpu_kernels_hold_only_tiles_at_llm_shapes(layout, lowering_target):
    """At N=16384, D=4096, V=128256 (bf16) the GPU kernels must hold no block spanning D or V:
    Triton keeps a kernel's tensors in registers and shared memory, and refuses any over 2**20
    elements. Every tensor of the lowered Triton modules stays within one logits tile."""
    blocks = BlockSizes.get_default(
        "gpu", num_rows=16384, num_classes=128256, dtype=jnp.bfloat16, hidden=1
    )
    lowered = _lower_fused(
        "gpu", lowering_target, n=16384, d=4096, v=128256, blocks=blocks, vd=layout == "vd"
    )
    largest = max(int(np.prod(shape)) for shape in _triton_tensor_shapes(lowered))
    assert largest == blocks.block_n * blocks.block_v


def _mosaic_kernels(lowered) -> list[tuple[str, dict]]:
    """``(signature, config)`` of every Mosaic kernel of a lowered computation: the text of the
    kernel function's signature, deserialised from its custom call's backend config, and that
    config (which holds the kernel's VMEM limit when it sets one)."""
    import base64
    import json

    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jax._src.lib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    kernels = []
    for attrs in _kernel_calls(lowered, "tpu_custom_call"):
        config = json.loads(ir.StringAttr(attrs["backend_config"]).value_bytes)
        context = mlir.make_ir_context()
        tpu.register_dialect(context)
        with context, ir.Location.unknown():
            context.allow_unregistered_dialects = True  # the serialised ``stable_mosaic`` ops
            module = ir.Module.parse(base64.b64decode(config["custom_call_config"]["body"]))
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
            text = str(module)
        kernels.append((re.search(r"func\.func @linear_ce\w*\(.*", text).group(0), config))
    return kernels


def _padded_vmem_bytes(dims: str, dtype: str) -> int:
    """Bytes of a VMEM memref ``dims`` (``"256x512x"``, ``"1x6x256x"``) of ``dtype``
    (``"bf16"``), its last two axes padded to Mosaic's tiling: 8 sublanes of 32-bit words by
    128 lanes."""
    itemsize = {"i8": 1, "bf16": 2, "f16": 2, "i32": 4, "f32": 4}[dtype]
    *outer, rows, cols = (int(x) for x in dims.rstrip("x").split("x"))
    sublanes = 8 * (4 // itemsize)
    return math.prod(outer) * -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


@pytest.mark.parametrize(("d", "layout"), [(4096, "dv"), (4096, "vd"), (8192, "dv")])
def test_tpu_kernels_fit_vmem_at_llm_shapes(d, layout, lowering_target):
    """At N=16384, V=128256 and D=4096 or 8192 (bf16) the TPU kernels lower, no pipelined block
    spans D or V, and each kernel's VMEM (two buffers per pipelined block, plus its scratch)
    fits the limit it declares, or the 16 MiB default when it declares none (at D=8192 the
    ``d_weight`` accumulator alone takes 16 MiB); no limit exceeds 64 MiB, the VMEM of a v5p or
    v7x core."""
    n, v = 16384, 128256
    blocks = BlockSizes.get_default("tpu", num_rows=n, num_classes=v, dtype=None, hidden=d)
    lowered = _lower_fused("tpu", lowering_target, n=n, d=d, v=v, blocks=blocks, vd=layout == "vd")
    kernels = _mosaic_kernels(lowered)
    assert len(kernels) == 3, "the forward kernel and the two gradient kernels"
    largest_block = max(blocks.block_n, blocks.block_v, blocks.block_d)
    for signature, config in kernels:
        buffers = re.findall(r"memref<((?:\d+x)+)(\w+), #tpu.memory_space<vmem>>", signature)
        scratch = int(re.search(r"scratch_operands = (\d+)", signature).group(1))
        windows, scratch = buffers[: len(buffers) - scratch], buffers[len(buffers) - scratch :]
        for dims, _ in windows:
            assert max(int(x) for x in dims.rstrip("x").split("x")) <= largest_block, dims
        need = 2 * sum(_padded_vmem_bytes(*b) for b in windows)
        need += sum(_padded_vmem_bytes(*b) for b in scratch)
        limits = [c["size"] for c in config.get("scoped_memory_configs", [])]
        limit = limits[0] if limits else 16 * 2**20
        assert need <= limit <= 64 * 2**20, (signature[:60], need, limit)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "32MiB"])
def test_accumulator_bytes_must_be_a_positive_int(value):
    with pytest.raises(
        ValueError, match=f"accumulator_bytes must be None or a positive int, got {value!r}"
    ):
        sce.Pallas(accumulator_bytes=value)
