"""implementation="pallas": both kernel schedules, in interpret mode on CPU.

Every test runs once per schedule ("tpu": Mosaic grid reduction, "gpu": Triton in-kernel loop),
named by `jax_softmax_ce.Pallas(schedule=...)`. On CPU both run in Pallas' interpreters; on an
accelerator the native schedule runs compiled and the other one interpreted. Shapes are tiny and
ragged: N = 19 rows (not a multiple of any row block) and V prime, below one vocabulary block (37)
or spanning several (131). Values and gradients (logits, probability labels, array temperature)
are compared with the float64 NumPy reference (`numpy_reference`) and with implementation="xla".
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from jax_softmax_ce.kernels import _blocks
from platforms import interpret

import jax_softmax_ce as sce
from jax_softmax_ce import _options

N = 19
SMALL_V, LARGE_V = 37, 131
SCHEDULES = ("tpu", "gpu")


def blocks_for(schedule: str, *dtypes) -> sce.BlockSizes:
    """Small blocks that keep every test ragged: several row blocks, V below or above one."""
    if schedule == "tpu":
        return sce.BlockSizes(max(_blocks.sublanes(d) for d in dtypes), 128)
    return sce.BlockSizes(8, 64)


def pallas(schedule: str, *dtypes) -> sce.Pallas:
    """The ``implementation`` that runs ``schedule`` with `blocks_for` blocks: compiled where
    the test machine runs it natively, interpreted elsewhere."""
    return sce.Pallas(
        block_sizes=blocks_for(schedule, *dtypes), schedule=schedule, interpret=interpret(schedule)
    )


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    return request.param


def reference(logits, labels, *, integer, **options):
    """``(loss [N], dlogits, dlabels, dtemperature)`` of ``sum_i loss_i`` in float64."""
    result = numpy_reference.cross_entropy(logits, labels, integer=integer, **options)
    return result.loss, result.dlogits, result.dlabels, result.dtemperature


# ---------------------------------------------------------------------------------------------
# Running an implementation: per-example losses and the gradients of their sum, in one jit.


def run(implementation, logits, labels, *, integer, where=None, array_temperature=None, **options):
    """``(losses, d_logits, d_labels, d_temperature)``; None for what is not differentiable."""
    fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy

    def losses(logits, labels, temperature):
        kwargs = dict(options) if temperature is None else dict(options, temperature=temperature)
        return fn(logits, labels, where=where, implementation=implementation, **kwargs)

    diff = (True, not integer, array_temperature is not None)
    primals = (logits, labels, array_temperature)

    @jax.jit
    def go(*chosen):
        def partial_fn(*args):
            it = iter(args)
            return losses(*(next(it) if d else x for x, d in zip(primals, diff, strict=True)))

        out, vjp = jax.vjp(partial_fn, *chosen)
        return out, vjp(jnp.ones_like(out))

    out, grads = go(*(x for x, d in zip(primals, diff, strict=True) if d))
    grads = iter(grads)
    return (out, *(next(grads) if d else None for d in diff))


def make_case(v, dtype, *, integer, seed=0, scale=3.0):
    logits, labels = numpy_reference.random_case(N, v, integer=integer, seed=seed, scale=scale)
    return jnp.asarray(logits, dtype), jnp.asarray(labels, jnp.int32 if integer else jnp.float32)


def tolerances(dtype):
    """``(loss rtol/atol, gradient atol)`` against the float64 reference."""
    if dtype == jnp.bfloat16:
        return 2e-5, 2e-2
    return 2e-5, 2e-5


def check_against_reference(schedule, logits, labels, *, integer, where=None, cw=None, **opts):
    temperature = opts.pop("temperature", None)
    array_temperature = temperature is not None and not isinstance(temperature, float)
    kwargs = dict(opts, class_weights=cw)
    if temperature is not None and not array_temperature:
        kwargs["temperature"] = temperature
    dtypes = [logits.dtype] + ([] if integer else [labels.dtype])
    if where is not None and np.ndim(where) == 2 and min(np.shape(where)) > 1:
        dtypes.append(np.int8)
    t_arg = temperature if array_temperature else None
    impl = pallas(schedule, *dtypes)
    got = run(
        impl,
        logits,
        labels,
        integer=integer,
        where=where,
        array_temperature=t_arg,
        **kwargs,
    )
    want_xla = run(
        "xla", logits, labels, integer=integer, where=where, array_temperature=t_arg, **kwargs
    )

    ref_t = 1.0 if temperature is None else float(temperature)
    ref_opts = {k: val for k, val in opts.items() if k != "ignore_index"}
    loss, dlogits, dlabels, dtemperature = reference(
        np.asarray(logits.astype(jnp.float64)),
        np.asarray(labels),
        integer=integer,
        where=None
        if where is None
        else np.asarray(where).reshape(-1, np.shape(where)[-1] if np.ndim(where) == 2 else 1),
        class_weights=None if cw is None else np.asarray(cw),
        temperature=ref_t,
        ignore_index=opts.get("ignore_index"),
        **ref_opts,
    )
    out_dtype = jnp.float64 if logits.dtype == jnp.float64 else jnp.float32
    loss_tol, grad_tol = tolerances(logits.dtype)
    assert got[0].dtype == out_dtype and got[0].shape == (N,)
    assert got[1].dtype == logits.dtype and got[1].shape == logits.shape
    np.testing.assert_allclose(got[0], loss, rtol=loss_tol, atol=loss_tol)
    np.testing.assert_allclose(got[1].astype(np.float64), dlogits, rtol=grad_tol, atol=grad_tol)
    np.testing.assert_allclose(got[0], want_xla[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        got[1].astype(np.float64), want_xla[1].astype(np.float64), rtol=grad_tol, atol=grad_tol
    )
    if not integer:
        assert got[2].dtype == labels.dtype and got[2].shape == labels.shape
        np.testing.assert_allclose(got[2], dlabels, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[2], want_xla[2], rtol=1e-5, atol=1e-5)
    if array_temperature:
        assert got[3].dtype == temperature.dtype and got[3].shape == ()
        np.testing.assert_allclose(got[3], dtemperature, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[3], want_xla[3], rtol=1e-5, atol=1e-5)


def class_weights(v, seed=1):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.2, 2.0, v), jnp.float32)


def vocab_mask(v, seed=2):
    return np.random.default_rng(seed).random(v) < 0.7


# ---------------------------------------------------------------------------------------------
# Options and their combinations.

INTEGER_CASES = {
    "plain": (SMALL_V, {}),
    "smoothing_weights": (LARGE_V, {"label_smoothing": 0.1, "cw": True}),
    "zloss_softcap_temperature": (
        LARGE_V,
        {"z_loss": 1e-2, "logit_softcap": 4.0, "temperature": 1.7},
    ),
    "array_temperature_smoothing_zloss": (
        SMALL_V,
        {"temperature": "array", "label_smoothing": 0.2, "z_loss": 1e-3},
    ),
    "ignore_weights_row_mask": (LARGE_V, {"ignore_index": -100, "cw": True, "where": "row"}),
    "vocab_mask_smoothing": (LARGE_V, {"where": "col", "label_smoothing": 0.1, "cw": True}),
    "full_mask_everything": (
        LARGE_V,
        {
            "where": "full",
            "logit_softcap": 5.0,
            "temperature": "array",
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "cw": True,
        },
    ),
}

PROBABILITY_CASES = {
    "plain": (LARGE_V, {}),
    "smoothing_weights_zloss": (SMALL_V, {"label_smoothing": 0.1, "cw": True, "z_loss": 1e-3}),
    "full_mask_temperature_softcap": (
        LARGE_V,
        {"where": "full", "temperature": "array", "logit_softcap": 6.0},
    ),
}


def build(v, spec, labels, seed=3):
    spec = dict(spec)
    opts = {}
    cw = class_weights(v) if spec.pop("cw", False) else None
    where = None
    kind = spec.pop("where", None)
    rng = np.random.default_rng(seed)
    if kind == "row":
        where = rng.random(N) < 0.8
    elif kind == "col":
        where = vocab_mask(v)[None, :]
    elif kind == "full":
        where = rng.random((N, v)) < 0.7
        where[3] = False  # one fully masked example
    if spec.get("temperature") == "array":
        spec["temperature"] = jnp.asarray(1.3, jnp.float32)
    if "ignore_index" in spec:
        labels = labels.at[2].set(spec["ignore_index"])
    opts.update(spec)
    return labels, where, cw, opts


# The README's test command runs the cases that combine options, and those with ignore_index;
# the ones that repeat options of those run in the slow set (CI).
INTEGER_SLOW = {
    "smoothing_weights",
    "zloss_softcap_temperature",
    "array_temperature_smoothing_zloss",
    "vocab_mask_smoothing",
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[pytest.mark.slow] if n in INTEGER_SLOW else [])
        for n in sorted(INTEGER_CASES)
    ],
)
def test_integer_labels_f32(schedule, name):
    v, spec = INTEGER_CASES[name]
    logits, labels = make_case(v, jnp.float32, integer=True)
    labels, where, cw, opts = build(v, spec, labels)
    check_against_reference(schedule, logits, labels, integer=True, where=where, cw=cw, **opts)


@pytest.mark.parametrize("name", sorted(PROBABILITY_CASES))
def test_probability_labels_f32(schedule, name):
    v, spec = PROBABILITY_CASES[name]
    logits, labels = make_case(v, jnp.float32, integer=False)
    labels, where, cw, opts = build(v, spec, labels)
    check_against_reference(schedule, logits, labels, integer=False, where=where, cw=cw, **opts)


@pytest.mark.parametrize(
    ("integer", "name"),
    [(True, "plain"), (True, "full_mask_everything"), (False, "smoothing_weights_zloss")],
)
def test_bfloat16(schedule, integer, name):
    v, spec = (INTEGER_CASES if integer else PROBABILITY_CASES)[name]
    logits, labels = make_case(v, jnp.bfloat16, integer=integer)
    labels, where, cw, opts = build(v, spec, labels)
    check_against_reference(schedule, logits, labels, integer=integer, where=where, cw=cw, **opts)


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="the TPU has no float64")
def test_float64(schedule):
    v, spec = INTEGER_CASES["full_mask_everything"]
    logits, labels = make_case(v, jnp.float64, integer=True)
    labels, where, cw, opts = build(v, spec, labels)
    check_against_reference(schedule, logits, labels, integer=True, where=where, cw=cw, **opts)


# ---------------------------------------------------------------------------------------------
# Examples that do not count, bad labels, infinite logits.


@pytest.mark.parametrize("weighted", [False, True])
def test_out_of_range_label_is_nan_and_ignored_is_zero(schedule, weighted):
    """With class weights too: a negative label must not wrap around to another class's weight."""
    logits, labels = make_case(LARGE_V, jnp.float32, integer=True)
    labels = labels.at[1].set(LARGE_V).at[4].set(-3).at[6].set(-100)
    cw = jnp.ones((LARGE_V,), jnp.float32) if weighted else None
    impl = pallas(schedule, jnp.float32)
    loss, d_logits, _, _ = run(
        impl, logits, labels, integer=True, ignore_index=-100, class_weights=cw
    )
    bad = np.zeros(N, bool)
    bad[[1, 4]] = True
    assert np.isnan(loss[bad]).all() and np.isnan(d_logits[bad]).all()
    assert np.isfinite(loss[~bad]).all() and np.isfinite(d_logits[~bad]).all()
    assert loss[6] == 0 and not np.any(d_logits[6])
    want, dwant, _, _ = reference(
        np.asarray(logits), np.asarray(labels), integer=True, ignore_index=-100
    )
    np.testing.assert_allclose(loss[~bad], want[~bad], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(d_logits[~bad], dwant[~bad], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("integer", [True, False])
def test_fully_masked_rows_are_zero(schedule, integer):
    logits, labels = make_case(SMALL_V, jnp.float32, integer=integer)
    where = np.ones((N, SMALL_V), bool)
    where[[0, 7, 18]] = False
    impl = pallas(schedule, jnp.float32, *(() if integer else (jnp.float32,)), np.int8)
    loss, d_logits, d_labels, d_t = run(
        impl,
        logits,
        labels,
        integer=integer,
        where=where,
        label_smoothing=0.1,
        z_loss=1e-3,
        array_temperature=jnp.asarray(0.9, jnp.float32),
    )
    for row in (0, 7, 18):
        assert loss[row] == 0 and not np.any(d_logits[row])
        assert d_labels is None or not np.any(d_labels[row])
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(d_logits)) and np.isfinite(d_t)
    mean = functools.partial(
        sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy,
        where=where,
        reduction="mean",
    )
    impl = pallas(schedule, jnp.float32, *(() if integer else (jnp.float32,)), np.int8)
    got = mean(logits, labels, implementation=impl)
    np.testing.assert_allclose(got, mean(logits, labels, implementation="xla"), rtol=1e-6)


def test_negative_infinite_logits(schedule):
    logits, labels = make_case(LARGE_V, jnp.float32, integer=True)
    logits = logits.at[:, 5].set(-jnp.inf).at[2, :].set(-jnp.inf).at[2, 9].set(1.0)
    labels = jnp.where(labels == 5, 6, labels).at[8].set(5).at[2].set(9)
    impl = pallas(schedule, jnp.float32)
    loss, d_logits, _, _ = run(impl, logits, labels, integer=True, z_loss=1e-3)
    finite = np.arange(N) != 8
    assert np.isposinf(loss[8])
    assert np.all(np.isfinite(loss[finite])) and np.all(np.isfinite(d_logits))
    want, dwant, _, _ = reference(np.asarray(logits), np.asarray(labels), integer=True, z_loss=1e-3)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(d_logits, dwant, rtol=2e-5, atol=2e-5)


def test_non_finite_logits_are_never_hidden(schedule):
    """A NaN or +inf logit in a block gives a non-finite loss, even when its row puts no weight
    on it (a zero class weight on the label, all-zero probability labels), also a row of NaNs
    alone (whose max Triton's NaN-dropping max sees as -inf, on a GPU), and the other rows
    match the float64 reference; a -inf logit with a zero class weight gives a zero label
    gradient, not NaN."""
    logits, labels = make_case(LARGE_V, jnp.float32, integer=True)
    logits = logits.at[0, 3].set(jnp.nan).at[1, 100].set(jnp.inf).at[2, 64].set(jnp.nan)
    logits = logits.at[3].set(jnp.nan)
    labels = labels.at[2:4].set(7)
    cw = jnp.ones((LARGE_V,), jnp.float32).at[7].set(0.0)
    probs = jax.nn.one_hot(labels, LARGE_V).at[2:4].set(0.0)
    impl = pallas(schedule, jnp.float32)
    integer = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, class_weights=cw, implementation=impl
    )
    soft = sce.softmax_cross_entropy(logits, probs, implementation=impl)
    for loss in (integer, soft):
        assert not np.any(np.isfinite(loss[:4]))
    clean = np.arange(4, N)
    want = reference(np.asarray(logits)[clean], np.asarray(labels)[clean], integer=True)[0]
    np.testing.assert_allclose(soft[clean], want, rtol=2e-5)
    np.testing.assert_allclose(integer[clean], np.asarray(cw)[labels[clean]] * want, rtol=2e-5)

    neg = logits.at[:, 5].set(-jnp.inf)
    cw = cw.at[5].set(0.0)
    soft_labels = make_case(LARGE_V, jnp.float32, integer=False)[1]
    impl = pallas(schedule, jnp.float32, jnp.float32)
    _, _, d_labels, _ = run(impl, neg[4:], soft_labels[4:], integer=False, class_weights=cw)
    want = reference(
        np.asarray(neg[4:]), np.asarray(soft_labels[4:]), integer=False, class_weights=cw
    )[2]
    want[:, 5] = 0.0  # the float64 formula's 0 * inf at the zero-weight -inf class
    assert not np.any(np.isnan(d_labels))
    np.testing.assert_array_equal(d_labels[:, 5], 0.0)
    np.testing.assert_allclose(d_labels, want, rtol=2e-5, atol=2e-5)


