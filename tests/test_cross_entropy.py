"""softmax_cross_entropy and softmax_cross_entropy_with_integer_labels against an independent
float64 NumPy reference and against optax: values, gradients, dtypes, shapes, edge cases, errors
and transformations, for the "xla" and "reference" implementations."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec
from platforms import interpret

import jax_softmax_ce as sce

IMPLEMENTATIONS = ["xla", "reference"]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


# --- Layouts: a canonical [N, V] array and the caller's array and axis that mean the same. -----


def embed(c: np.ndarray, kind: str, batch: tuple[int, ...]):
    """The caller-side array (and ``axis``) whose canonical ``[N, V]`` form is ``c``."""
    v = c.shape[-1]
    x = c.reshape(*batch, v)
    nb = len(batch)
    if kind == "last":
        return x, -1
    if kind == "first":
        return np.moveaxis(x, -1, 0), 0
    if kind == "middle":
        return np.moveaxis(x, -1, 1), 1 - (nb + 1)
    if kind == "tuple12":
        return c.reshape(*batch, 3, v // 3), (nb, nb + 1)
    if kind == "tuple21":
        return np.swapaxes(c.reshape(*batch, v // 3, 3), -1, -2), (nb + 1, nb)
    raise AssertionError(kind)


@dataclasses.dataclass
class Case:
    integer: bool
    dtype: type
    kind: str
    batch: tuple[int, ...]
    logits: np.ndarray  # canonical [N, V], already rounded to dtype
    labels: np.ndarray  # canonical [N] ints or [N, V] probabilities
    where_kind: str
    where: np.ndarray | None  # canonical [N, V]
    options: dict
    reduction: str
    array_temperature: bool

    def caller_args(self):
        x, axis = embed(self.logits, self.kind, self.batch)
        logits = jnp.asarray(x).astype(self.dtype)
        if self.integer:
            labels = jnp.asarray(self.labels.reshape(self.batch))
        else:
            labels = jnp.asarray(embed(self.labels, self.kind, self.batch)[0]).astype(self.dtype)
        where = None
        if self.where_kind == "rows":
            where = jnp.asarray(self.where[:, 0].reshape(self.batch))
        elif self.where_kind == "vocab":
            # 1 on every batch axis: one vocabulary mask shared by all examples.
            where = jnp.asarray(embed(self.where[:1], self.kind, (1,) * len(self.batch))[0])
        elif self.where_kind == "full":
            where = jnp.asarray(embed(self.where, self.kind, self.batch)[0])
        return logits, labels, axis, where


@st.composite
def cases(draw, max_classes: int = 4099):
    integer = draw(st.booleans())
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(st.sampled_from([v for v in (2, 7, 15, 4099) if v <= max_classes]))
    kinds = ["last", "first", "middle"] + (["tuple12", "tuple21"] if v % 3 == 0 else [])
    kind = draw(st.sampled_from(kinds))
    batch = (draw(st.integers(1, 3)), draw(st.integers(1, 2 if v < 4099 else 1)))
    n = math.prod(batch)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([1.0, 8.0]))
    logits = f64(jnp.asarray(rng.normal(size=(n, v)) * scale).astype(dtype))
    options = {}
    if draw(st.booleans()):
        options["label_smoothing"] = draw(st.sampled_from([0.1, 0.3]))
    if draw(st.booleans()):
        options["class_weights"] = rng.uniform(0.2, 2.0, size=v)
    if draw(st.booleans()):
        options["z_loss"] = 1e-2
    if draw(st.booleans()):
        options["logit_softcap"] = draw(st.sampled_from([3.0, 30.0]))
    temperature = draw(st.sampled_from([1.0, 0.7, 2.5]))
    array_temperature = draw(st.booleans())
    options["temperature"] = temperature
    where_kind = draw(st.sampled_from(["none", "rows", "vocab", "full"]))
    where = None
    if where_kind == "rows":
        where = np.repeat(rng.uniform(size=(n, 1)) < 0.7, v, axis=1)
    elif where_kind == "vocab":
        where = np.repeat(rng.uniform(size=(1, v)) < 0.7, n, axis=0)
        where[:, 0] = True
    elif where_kind == "full":
        where = rng.uniform(size=(n, v)) < 0.7
    if integer:
        labels = rng.integers(0, v, size=n)
        if where is not None and where_kind != "rows":
            # Keep targets on valid classes here; targets on invalid classes are an edge case.
            for i in range(n):
                if where[i].any() and not where[i, labels[i]]:
                    labels[i] = int(np.flatnonzero(where[i])[0])
        if draw(st.booleans()):
            options["ignore_index"] = -100
            labels[rng.uniform(size=n) < 0.3] = -100
    else:
        labels = rng.dirichlet(np.ones(v), size=n)
        labels = f64(jnp.asarray(labels).astype(dtype))
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    return Case(
        integer,
        dtype,
        kind,
        batch,
        logits,
        labels,
        where_kind,
        where,
        options,
        reduction,
        array_temperature,
    )


def loss_function(case: Case):
    if case.integer:
        return sce.softmax_cross_entropy_with_integer_labels
    return sce.softmax_cross_entropy


def tolerances(dtype):
    """(loss rtol, loss atol, gradient tolerance relative to the largest entry)."""
    if dtype == jnp.float64:
        return 1e-10, 1e-12, 1e-10
    if dtype == jnp.float32:
        return 2e-5, 2e-6, 2e-5
    if dtype == jnp.float16:
        return 2e-5, 2e-6, 2e-3
    return 2e-5, 2e-6, 1e-2


def check_case(case: Case, implementation: str):
    logits, labels, axis, where = case.caller_args()
    options = dict(case.options)
    temperature = options.pop("temperature")
    if case.array_temperature:
        temperature = jnp.asarray(temperature, jnp.float32)
    if "class_weights" in options:
        options["class_weights"] = jnp.asarray(options["class_weights"], jnp.float32)
    kwargs = dict(
        axis=axis, where=where, reduction=case.reduction, implementation=implementation, **options
    )
    fn = loss_function(case)

    def objective(logits, labels, temperature):
        out = fn(logits, labels, temperature=temperature, **kwargs)
        return jnp.sum(out), out

    argnums = (0,) if case.integer else (0, 1)
    if case.array_temperature:
        argnums = (*argnums, 2)
    grads, out = jax.grad(objective, argnums=argnums, has_aux=True)(logits, labels, temperature)

    ref_options = dict(case.options)
    if case.array_temperature:
        ref_options["temperature"] = float(np.float32(case.options["temperature"]))
    if "class_weights" in ref_options:
        ref_options["class_weights"] = f64(jnp.asarray(ref_options["class_weights"], jnp.float32))
    plain = numpy_reference.cross_entropy(
        case.logits, case.labels, integer=case.integer, where=case.where, **ref_options
    )
    ct = numpy_reference.reduction_cotangent(
        plain,
        case.labels,
        integer=case.integer,
        class_weights=ref_options.get("class_weights"),
        reduction=case.reduction,
    )
    ref = numpy_reference.cross_entropy(
        case.logits,
        case.labels,
        integer=case.integer,
        where=case.where,
        cotangent=ct,
        **ref_options,
    )
    expected = numpy_reference.reduce(
        ref,
        case.labels,
        integer=case.integer,
        class_weights=ref_options.get("class_weights"),
        reduction=case.reduction,
    )
    out_dtype = jnp.float64 if case.dtype == jnp.float64 else jnp.float32
    loss_rtol, loss_atol, grad_tol = tolerances(case.dtype)
    assert out.dtype == out_dtype
    if case.reduction == "none":
        assert out.shape == case.batch
        expected = np.reshape(expected, case.batch)
    else:
        assert out.shape == ()
    np.testing.assert_allclose(f64(out), expected, rtol=loss_rtol, atol=loss_atol)

    expected_grads = [embed(ref.dlogits, case.kind, case.batch)[0]]
    # The logits gradient is a difference, (sum a) p - a, and the labels gradient holds lse - z,
    # so their rounding errors scale with the terms, not with the result (which can cancel to 0).
    scales = [float(np.nanmax(ref.dlogits_terms, initial=0.0))]
    if not case.integer:
        expected_grads.append(embed(ref.dlabels, case.kind, case.batch)[0])
        scales.append(float(np.nanmax(ref.dlabels_terms, initial=0.0)))
    if case.array_temperature:
        expected_grads.append(np.asarray(ref.dtemperature))
    if implementation == "reference" and "logit_softcap" in case.options:
        # Autodiff of tanh forms 1 - tanh**2 with cancellation where the cap saturates.
        grad_tol = max(grad_tol, 1e-3)
    for i, (got, want) in enumerate(zip(grads, expected_grads, strict=True)):
        assert got.shape == want.shape
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        if i < len(scales):
            scale = max(scale, scales[i])
        # The temperature gradient comes back in the temperature's float32.
        tol = (1e-4 if case.dtype != jnp.float64 else 1e-6) if got.ndim == 0 else grad_tol
        np.testing.assert_allclose(f64(got), want, rtol=tol, atol=tol * scale)
    assert grads[0].dtype == case.dtype
    if case.array_temperature:
        assert grads[-1].dtype == jnp.float32


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_matches_float64_reference(case, implementation):
    check_case(case, implementation)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["tpu", "gpu"])
@settings(max_examples=10, deadline=None)
@given(case=cases())
def test_pallas_matches_float64_reference(case, schedule):
    """The same properties for both kernel schedules, with their default blocks (interpreted
    where the test machine does not compile them)."""
    check_case(case, sce.Pallas(schedule=schedule, interpret=interpret(schedule)))


# --- optax on default options. -----------------------------------------------------------------


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
@pytest.mark.parametrize("axis", [-1, 0, (0, 2)])
def test_agrees_with_optax(implementation, axis):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32), axis=axis)
    ours = sce.softmax_cross_entropy(logits, probs, axis, implementation=implementation)
    theirs = optax.softmax_cross_entropy(logits, probs, axis)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    g_ours = jax.grad(lambda x: sce.softmax_cross_entropy(x, probs, axis).sum())(logits)
    g_theirs = jax.grad(lambda x: optax.softmax_cross_entropy(x, probs, axis).sum())(logits)
    np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)

    batch_shape = tuple(
        s for i, s in enumerate(logits.shape) if i not in np.atleast_1d(np.asarray(axis) % 3)
    )
    num_classes = logits.size // math.prod(batch_shape)
    labels = jnp.asarray(rng.integers(0, num_classes, size=batch_shape))
    ours = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, axis, implementation=implementation
    )
    theirs = optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    g = lambda f: jax.grad(lambda x: f(x, labels, axis).sum())(logits)
    np.testing.assert_allclose(
        g(sce.softmax_cross_entropy_with_integer_labels),
        g(optax.softmax_cross_entropy_with_integer_labels),
        rtol=1e-5,
        atol=1e-6,
    )


def test_agrees_with_optax_under_where():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 9, size=5))
    where = jnp.asarray(rng.uniform(size=(5, 9)) < 0.6).at[:, 0].set(True)
    labels = jnp.where(jnp.take_along_axis(where, labels[:, None], 1)[:, 0], labels, 0)
    np.testing.assert_allclose(
        sce.softmax_cross_entropy_with_integer_labels(logits, labels, where=where),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=where),
        rtol=1e-6,
    )
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(5, 9)), jnp.float32))
    np.testing.assert_allclose(
        sce.softmax_cross_entropy(logits, probs, where=where),
        optax.softmax_cross_entropy(logits, probs, where=where),
        rtol=1e-5,
    )


# --- Numerics. -----------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_logits_keep_float32_relative_accuracy(implementation):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(1e4 + rng.normal(size=(8, 300)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 300, size=8))
    ours = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, implementation=implementation
    )
    want = numpy_reference.cross_entropy(f64(logits), f64(labels), integer=True).loss
    np.testing.assert_allclose(f64(ours), want, rtol=3e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_loss_is_float32_accurate(implementation):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(16, 1000)) * 4, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 1000, size=16))
    ours = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, implementation=implementation
    )
    assert ours.dtype == jnp.float32
    want = numpy_reference.cross_entropy(f64(logits), f64(labels), integer=True).loss
    np.testing.assert_allclose(f64(ours), want, rtol=1e-5)
    g = jax.grad(
        lambda x: sce.softmax_cross_entropy_with_integer_labels(
            x, labels, implementation=implementation
        ).sum()
    )(logits)
    assert g.dtype == jnp.bfloat16


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_negative_infinity_logits(implementation):
    logits = jnp.asarray([[0.0, -jnp.inf, 1.0], [-jnp.inf, 2.0, 0.5]], jnp.float32)
    labels = jnp.asarray([0, 0])
    loss_fn = lambda x: sce.softmax_cross_entropy_with_integer_labels(
        x, labels, implementation=implementation
    )
    loss = loss_fn(logits)
    want = numpy_reference.cross_entropy(f64(logits), f64(labels), integer=True)
    assert np.isfinite(loss[0]) and loss[1] == np.inf
    np.testing.assert_allclose(loss[0], want.loss[0], rtol=1e-6)
    grad = jax.grad(lambda x: loss_fn(x)[0])(logits)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(f64(grad[0]), want.dlogits[0], atol=1e-6)
    np.testing.assert_array_equal(grad[1], 0.0)

    probs = jnp.asarray([[0.5, 0.0, 0.5]], jnp.float32)
    soft = lambda x, y: sce.softmax_cross_entropy(
        x, y, implementation=implementation, label_smoothing=0.0, z_loss=1e-3
    ).sum()
    value, (gx, gy) = jax.value_and_grad(soft, argnums=(0, 1))(logits[:1], probs)
    assert np.isfinite(value) and np.all(np.isfinite(gx)) and not np.any(np.isnan(gy))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_infinite_logits_with_softcap_and_array_temperature(implementation, softcap):
    """The softcap caps finite logits only: a -inf logit stays a class of probability 0 (a
    target on it gives +inf) and a +inf logit gives a non-finite loss, as without a softcap. The
    gradients in the logits and in an array temperature stay finite at -inf and match float64."""
    inf = np.inf

    def loss_fn(x, t):
        return sce.softmax_cross_entropy_with_integer_labels(
            x, jnp.zeros(x.shape[0], jnp.int32), logit_softcap=softcap, temperature=t,
            implementation=implementation,
        )  # fmt: skip

    t = jnp.float32(1.7)
    bad = loss_fn(jnp.asarray([[0.0, inf, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]]), t)
    assert not np.isfinite(bad[0]) and np.isfinite(bad[1])
    logits = jnp.asarray([[0.0, -inf, 1.0, 3.0], [-inf, 2.0, 0.5, 0.0]])
    loss = loss_fn(logits, t)
    assert np.isfinite(loss[0]) and loss[1] == np.inf
    want = numpy_reference.cross_entropy(
        f64(logits[:1]), np.zeros(1), integer=True, logit_softcap=softcap, temperature=1.7
    )
    np.testing.assert_allclose(loss[0], want.loss[0], rtol=1e-6)
    gx, gt = jax.grad(lambda x, t: loss_fn(x, t)[0], argnums=(0, 1))(logits, t)
    assert np.all(np.isfinite(gx)) and np.isfinite(gt)
    np.testing.assert_allclose(f64(gx[0]), want.dlogits[0], atol=1e-6)
    np.testing.assert_allclose(gt, want.dtemperature, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_positive_infinity_give_non_finite_loss(implementation, bad):
    logits = jnp.asarray([[0.0, bad, 1.0], [0.0, 1.0, 2.0]], jnp.float32)
    loss = sce.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray([0, 1]), implementation=implementation
    )
    assert not np.isfinite(loss[0]) and np.isfinite(loss[1])
    probs = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], jnp.float32)
    loss = sce.softmax_cross_entropy(logits, probs, implementation=implementation)
    assert not np.isfinite(loss[0]) and np.isfinite(loss[1])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logit_is_never_hidden(implementation, bad):
    """Rows of 128 classes, wide enough for XLA's vectorised max on CPU to skip a NaN, and rows
    whose weights are all 0 at the bad class (a zero class weight on the label, probability
    labels that are all 0): a NaN or +inf logit still gives a non-finite loss, and the clean
    rows keep their float64 values."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(32, 128))
    logits[0, 3] = logits[1, 100] = bad
    labels = rng.integers(0, 128, 32)
    labels[1] = 5
    cw = np.ones(128)
    cw[5] = 0.0  # row 1's label weighs nothing
    probs = np.eye(128)[labels]
    probs[1] = 0.0  # row 1 puts no mass on any class

    integer = jax.jit(
        lambda x, y, w: sce.softmax_cross_entropy_with_integer_labels(
            x, y, class_weights=w, implementation=implementation
        )
    )
    soft = jax.jit(lambda x, y: sce.softmax_cross_entropy(x, y, implementation=implementation))
    x32 = jnp.asarray(logits, jnp.float32)
    for loss, want in (
        (integer(x32, jnp.asarray(labels), jnp.asarray(cw, jnp.float32)), cw[labels]),
        (soft(x32, jnp.asarray(probs, jnp.float32)), probs.sum(1)),
    ):
        assert not np.isfinite(loss[0]) and not np.isfinite(loss[1])
        clean = logits[2:] - logits[2:].max(1, keepdims=True)
        nll = np.log(np.exp(clean).sum(1)) - clean[np.arange(30), labels[2:]]
        np.testing.assert_allclose(loss[2:], want[2:] * nll, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_label_gradient_is_zero_where_class_weight_is_zero_at_negative_infinity(implementation):
    """``dl/dy_k = w_k (lse - z_k)``: at a -inf logit ``lse - z_k`` is +inf, and a zero class
    weight there gives 0, not NaN."""
    logits = np.array([[0.0, 1.0, -np.inf, 2.0]])
    probs = np.array([[0.5, 0.5, 0.0, 0.0]])
    cw = np.array([1.0, 2.0, 0.0, 1.0])
    grad = jax.grad(
        lambda y: sce.softmax_cross_entropy(
            jnp.asarray(logits, jnp.float32),
            y,
            class_weights=jnp.asarray(cw, jnp.float32),
            implementation=implementation,
        ).sum()
    )(jnp.asarray(probs, jnp.float32))
    lse = np.log(np.exp([0.0, 1.0, 2.0]).sum())
    np.testing.assert_allclose(grad, [[lse, 2 * (lse - 1), 0.0, lse - 2]], rtol=1e-6)


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_class_axis_is_zero_as_in_optax(implementation, reduction):
    """optax's own mask test takes ``preds[mask]`` for a random mask, which is empty when the
    mask is all False: its empty sum is 0, and so is ours (no example has a valid class)."""
    for shape in [(0,), (3, 0)]:
        logits, probs = jnp.zeros(shape), jnp.zeros(shape)
        want = optax.softmax_cross_entropy(logits, probs)
        loss = sce.softmax_cross_entropy(
            logits, probs, reduction=reduction, implementation=implementation
        )
        assert loss.shape == (want.shape if reduction == "none" else ())
        np.testing.assert_array_equal(loss, 0.0)
        grad = jax.grad(lambda x, y: jnp.sum(sce.softmax_cross_entropy(x, y)))(logits, probs)
        assert grad.shape == shape
    labels = jnp.zeros((3,), jnp.int32)
    loss = sce.softmax_cross_entropy_with_integer_labels(
        jnp.zeros((3, 0)), labels, reduction=reduction, implementation=implementation
    )
    np.testing.assert_array_equal(loss, 0.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_out_of_range_label_is_nan_under_jit(implementation, weighted):
    """Also with class weights, where a negative label must not wrap around to the last class's
    weight."""
    logits = jnp.zeros((3, 4), jnp.float32)
    labels = jnp.asarray([0, 4, -1])
    cw = jnp.asarray([1.0, 2.0, 3.0, 4.0]) if weighted else None
    fn = jax.jit(
        lambda x, y: sce.softmax_cross_entropy_with_integer_labels(
            x, y, implementation=implementation, ignore_index=-100, class_weights=cw
        )
    )
    loss = fn(logits, labels)
    assert np.isfinite(loss[0]) and np.isnan(loss[1]) and np.isnan(loss[2])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_examples_that_do_not_count(implementation, reduction):
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(4, 5)), jnp.float32)
    labels = jnp.asarray([1, -100, 3, 2])
    where = jnp.asarray([[True] * 5, [True] * 5, [False] * 5, [True, True, False, True, True]])
    fn = lambda x: sce.softmax_cross_entropy_with_integer_labels(
        x,
        labels,
        where=where,
        ignore_index=-100,
        reduction=reduction,
        label_smoothing=0.1,
        z_loss=1e-3,
        implementation=implementation,
    )
    value, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x)))(logits)
    ref = numpy_reference.cross_entropy(
        f64(logits),
        f64(labels),
        integer=True,
        where=f64(where),
        ignore_index=-100,
        label_smoothing=0.1,
        z_loss=1e-3,
    )
    np.testing.assert_array_equal(ref.counted, [True, False, False, True])
    if reduction == "none":
        np.testing.assert_array_equal(fn(logits)[1:3], 0.0)
    np.testing.assert_array_equal(grad[1:3], 0.0)
    assert np.all(np.isfinite(grad))
    want = numpy_reference.reduce(
        ref, f64(labels), integer=True, class_weights=None, reduction=reduction
    )
    np.testing.assert_allclose(value, np.sum(want), rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mean_of_nothing_is_zero(implementation):
    logits = jnp.ones((3, 4), jnp.float32)
    fn = lambda x: sce.softmax_cross_entropy_with_integer_labels(
        x, jnp.full((3,), -100), ignore_index=-100, reduction="mean", implementation=implementation
    )
    value, grad = jax.value_and_grad(fn)(logits)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    masked = sce.softmax_cross_entropy(
        logits,
        jnp.full((3, 4), 0.25),
        where=jnp.zeros(3, bool),
        reduction="mean",
        implementation=implementation,
    )
    assert masked == 0.0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_weighted_mean_is_pytorch_weighted_mean(implementation):
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 3, 1, -100])
    weights = jnp.asarray([0.5, 2.0, 1.0, 3.0], jnp.float32)
    ours = sce.softmax_cross_entropy_with_integer_labels(
        logits,
        labels,
        class_weights=weights,
        ignore_index=-100,
        reduction="mean",
        implementation=implementation,
    )
    x, t, w = f64(logits)[:5], np.asarray(labels)[:5], f64(weights)
    nll = -(x[np.arange(5), t] - np.log(np.exp(x).sum(1)))
    np.testing.assert_allclose(ours, np.sum(w[t] * nll) / np.sum(w[t]), rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_label_on_masked_class_is_infinite_and_soft_mass_there_is_dropped(implementation):
    logits = jnp.asarray([[1.0, 2.0, 3.0]], jnp.float32)
    where = jnp.asarray([[True, False, True]])
    loss = sce.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray([1]), where=where, implementation=implementation
    )
    assert loss[0] == np.inf
    probs = jnp.asarray([[0.2, 0.5, 0.3]], jnp.float32)
    loss = sce.softmax_cross_entropy(logits, probs, where=where, implementation=implementation)
    z = np.array([1.0, 3.0])
    lse = np.log(np.exp(z).sum())
    np.testing.assert_allclose(loss[0], 0.2 * (lse - 1.0) + 0.3 * (lse - 3.0), rtol=1e-6)


