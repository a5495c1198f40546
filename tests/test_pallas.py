"""implementation="pallas": both kernel schedules, in interpret mode on CPU.

Every test runs once per schedule ("tpu": Mosaic grid reduction, "gpu": Triton in-kernel loop).
On CPU both run in Pallas' interpreters; on an accelerator the native schedule runs compiled and
the other one interpreted. Shapes are tiny and ragged: N = 19 rows (not a multiple of any row
block) and V prime, below one vocabulary block (37) or spanning several (131). Values and
gradients (logits, probability labels, array temperature) are compared with a float64 NumPy
reference written here and with implementation="xla".
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_softmax_ce.kernels import _blocks, cross_entropy_gpu, cross_entropy_tpu
from jax_softmax_ce.kernels._blocks import BlockSizes
from platforms import interpret

import jax_softmax_ce as sce
from jax_softmax_ce import _pallas

N = 19
SMALL_V, LARGE_V = 37, 131
SCHEDULES = ("tpu", "gpu")


def blocks_for(schedule: str, *dtypes) -> BlockSizes:
    """Small blocks that keep every test ragged: several row blocks, V below or above one."""
    if schedule == "tpu":
        return BlockSizes(max(_blocks.sublanes(d) for d in dtypes), 128)
    return BlockSizes(8, 64)


@contextlib.contextmanager
def pallas(schedule: str, *dtypes):
    with _pallas.using(
        platform=schedule, block_sizes=blocks_for(schedule, *dtypes), interpret=interpret(schedule)
    ):
        yield


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    return request.param


# ---------------------------------------------------------------------------------------------
# An independent float64 reference: the spec's formulas, vectorised over rows.


def reference(
    logits,
    labels,
    *,
    integer,
    where=None,
    class_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    temperature=1.0,
    ignore_index=None,
):
    """``(loss [N], dlogits, dlabels, dtemperature)`` of ``sum_i loss_i`` (0 where not counted)."""
    u = np.asarray(logits, np.float64)
    n, v = u.shape
    t = float(temperature)
    valid = np.ones((n, v), bool) if where is None else np.broadcast_to(where, (n, v))
    w = np.ones(v) if class_weights is None else np.asarray(class_weights, np.float64)
    e = label_smoothing
    with np.errstate(all="ignore"):
        capped = (
            u
            if logit_softcap is None
            else np.where(np.isinf(u), u, logit_softcap * np.tanh(u / logit_softcap))
        )
        dcap = 1.0 if logit_softcap is None else 1.0 - np.tanh(u / logit_softcap) ** 2
        z = np.where(valid, capped / t, -np.inf)
        m = z.max(1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        s = np.exp(z - m).sum(1, keepdims=True)
        lse = np.where(s > 0, m + np.log(s), -np.inf)
        p = np.where(s > 0, np.exp(z - np.where(s > 0, lse, 0.0)), 0.0)
        if integer:
            labels = np.asarray(labels)
            in_range = (labels >= 0) & (labels < v)
            q = (np.arange(v) == labels[:, None]).astype(np.float64)
        else:
            q = np.where(valid, np.asarray(labels, np.float64), 0.0)
        n_valid = valid.sum(1, keepdims=True)
        q = (1 - e) * q + np.where(valid, e / np.maximum(n_valid, 1), 0.0)
        a = w * q
        nll = lse - z
        loss = np.sum(np.where(a != 0, a * nll, 0.0), 1) + z_loss * np.where(
            np.isfinite(lse[:, 0]), lse[:, 0] ** 2, 0.0
        )
        g = a.sum(1, keepdims=True) * p - a + 2 * z_loss * np.where(np.isfinite(lse), lse, 0) * p
        dlogits = g * dcap / t
        dtemperature = np.where(g != 0, g * -z / t, 0.0).sum(1)
        dlabels = None if integer else np.where(valid, (1 - e) * w * nll, 0.0)
    counted = valid.any(1)
    if integer and ignore_index is not None:
        counted &= labels != ignore_index
    if integer:
        bad = counted & ~in_range
        loss = np.where(bad, np.nan, loss)
        dlogits = np.where(bad[:, None], np.nan, dlogits)
    loss = np.where(counted, loss, 0.0)
    dlogits = np.where(counted[:, None], dlogits, 0.0)
    if dlabels is not None:
        dlabels = np.where(counted[:, None], dlabels, 0.0)
    dtemperature = np.sum(np.where(counted, dtemperature, 0.0))
    return loss, dlogits, dlabels, dtemperature


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
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(N, v)) * scale, dtype)
    if integer:
        labels = jnp.asarray(rng.integers(0, v, N), jnp.int32)
    else:
        raw = rng.random((N, v)) ** 4
        labels = jnp.asarray(raw / raw.sum(1, keepdims=True), jnp.float32)
    return logits, labels


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
    with pallas(schedule, *dtypes):
        got = run(
            "pallas",
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


@pytest.mark.parametrize("name", sorted(INTEGER_CASES))
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
    with pallas(schedule, jnp.float32):
        loss, d_logits, _, _ = run(
            "pallas", logits, labels, integer=True, ignore_index=-100, class_weights=cw
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
    with pallas(schedule, jnp.float32, *(() if integer else (jnp.float32,)), np.int8):
        loss, d_logits, d_labels, d_t = run(
            "pallas",
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
    with pallas(schedule, jnp.float32, *(() if integer else (jnp.float32,)), np.int8):
        got = mean(logits, labels, implementation="pallas")
    np.testing.assert_allclose(got, mean(logits, labels, implementation="xla"), rtol=1e-6)


def test_negative_infinite_logits(schedule):
    logits, labels = make_case(LARGE_V, jnp.float32, integer=True)
    logits = logits.at[:, 5].set(-jnp.inf).at[2, :].set(-jnp.inf).at[2, 9].set(1.0)
    labels = jnp.where(labels == 5, 6, labels).at[8].set(5).at[2].set(9)
    with pallas(schedule, jnp.float32):
        loss, d_logits, _, _ = run("pallas", logits, labels, integer=True, z_loss=1e-3)
    finite = np.arange(N) != 8
    assert np.isposinf(loss[8])
    assert np.all(np.isfinite(loss[finite])) and np.all(np.isfinite(d_logits))
    want, dwant, _, _ = reference(np.asarray(logits), np.asarray(labels), integer=True, z_loss=1e-3)
    np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(d_logits, dwant, rtol=2e-5, atol=2e-5)


def test_non_finite_logits_are_never_hidden(schedule):
    """A NaN or +inf logit in a block gives a non-finite loss, even when its row puts no weight
    on it (a zero class weight on the label, all-zero probability labels), and the other rows
    match the float64 reference; a -inf logit with a zero class weight gives a zero label
    gradient, not NaN."""
    logits, labels = make_case(LARGE_V, jnp.float32, integer=True)
    logits = logits.at[0, 3].set(jnp.nan).at[1, 100].set(jnp.inf).at[2, 64].set(jnp.nan)
    labels = labels.at[2].set(7)
    cw = jnp.ones((LARGE_V,), jnp.float32).at[7].set(0.0)
    probs = jax.nn.one_hot(labels, LARGE_V).at[2].set(0.0)
    with pallas(schedule, jnp.float32):
        integer = sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, class_weights=cw, implementation="pallas"
        )
        soft = sce.softmax_cross_entropy(logits, probs, implementation="pallas")
    for loss in (integer, soft):
        assert not np.any(np.isfinite(loss[:3]))
    clean = np.arange(3, N)
    want = reference(np.asarray(logits)[clean], np.asarray(labels)[clean], integer=True)[0]
    np.testing.assert_allclose(soft[clean], want, rtol=2e-5)
    np.testing.assert_allclose(integer[clean], np.asarray(cw)[labels[clean]] * want, rtol=2e-5)

    neg = logits.at[:, 5].set(-jnp.inf)
    cw = cw.at[5].set(0.0)
    soft_labels = make_case(LARGE_V, jnp.float32, integer=False)[1]
    with pallas(schedule, jnp.float32, jnp.float32):
        _, _, d_labels, _ = run("pallas", neg[3:], soft_labels[3:], integer=False, class_weights=cw)
    want = reference(
        np.asarray(neg[3:]), np.asarray(soft_labels[3:]), integer=False, class_weights=cw
    )[2]
    want[:, 5] = 0.0  # the float64 formula's 0 * inf at the zero-weight -inf class
    assert not np.any(np.isnan(d_labels))
    np.testing.assert_array_equal(d_labels[:, 5], 0.0)
    np.testing.assert_allclose(d_labels, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("magnitude", [1e4, 1e6])
def test_large_logits_keep_float32_relative_accuracy(schedule, magnitude):
    """Logits around 1e4 or 1e6, several vocabulary blocks: the loss, formed as
    ``log(sum exp(z' - m)) - (z'_t - m)``, keeps float32 relative accuracy."""
    rng = np.random.default_rng(11)
    logits = jnp.asarray(magnitude + rng.normal(size=(N, LARGE_V)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, LARGE_V, N), jnp.int32)
    with pallas(schedule, jnp.float32):
        loss = sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, implementation="pallas"
        )
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
    with pallas(schedule, jnp.float32, *(() if integer else (jnp.float32,)), np.int8):
        value, grad = jax.value_and_grad(
            lambda x: fn(
                x, labels, where=where, reduction="mean", implementation="pallas", **options
            )
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

    with pallas(schedule, jnp.float32):
        got = batched("pallas")
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

    with pallas(schedule, jnp.float32):
        got = batched("pallas")
    want = batched("xla")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4)


@pytest.mark.parametrize("integer", [True, False])
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
    with pallas(schedule, jnp.float32, jnp.float32):
        got = jax.jit(functools.partial(hvp, "pallas"))(logits, t)
    want = jax.jit(functools.partial(hvp, "reference"))(logits, t)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# What the implementation refuses, block sizes, and lowering for the real backends.


def test_unsupported_blocks_raise(schedule):
    logits, labels = make_case(SMALL_V, jnp.float32, integer=True)
    bad = BlockSizes(12, 100)
    with _pallas.using(platform=schedule, block_sizes=bad, interpret=True):
        with pytest.raises(NotImplementedError, match="block"):
            sce.softmax_cross_entropy_with_integer_labels(logits, labels, implementation="pallas")


def test_eager_calls_compile_once(schedule, compilations):
    """A second eager call with the same shapes and options reuses the compiled kernels (it used
    to trace and compile them again); changed settings are traced anew, not served stale."""
    rng = np.random.default_rng(9)
    logits = [jnp.asarray(rng.normal(size=(N, SMALL_V)), jnp.float32) for _ in range(2)]
    labels = jnp.asarray(rng.integers(0, SMALL_V, N), jnp.int32)
    with pallas(schedule, jnp.float32):
        first = sce.softmax_cross_entropy_with_integer_labels(
            logits[0], labels, implementation="pallas"
        )
        before = compilations()
        second = sce.softmax_cross_entropy_with_integer_labels(
            logits[1], labels, implementation="pallas"
        )
        assert compilations() == before
    for x, loss in zip(logits, (first, second), strict=True):
        want = reference(x, labels, integer=True)[0]
        np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=1e-5, atol=1e-6)
    bad = BlockSizes(12, 100)  # fits neither schedule
    with _pallas.using(platform=schedule, block_sizes=bad, interpret=interpret(schedule)):
        with pytest.raises(NotImplementedError, match="block"):
            sce.softmax_cross_entropy_with_integer_labels(
                logits[1], labels, implementation="pallas"
            )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU only")
def test_compiled_on_cpu_raises(schedule):
    logits, labels = make_case(SMALL_V, jnp.float32, integer=True)
    with _pallas.using(platform=schedule, interpret=False):
        with pytest.raises(NotImplementedError, match="interpret"):
            sce.softmax_cross_entropy_with_integer_labels(logits, labels, implementation="pallas")


@pytest.mark.parametrize(("n", "v"), [(1, 1), (19, 37), (8192, 128256), (5, 256000)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_block_sizes_fit(schedule, n, v, dtype):
    blocks = BlockSizes.get_default(n, v, dtype, schedule)
    assert _blocks.block_error(blocks, schedule, [dtype]) is None
    assert blocks.block_v <= max(128, _blocks.pow2_ceil(v))


def test_empty_batch(schedule):
    logits = jnp.zeros((0, SMALL_V), jnp.float32)
    labels = jnp.zeros((0,), jnp.int32)
    with pallas(schedule, jnp.float32):
        loss = sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, implementation="pallas"
        )
    assert loss.shape == (0,) and loss.dtype == jnp.float32


def test_kernels_lower_for_their_backend(schedule, lowering_target):
    """Lowers (without running) both kernels for the real backend: Mosaic for TPU, Triton for
    CUDA. This checks the kernels against the backends' lowering rules (Triton: power-of-two
    shapes and supported primitives), which the interpreters do not."""
    module = {"tpu": cross_entropy_tpu, "gpu": cross_entropy_gpu}[schedule]
    platform = {"tpu": "tpu", "gpu": "cuda"}[schedule]
    n, v = 64, 1000
    blocks = BlockSizes(32, 256) if schedule == "tpu" else BlockSizes(4, 256)
    s = jax.ShapeDtypeStruct
    f32 = jnp.float32
    for integer, where in ((True, "full"), (False, "col")):
        config = _blocks.Config(
            integer=integer,
            where=where,
            label_smoothing=0.1,
            z_loss=1e-4,
            softcap=30.0,
            temperature=None,
        )
        inputs = _blocks.Inputs(
            logits=s((n, v), jnp.bfloat16),
            labels=s((n, 1), jnp.int32) if integer else s((n, v), jnp.bfloat16),
            label_weight=s((n, 1), f32) if integer else None,
            where=s((n, v), jnp.int8) if where == "full" else s((1, v), jnp.int32),
            class_weights=s((1, v), f32),
            n_valid=s((n, 1), f32) if where == "full" else s((1, 1), f32),
            temperature=s((1, 1), f32),
        )
        residuals = _blocks.Residuals(s((n, 1), f32), s((n, 1), f32), s((n, 1), f32))
        with warnings.catch_warnings(), lowering_target(schedule):
            # jax >= 0.11 deprecates the Triton backend with a DeprecationWarning at lowering.
            warnings.simplefilter("ignore", DeprecationWarning)
            fwd = jax.jit(functools.partial(module.forward, config, blocks=blocks))
            bwd = jax.jit(functools.partial(module.backward, config, blocks=blocks))
            fwd.trace(inputs).lower(lowering_platforms=(platform,))
            bwd.trace(inputs, residuals).lower(lowering_platforms=(platform,))


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

    with pallas(schedule, jnp.float32):
        got = sharded("pallas")
    want = sharded("xla")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)  # the replicated T's gradient, summed


def test_explicitly_sharded_inputs_raise(schedule, mesh):
    logits, labels = make_case(SMALL_V, jnp.float32, integer=True)
    logits = jax.device_put(logits[:16], jax.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    fn = jax.jit(
        lambda x: sce.softmax_cross_entropy_with_integer_labels(
            x, labels[:16], implementation="pallas"
        )
    )
    with pallas(schedule, jnp.float32), pytest.raises(NotImplementedError, match="shard_map"):
        fn(logits)