def test_a_nan_that_the_row_max_skips_still_reaches_the_loss():
    """Triton's maximum drops NaNs, so on a GPU a block of NaN logits alone has the max -inf.
    Given that max, the running log-sum-exp (`_tile.lse_merge`, `lse_besides_label`, and
    `lse_combine` across shards) keeps the NaN, and the row's loss is NaN with a zero weight on
    its label; a row of -inf logits has no mass and a zero loss."""
    from jax_softmax_ce.kernels import _tile

    z = jnp.array([[jnp.nan] * 4, [-jnp.inf] * 4], jnp.float32)
    skipped = jnp.full((2, 1), -jnp.inf, jnp.float32)  # the max that dropped the NaNs
    empty = _tile.lse_init(2, jnp.float32)
    merged = _tile.lse_merge(empty, z, skipped)[0]
    whole = _tile.lse_besides_label(z, skipped, jnp.array([[1], [1]], jnp.int32))[0]
    for lse in (
        merged,
        whole,
        _tile.lse_combine(empty, merged)[0],
        _tile.lse_combine(whole, empty)[0],
    ):
        zero = jnp.zeros((2, 1), jnp.float32)
        loss, _ = _tile.row_loss(
            lse, _tile.Term(zero, zero), None, zero + 4, label_smoothing=0.0, z_loss=0.0
        )
        assert np.isnan(loss[0, 0]) and loss[1, 0] == 0.0