def test_smoothing_mass_goes_to_valid_classes_only():
    logits = jnp.asarray([[0.3, -1.0, 2.0, 0.0]], jnp.float32)
    where = jnp.asarray([[True, True, True, False]])
    loss = sce.softmax_cross_entropy_with_integer_labels(
        logits, jnp.asarray([2]), where=where, label_smoothing=0.3
    )
    z = np.array([0.3, -1.0, 2.0])
    nll = np.log(np.exp(z).sum()) - z
    np.testing.assert_allclose(loss[0], 0.7 * nll[2] + 0.1 * nll.sum(), rtol=1e-6)


# --- Errors at trace time. -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: sce.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32)
            ),
            TypeError,
            r"logits must be floating.*int32.*\(2, 3\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(jnp.zeros((2, 3), bool), jnp.zeros((2, 3))),
            TypeError,
            "logits must be floating",
        ),
        (
            lambda: sce.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, jnp.float32)
            ),
            TypeError,
            r"labels must be integers.*float32.*\(2,\)",
        ),
        (
            lambda: sce.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32)
            ),
            ValueError,
            r"labels shape \(3,\) does not match logits shape \(2, 3\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
            ValueError,
            r"labels shape \(2, 4\) does not broadcast to logits shape \(2, 3\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), where=jnp.ones((3,), bool)
            ),
            ValueError,
            r"where shape \(3,\) does not broadcast to logits shape \(2, 3\) \(axis -1\): a where"
            r" of the batch's rank \(1\) masks whole examples .* to mask classes, give it the "
            r"logits' rank: shape \(1, 3\)",
        ),
        (
            lambda: sce.softmax_cross_entropy_with_integer_labels(
                jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), -1, -100
            ),
            TypeError,
            r"where must be a boolean mask, got the integer -100: where is the fourth positional "
            r"argument .* ignore_index=-100 by keyword",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), where=jnp.ones((2, 2, 3), bool)
            ),
            ValueError,
            r"where shape \(2, 2, 3\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), class_weights=jnp.ones(4)
            ),
            ValueError,
            r"class_weights shape \(4,\) must be \[3\], .* logits \(shape \(2, 3\)\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), label_smoothing=1.0
            ),
            ValueError,
            r"label_smoothing must be in \[0, 1\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), label_smoothing=-0.1
            ),
            ValueError,
            "label_smoothing",
        ),
        (
            lambda: sce.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), z_loss=-1.0),
            ValueError,
            "z_loss must be >= 0",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), logit_softcap=0.0
            ),
            ValueError,
            "logit_softcap must be > 0",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), logit_softcap=float("inf")
            ),
            ValueError,
            "logit_softcap must be > 0 and finite",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=0.0
            ),
            ValueError,
            "temperature must be > 0",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=jnp.ones(2)
            ),
            ValueError,
            r"temperature must be a scalar, got shape \(2,\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), reduction="avg"
            ),
            ValueError,
            "reduction must be one of",
        ),
        (
            lambda: sce.softmax_cross_entropy(
                jnp.zeros((2, 3)), jnp.zeros((2, 3)), implementation="cuda"
            ),
            ValueError,
            "implementation must be None or one of",
        ),
        (
            lambda: sce.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), axis=2),
            ValueError,
            r"axis 2 is out of range for logits of shape \(2, 3\)",
        ),
        (
            lambda: sce.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), axis=(1, -1)),
            ValueError,
            "names an axis twice",
        ),
    ],
)
def test_bad_input_raises_with_names_and_shapes(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_raise_at_trace_time_under_jit():
    fn = jax.jit(lambda x: sce.softmax_cross_entropy(x, jnp.zeros((2, 4))))
    with pytest.raises(ValueError, match="does not broadcast"):
        fn(jnp.zeros((2, 3)))


# --- Transformations. ----------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_jit_traces_once_per_shape_and_option_set(implementation):
    traces = []

    @jax.jit
    def step(logits, labels, temperature):
        traces.append(None)
        return jax.value_and_grad(
            lambda x: sce.softmax_cross_entropy_with_integer_labels(
                x,
                labels,
                label_smoothing=0.1,
                temperature=temperature,
                reduction="mean",
                implementation=implementation,
            )
        )(logits)

    rng = np.random.default_rng(6)
    for _ in range(3):
        step(
            jnp.asarray(rng.normal(size=(4, 7)), jnp.float32),
            jnp.asarray(rng.integers(0, 7, 4)),
            jnp.float32(rng.uniform(0.5, 2)),
        )
    assert len(traces) == 1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_nested_vmap_matches_batched_call(implementation):
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 6, size=(3, 4)))
    fn = lambda x, y: sce.softmax_cross_entropy_with_integer_labels(
        x, y, z_loss=1e-2, implementation=implementation
    )
    batched = fn(logits, labels)
    np.testing.assert_allclose(jax.vmap(jax.vmap(fn))(logits, labels), batched, rtol=1e-6)
    # in_axes other than 0: examples along axis 1 of the logits.
    moved = jax.vmap(fn, in_axes=(1, 1), out_axes=1)(logits, labels)
    np.testing.assert_allclose(moved, batched, rtol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_of_grad_gives_per_example_gradients(implementation):
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(5, 9)), jnp.float32))
    one = lambda x, y: sce.softmax_cross_entropy(
        x, y, label_smoothing=0.2, logit_softcap=4.0, implementation=implementation
    )
    per_example = jax.vmap(jax.grad(one, argnums=(0, 1)))(logits, probs)
    ref = numpy_reference.cross_entropy(
        f64(logits), f64(probs), integer=False, label_smoothing=0.2, logit_softcap=4.0
    )
    np.testing.assert_allclose(f64(per_example[0]), ref.dlogits, atol=1e-6)
    np.testing.assert_allclose(f64(per_example[1]), ref.dlabels, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_grad_of_grad_is_the_softmax_hessian(implementation):
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(3, 6)), jnp.float64)
    labels = jnp.asarray(rng.integers(0, 6, 3))
    direction = jnp.asarray(rng.normal(size=(3, 6)), jnp.float64)
    loss = lambda x: sce.softmax_cross_entropy_with_integer_labels(
        x, labels, reduction="sum", implementation=implementation
    )
    hvp = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), direction))(logits)
    x = f64(logits)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = f64(direction)
    want = p * d - p * np.sum(p * d, axis=1, keepdims=True)  # (diag(p) - p p^T) d per row
    np.testing.assert_allclose(f64(hvp), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1, z_loss=1e-2),
        dict(logit_softcap=2.0, temperature=1.7),
        dict(class_weights=jnp.asarray([1.0, 2.0, 0.5, 1.0, 3.0])),
    ],
)
def test_grad_of_grad_with_options_matches_reference(options):
    rng = np.random.default_rng(10)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float64)
    labels = jnp.asarray(rng.integers(0, 5, 4))
    direction = jnp.asarray(rng.normal(size=(4, 5)), jnp.float64)

    def hvp(implementation):
        loss = lambda x: sce.softmax_cross_entropy_with_integer_labels(
            x, labels, reduction="mean", implementation=implementation, **options
        )
        return jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), direction))(logits)

    forward_mode = jax.jvp(
        jax.grad(
            lambda x: sce.softmax_cross_entropy_with_integer_labels(
                x, labels, reduction="mean", implementation="reference", **options
            )
        ),
        (logits,),
        (direction,),
    )[1]
    np.testing.assert_allclose(hvp("xla"), forward_mode, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(hvp("reference"), forward_mode, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("integer", [True, False])
def test_second_derivatives_in_temperature_with_masked_classes(integer):
    """A class-level ``where`` puts -inf logits in the backward's weighted sums: the derivatives
    of those sums must stay finite. ``d2l/dT2`` and ``d/dT dl/dz`` against float64 central
    differences of the NumPy reference (its loss and its analytic logits gradient)."""
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(4, 5)) * 2
    where = np.array([[True, True, True, False, True]])
    labels = np.array([0, 1, 2, 4]) if integer else jax.nn.softmax(rng.normal(size=(4, 5)))
    labels = np.where(where, labels, 0) if not integer else labels
    fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy

    def loss(x, t):
        return fn(x, jnp.asarray(labels), where=where, temperature=t, reduction="sum")

    t0, h = 1.3, 1e-4

    def ref(t):
        return numpy_reference.cross_entropy(
            logits, np.asarray(labels), integer=integer, where=where, temperature=t
        )

    d2 = jax.grad(jax.grad(loss, argnums=1), argnums=1)(jnp.asarray(logits), t0)
    want = (ref(t0 + h).loss.sum() - 2 * ref(t0).loss.sum() + ref(t0 - h).loss.sum()) / h**2
    np.testing.assert_allclose(d2, want, rtol=1e-5)
    mixed = jax.jacobian(lambda t: jax.grad(loss)(jnp.asarray(logits), t))(t0)
    want = (ref(t0 + h).dlogits - ref(t0 - h).dlogits) / (2 * h)
    assert np.all(np.isfinite(mixed))
    np.testing.assert_allclose(mixed, want, rtol=1e-6, atol=1e-8)


def test_forward_mode_and_hessians_where_the_docstrings_say():
    """Forward mode of the loss (jvp) works with "reference" only; jax.hessian (forward over
    reverse) also with "xla", whose reverse rule is plain JAX, and matches optax's; "pallas",
    whose kernels have reverse-mode rules only, raises."""
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(2, 4)), jnp.float64)
    labels = jnp.asarray([1, 3])
    direction = jnp.asarray(rng.normal(size=(2, 4)), jnp.float64)
    fn = lambda impl: (
        lambda x: sce.softmax_cross_entropy_with_integer_labels(
            x, labels, reduction="sum", implementation=impl
        )
    )
    _, tangent = jax.jvp(fn("reference"), (logits,), (direction,))
    ref = numpy_reference.cross_entropy(f64(logits), f64(labels), integer=True)
    np.testing.assert_allclose(tangent, np.sum(ref.dlogits * f64(direction)), rtol=1e-10)
    want = jax.hessian(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).sum())
    for impl in ("reference", "xla"):
        hessian = jax.hessian(fn(impl))(logits)
        assert hessian.shape == (2, 4, 2, 4)
        np.testing.assert_allclose(hessian, want(logits), rtol=1e-10, atol=1e-12)
    pallas = sce.Pallas(interpret=True)
    for impl, transform in (
        ("xla", lambda f: jax.jvp(f, (logits,), (direction,))),
        ("xla", lambda f: jax.linearize(f, logits)[1](direction)),
        (pallas, lambda f: jax.jvp(f, (logits,), (direction,))),
        (pallas, lambda f: jax.hessian(f)(logits)),
    ):
        with pytest.raises(TypeError, match="custom_vjp"):
            transform(fn(impl))