@pytest.mark.parametrize("magnitude", [1e4, 1e6])
def test_large_logits_keep_float32_relative_accuracy(schedule, magnitude):
    """Logits around 1e4 or 1e6, several vocabulary blocks: the loss, formed as
    ``log(sum exp(z' - m)) - (z'_t - m)``, keeps float32 relative accuracy."""
    rng = np.random.default_rng(11)
    logits = jnp.asarray(magnitude + rng.normal(size=(N, LARGE_V)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, LARGE_V, N), jnp.int32)
    impl = pallas(schedule, jnp.float32)
    loss = sce.softmax_cross_entropy_with_integer_labels(logits, labels, implementation=impl)
    want = reference(np.asarray(logits), np.asarray(labels), integer=True)[0]
    np.testing.assert_allclose(loss, want, rtol=3e-6)


@pytest.mark.parametrize("integer", [True, False])
def test_mean_with_nothing_counted_is_zero(schedule, integer):
    logits, labels = make_case(SMALL_V, jnp.float32, integer=integer)
    where = np.zeros((N, 1), bool)
    options = {"ignore_index": int(labels[0])} if integer else {}
    if integer:
        labels = jnp.full_like(labels, labels[0])  # every example ignored
        where = None
    fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
    impl = pallas(schedule, jnp.float32, *(() if integer else (jnp.float32,)), np.int8)
    value, grad = jax.value_and_grad(
        lambda x: fn(x, labels, where=where, reduction="mean", implementation=impl, **options)
    )(logits)
    assert value == 0.0 and value.dtype == jnp.float32
    np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------------------------------------
# Transformations.


def test_vmap_folds_batch_axes(schedule):
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7, SMALL_V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, SMALL_V, (2, 3, 7)), jnp.int32)
    weights = class_weights(SMALL_V)

    def loss(impl, x, y):
        return sce.softmax_cross_entropy_with_integer_labels(
            x, y, class_weights=weights, label_smoothing=0.1, implementation=impl
        ).sum()

    def batched(impl):
        f = jax.vmap(jax.vmap(jax.value_and_grad(functools.partial(loss, impl)), (0, 0)), (1, 1))
        return jax.jit(f)(logits, labels)

    impl = pallas(schedule, jnp.float32)
    got = batched(impl)
    want = batched("xla")
    assert got[0].shape == (3, 2) and got[1].shape == (3, 2, 7, SMALL_V)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_vmap_over_class_weights_and_temperature(schedule):
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(N, SMALL_V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, SMALL_V, N), jnp.int32)
    weights = jnp.stack([class_weights(SMALL_V, seed=s) for s in range(3)])
    temperatures = jnp.asarray([0.7, 1.0, 2.5], jnp.float32)

    def loss(impl, w, t):
        return sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, class_weights=w, temperature=t, implementation=impl, reduction="mean"
        )

    def batched(impl):
        return jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, impl), 1)))(
            weights, temperatures
        )

    impl = pallas(schedule, jnp.float32)
    got = batched(impl)
    want = batched("xla")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4)