def test_a_scalar_where_applies_to_every_class():
    logits, labels = jnp.asarray([[1.0, 2.0, 0.5]]), jnp.asarray([1])
    plain = sce.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_array_equal(
        sce.softmax_cross_entropy_with_integer_labels(logits, labels, where=True), plain
    )
    nothing = sce.softmax_cross_entropy_with_integer_labels(logits, labels, where=False)
    np.testing.assert_array_equal(nothing, 0.0)


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, sce.Pallas(interpret=True)])
@pytest.mark.parametrize("value", [-1.0, 0.0, np.nan])
def test_non_positive_array_temperature_gives_nan(implementation, value):
    """A Python temperature that is not positive raises; an array one cannot raise under jit
    and gives NaN losses, like an out-of-range label (never a finite loss of a negated or
    infinite z')."""
    logits = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    labels = jnp.asarray([1, 2])
    loss = jax.jit(
        lambda t: sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, temperature=t, implementation=implementation
        )
    )(jnp.asarray(value, jnp.float32))
    assert loss.shape == (2,) and np.all(np.isnan(loss))
    linear = sce.linear_softmax_cross_entropy(
        logits, jnp.eye(3), labels, temperature=jnp.asarray(value), implementation=implementation
    )
    assert np.all(np.isnan(linear))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sce.softmax_cross_entropy_with_integer_labels(logits, labels, temperature=value)