@pytest.mark.parametrize(
    ("schedule", "integer"),
    # Each schedule and each label kind once outside the slow set.
    [
        ("tpu", True),
        pytest.param("tpu", False, marks=pytest.mark.slow),
        pytest.param("gpu", True, marks=pytest.mark.slow),
        ("gpu", False),
    ],
)
def test_grad_of_grad(schedule, integer):
    logits, labels = make_case(SMALL_V, jnp.float32, integer=integer, scale=1.0)
    direction = jnp.asarray(np.random.default_rng(7).normal(size=logits.shape), jnp.float32)
    fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy

    def hvp(impl, x, t):
        def total(x, t):
            return fn(
                x,
                labels,
                temperature=t,
                z_loss=1e-2,
                label_smoothing=0.1,
                implementation=impl,
                reduction="sum",
            )

        return jax.grad(lambda x, t: jnp.vdot(jax.grad(total)(x, t), direction), (0, 1))(x, t)

    t = jnp.asarray(1.2, jnp.float32)
    impl = pallas(schedule, jnp.float32, jnp.float32)
    got = jax.jit(functools.partial(hvp, impl))(logits, t)
    want = jax.jit(functools.partial(hvp, "reference"))(logits, t)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# What the implementation refuses, block sizes, and lowering for the real backends.