def test_optax_training_step():
    rng = np.random.default_rng(12)
    features = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    labels = jnp.asarray(np.argmax(f64(features)[:, :3], axis=1))
    params = {"w": jnp.zeros((8, 3), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    optimizer = optax.adam(0.1)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: sce.softmax_cross_entropy_with_integer_labels(
                features @ p["w"] + p["b"], labels, label_smoothing=0.05, reduction="mean"
            )
        )(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion clean
        for _ in range(30):
            params, state, loss = step(params, state)
            losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("spec", [PartitionSpec("d", None), PartitionSpec(None, "d")])
def test_sharded_inputs_under_jit(implementation, spec, mesh):
    rng = np.random.default_rng(13)
    logits = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 12, 8))
    fn = jax.jit(
        jax.value_and_grad(
            lambda x, y: sce.softmax_cross_entropy_with_integer_labels(
                x, y, label_smoothing=0.1, reduction="mean", implementation=implementation
            )
        )
    )
    sharded = jax.device_put(logits, NamedSharding(mesh, spec))
    value, grad = fn(sharded, labels)
    want_value, want_grad = fn(logits, labels)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_inside_shard_map_data_parallel(implementation, mesh):
    """With a replicated array temperature: its gradient comes back summed over the shards, as
    JAX's autodiff gives for a replicated operand (a custom_vjp rule has to do that itself)."""
    rng = np.random.default_rng(14)
    logits = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 12, 8))
    temperature = jnp.asarray(1.3, jnp.float32)
    spec = PartitionSpec("d")

    def per_shard(x, y, t):
        loss, (grad, d_t) = jax.value_and_grad(
            lambda x, t: sce.softmax_cross_entropy_with_integer_labels(
                x, y, temperature=t, reduction="sum", implementation=implementation
            ),
            argnums=(0, 1),
        )(x, t)
        return jax.lax.psum(loss, "d"), grad, d_t

    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(spec, spec, PartitionSpec()),
            out_specs=(PartitionSpec(), spec, PartitionSpec()),
        )
    )
    sharding = NamedSharding(mesh, spec)
    value, grad, d_t = fn(
        jax.device_put(logits, sharding), jax.device_put(labels, sharding), temperature
    )
    ref = numpy_reference.cross_entropy(f64(logits), f64(labels), integer=True, temperature=1.3)
    np.testing.assert_allclose(value, ref.loss.sum(), rtol=1e-6)
    np.testing.assert_allclose(f64(grad), ref.dlogits, atol=1e-6)
    np.testing.assert_allclose(d_t, ref.dtemperature, rtol=1e-5)