PLATFORM = {"tpu": "tpu", "gpu": "cuda"}


def lower(fn, args, platform: str, lowering_target):
    """``fn`` jitted and lowered (not run) for ``platform`` from this host."""
    schedule = {"tpu": "tpu", "cuda": "gpu", "cpu": None}[platform]
    with warnings.catch_warnings(), lowering_target(schedule):
        # jax >= 0.11 deprecates the Triton backend with a DeprecationWarning at lowering.
        warnings.simplefilter("ignore", DeprecationWarning)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def kernel_calls(lowered) -> dict[str, int]:
    """How many compiled-kernel custom calls of each backend a lowered computation holds."""
    text = lowered.as_text()
    return {"tpu": text.count("tpu_custom_call"), "gpu": text.count("__gpu$xla.gpu.triton")}


def loss_and_grads(implementation, **options):
    """``value_and_grad`` of the mean integer-label loss, with respect to the logits."""

    def fn(logits, labels):
        return sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, reduction="mean", implementation=implementation, **options
        )

    return jax.value_and_grad(fn)


def test_the_kernel_is_chosen_when_lowering(lowering_target):
    """implementation="pallas" lowered from this CPU host for a TPU gets the Mosaic kernels, for
    a CUDA GPU the Triton kernels, and for the CPU the interpreter (no kernel): the choice
    follows the platform lowered for, not the default backend, so ahead-of-time compilation
    for an accelerator this host lacks gets the real kernels."""
    s = jax.ShapeDtypeStruct
    args = (s((64, 1000), jnp.bfloat16), s((64,), jnp.int32))
    fn = loss_and_grads("pallas", label_smoothing=0.1)
    assert kernel_calls(lower(fn, args, "tpu", lowering_target)) == {"tpu": 2, "gpu": 0}
    assert kernel_calls(lower(fn, args, "cuda", lowering_target)) == {"tpu": 0, "gpu": 2}
    assert kernel_calls(lower(fn, args, "cpu", lowering_target)) == {"tpu": 0, "gpu": 0}


def test_export_for_several_platforms(lowering_target):
    """jax.export for CPU, TPU and CUDA at once holds each platform's kernel (each lowered only
    for its own platform), and the exported function runs here, on the CPU's interpreter.
    Pallas kernels' custom calls carry no compatibility guarantee, so export needs them
    allowed explicitly."""
    logits, labels = make_case(SMALL_V, jnp.float32, integer=True)
    checks = [
        jax.export.DisabledSafetyCheck.custom_call(name)
        for name in ("tpu_custom_call", "__gpu$xla.gpu.triton")
    ]
    fn = jax.jit(loss_and_grads("pallas", label_smoothing=0.1))
    with warnings.catch_warnings(), lowering_target("gpu"):
        warnings.simplefilter("ignore", DeprecationWarning)  # jax >= 0.11 deprecates Triton
        exported = jax.export.export(fn, platforms=("cpu", "tpu", "cuda"), disabled_checks=checks)(
            logits, labels
        )
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") == 2 and text.count("__gpu$xla.gpu.triton") == 2
    value, grad = exported.call(logits, labels)
    want = reference(np.asarray(logits), np.asarray(labels), integer=True, label_smoothing=0.1)
    np.testing.assert_allclose(value, np.mean(want[0]), rtol=1e-6)
    np.testing.assert_allclose(grad, want[1] / N, rtol=1e-5, atol=1e-7)


def test_unsupported_blocks_raise_when_lowered_for_their_platform(schedule, lowering_target):
    """Blocks that a schedule cannot compile raise NotImplementedError naming them when (and
    only when) the computation is lowered for that schedule's platform; the interpreter takes
    them."""
    logits, labels = make_case(SMALL_V, jnp.float32, integer=True)
    bad = sce.BlockSizes(12, 100)  # fits neither schedule's tiling
    fn = loss_and_grads(sce.Pallas(block_sizes=bad))
    with pytest.raises(NotImplementedError, match=r"block.*BlockSizes\(block_n=12, block_v=100"):
        lower(fn, (logits, labels), PLATFORM[schedule], lowering_target)
    lower(fn, (logits, labels), "cpu", lowering_target)
    interpreted = sce.Pallas(block_sizes=bad, schedule=schedule, interpret=True)
    loss = sce.softmax_cross_entropy_with_integer_labels(logits, labels, implementation=interpreted)
    want = reference(np.asarray(logits), np.asarray(labels), integer=True)[0]
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-6)


def test_a_schedule_named_for_another_platform_raises_unless_interpreted(lowering_target):
    """Pallas(schedule="gpu") lowered for a TPU (and "tpu" for a GPU) is never run in the
    interpreter behind the caller's back: it raises, and names interpret=True."""
    s = jax.ShapeDtypeStruct
    args = (s((16, 256), jnp.float32), s((16,), jnp.int32))
    for schedule, platform in (("gpu", "tpu"), ("tpu", "cuda")):
        fn = loss_and_grads(sce.Pallas(schedule=schedule))
        with pytest.raises(NotImplementedError, match="interpret=True"):
            lower(fn, args, platform, lowering_target)
        calls = kernel_calls(lower(fn, args, PLATFORM[schedule], lowering_target))
        assert calls[schedule] == 2


def test_float64_is_refused_on_tpu_only(lowering_target):
    s = jax.ShapeDtypeStruct
    args = (s((16, 256), jnp.float64), s((16,), jnp.int32))
    fn = loss_and_grads("pallas")
    with pytest.raises(NotImplementedError, match="not float64"):
        lower(fn, args, "tpu", lowering_target)
    assert kernel_calls(lower(fn, args, "cuda", lowering_target))["gpu"] == 2


def test_path_to_the_kernel_body_is_at_most_seven_frames(schedule, kernel_paths):
    """From the public loss to the body of each kernel, forward and backward, at most seven
    frames of this package's code are on the stack while the kernel is traced."""
    logits, labels = make_case(SMALL_V + 2, jnp.float32, integer=True)  # a shape of its own
    loss_and_grads(pallas(schedule, jnp.float32))(logits, labels)
    forward, backward = kernel_paths["_forward_kernel"], kernel_paths["_backward_kernel"]
    assert forward[0] == "softmax_cross_entropy_with_integer_labels", forward
    assert len(forward) <= 7 and len(backward) <= 7, (forward, backward)