def test_xla_with_rows_sharded_over_an_explicit_mesh(mesh):
    """Rows sharded over an explicit mesh under jit: values and gradients as unsharded (the
    log-sum-exp's empty state once was a replicated constant, which explicit sharding would not
    mix with the sharded rows)."""
    rng = np.random.default_rng(15)
    logits = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 12, 8))
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, 12)), jnp.float32))
    explicit = jax.make_mesh(
        mesh.axis_sizes, mesh.axis_names, axis_types=(jax.sharding.AxisType.Explicit,)
    )
    ref = numpy_reference.cross_entropy(f64(logits), f64(labels), integer=True, z_loss=1e-2)
    soft = numpy_reference.cross_entropy(f64(logits), f64(probs), integer=False, z_loss=1e-2)
    for fn, y, want in (
        (sce.softmax_cross_entropy_with_integer_labels, labels, ref),
        (sce.softmax_cross_entropy, probs, soft),
    ):
        loss = jax.jit(
            jax.value_and_grad(
                lambda x, y, fn=fn: fn(x, y, z_loss=1e-2, reduction="sum", implementation="xla")
            )
        )
        with jax.set_mesh(explicit):
            rows = PartitionSpec("d")
            value, grad = loss(jax.device_put(logits, rows), jax.device_put(y, rows))
        np.testing.assert_allclose(value, want.loss.sum(), rtol=1e-6)
        np.testing.assert_allclose(f64(grad), want.dlogits, atol=1e-6)


def test_pallas_is_never_a_silent_fallback():
    logits, labels = jnp.zeros((2, 3)), jnp.asarray([0, 1])
    try:
        out = sce.softmax_cross_entropy_with_integer_labels(logits, labels, implementation="pallas")
    except NotImplementedError as err:
        assert "pallas" in str(err).lower()
    else:
        np.testing.assert_allclose(out, np.log(3.0), rtol=1e-6)