def test_eager_calls_compile_once(schedule, compilations):
    """A second eager call with the same shapes and options reuses the compiled kernels (it used
    to trace and compile them again); a changed configuration is traced anew, not served
    stale."""
    rng = np.random.default_rng(9)
    logits = [jnp.asarray(rng.normal(size=(N, SMALL_V)), jnp.float32) for _ in range(2)]
    labels = jnp.asarray(rng.integers(0, SMALL_V, N), jnp.int32)
    impl = pallas(schedule, jnp.float32)
    first = sce.softmax_cross_entropy_with_integer_labels(logits[0], labels, implementation=impl)
    before = compilations()
    second = sce.softmax_cross_entropy_with_integer_labels(logits[1], labels, implementation=impl)
    assert compilations() == before, compilations.names(before)
    other = sce.Pallas(
        block_sizes=sce.BlockSizes(16, 256), schedule=schedule, interpret=interpret(schedule)
    )
    third = sce.softmax_cross_entropy_with_integer_labels(logits[1], labels, implementation=other)
    assert compilations() > before
    for x, loss in zip(logits + logits[1:], (first, second, third), strict=True):
        want = reference(x, labels, integer=True)[0]
        np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "v"), [(0, 5), (1, 1), (19, 37), (8192, 128256), (5, 256000)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_block_sizes_fit(schedule, n, v, dtype):
    blocks = sce.BlockSizes.get_default(schedule, num_rows=n, num_classes=v, dtype=dtype)
    s = jax.ShapeDtypeStruct
    ops = _blocks.Operands(logits=s((n, v), dtype), labels=s((n, 1), jnp.int32))
    assert _blocks.compile_error(schedule, blocks, ops, _options.Options()) is None
    assert blocks.block_v <= max(128, _options.pow2_ceil(v))


def test_empty_batch(schedule):
    """Zero examples give an empty result, without a kernel, on both schedules."""
    logits = jnp.zeros((0, SMALL_V), jnp.float32)
    labels = jnp.zeros((0,), jnp.int32)
    for impl in (pallas(schedule, jnp.float32), sce.Pallas(schedule=schedule, interpret=True)):
        loss = sce.softmax_cross_entropy_with_integer_labels(logits, labels, implementation=impl)
        assert loss.shape == (0,) and loss.dtype == jnp.float32


@pytest.mark.parametrize(("integer", "where"), [(True, "full"), (False, "col")])
def test_kernels_lower_for_their_backend(schedule, lowering_target, integer, where):
    """Lowers (without running) the forward and backward kernels through the public loss for
    the real backend, every option on: Mosaic for TPU, Triton for CUDA. This checks the kernels
    against the backends' lowering rules (Triton: power-of-two shapes and supported primitives),
    which the interpreters do not."""
    n, v = 64, 1000
    blocks = sce.BlockSizes(32, 256) if schedule == "tpu" else sce.BlockSizes(4, 256)
    s = jax.ShapeDtypeStruct
    where = s((n, v), jnp.bool_) if where == "full" else s((1, v), jnp.bool_)

    def loss(logits, labels, where, class_weights, temperature):
        fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
        return fn(
            logits,
            labels,
            where=where,
            class_weights=class_weights,
            temperature=temperature,
            label_smoothing=0.1,
            z_loss=1e-4,
            logit_softcap=30.0,
            reduction="sum",
            implementation=sce.Pallas(block_sizes=blocks),
        )

    labels = s((n,), jnp.int32) if integer else s((n, v), jnp.bfloat16)
    args = (s((n, v), jnp.bfloat16), labels, where, s((v,), jnp.float32), s((), jnp.float32))
    argnums = (0, 4) if integer else (0, 1, 4)
    lowered = lower(jax.grad(loss, argnums), args, PLATFORM[schedule], lowering_target)
    assert kernel_calls(lowered)[schedule] == 2


def test_inside_shard_map(schedule, mesh):
    # Pallas' generic interpreter (the GPU schedule off a GPU) pads refs with an unvarying
    # value, which shard_map's varying-axes check rejects (jax 0.10.2 and 0.11.2); jax's own
    # error message names check_vma=False as the workaround. The compiled kernels keep the check.
    check_vma = not (schedule == "gpu" and interpret(schedule))
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(16, SMALL_V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, SMALL_V, 16), jnp.int32)
    spec = jax.sharding.PartitionSpec("d")

    def per_shard(impl, x, y, t):
        def total(x, t):
            return sce.softmax_cross_entropy_with_integer_labels(
                x, y, label_smoothing=0.1, temperature=t, reduction="sum", implementation=impl
            )

        loss, (grad, d_t) = jax.value_and_grad(total, argnums=(0, 1))(x, t)
        return jax.lax.psum(loss, "d"), grad, d_t

    def sharded(impl):
        replicated = jax.sharding.PartitionSpec()
        fn = jax.shard_map(
            functools.partial(per_shard, impl),
            mesh=mesh,
            in_specs=(spec, spec, replicated),
            out_specs=(replicated, spec, replicated),
            check_vma=check_vma,
        )
        put = functools.partial(jax.device_put, device=jax.NamedSharding(mesh, spec))
        return jax.jit(fn)(put(logits), put(labels), jnp.asarray(1.3, jnp.float32))

    got = sharded(pallas(schedule, jnp.float32))
    want = sharded("xla")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)  # the replicated T's gradient, summed


def test_explicitly_sharded_inputs(schedule, mesh):
    """Rows sharded over an explicit mesh under jit run the kernels per shard (the 8-device
    checks in tests/_sharded.py cover every sharding and read the compiled collectives)."""
    logits, labels = make_case(SMALL_V, jnp.float32, integer=True)
    explicit = jax.make_mesh(
        mesh.axis_sizes, mesh.axis_names, axis_types=(jax.sharding.AxisType.Explicit,)
    )
    impl = pallas(schedule, jnp.float32)

    def fn(implementation):
        return jax.jit(
            lambda x: sce.softmax_cross_entropy_with_integer_labels(
                x, labels[:16], implementation=implementation
            )
        )

    with jax.set_mesh(explicit):
        got = fn(impl)(jax.device_put(logits[:16], jax.sharding.PartitionSpec("d")))
    np.testing.assert_allclose(got, fn("xla")(logits[:16]), rtol=1e-6)
