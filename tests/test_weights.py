"""Per-example ``weights=`` of every loss: values and gradients (logits and weights) against the
float64 NumPy reference and PyTorch, zero weights at NaN logits, broadcasting, errors, ``jit``
and ``vmap``.

A check runs all three reductions in one ``jit``, so that each case compiles once; the Pallas
schedules run at tiny shapes (in the interpreter on a CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from platforms import interpret

import jax_softmax_ce as sce

REDUCTIONS = ("none", "sum", "mean")
IMPLEMENTATIONS = {
    "xla": "xla",
    "reference": "reference",
    "pallas_tpu": sce.Pallas(schedule="tpu", interpret=interpret("tpu")),
    "pallas_gpu": sce.Pallas(schedule="gpu", interpret=interpret("gpu")),
}
BATCH, N, V = (2, 3), 6, 7
# A zero weight on the NaN row, a negative one, and a weight on the example that does not count
# (ignored, or masked by where), which is never read.
WEIGHTS = np.array([0.5, 0.0, 2.0, -0.75, 1.25, 3.0])
NAN_ROW, SKIPPED_ROW = 1, 5
CLASS_WEIGHTS = np.linspace(0.5, 2.0, V)
# The weights are applied outside the kernels, so each Pallas schedule checks one label kind in
# the README's test command and the other with the slow tests (CI runs both).
SOFTMAX_CASES = [
    pytest.param(
        name,
        integer,
        id=f"{name}-{'integer' if integer else 'probabilities'}",
        marks=()
        if name in ("xla", "reference") or (name == "pallas_tpu") == integer
        else pytest.mark.slow,
    )
    for name in IMPLEMENTATIONS
    for integer in (True, False)
]


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


def _softmax_case(integer: bool, seed: int = 0):
    """``(logits, labels, where, options)``: ``[N, V]`` float32 logits, ``[N]`` integer labels
    (one ignored) or ``[N, V]`` probabilities (one example masked by ``where``), and the other
    options of the call."""
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(N, V)) * 2, jnp.float32)
    options = dict(class_weights=CLASS_WEIGHTS, label_smoothing=0.1, z_loss=1e-3, temperature=1.3)
    if integer:
        labels = rng.integers(0, V, size=N)
        labels[SKIPPED_ROW] = -100
        options.update(ignore_index=-100, logit_softcap=5.0)
        return logits, jnp.asarray(labels), None, options
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(N, V)), jnp.float32))
    return logits, probs, np.arange(N) != SKIPPED_ROW, options


def _softmax_loss(integer: bool, labels, where, options, implementation):
    """``loss(logits [N, V], weights [N], reduction)`` on the caller's ``[*BATCH, V]`` layout."""

    def loss(logits, weights, reduction):
        z = logits.reshape(*BATCH, V)
        u = weights.reshape(BATCH)
        common = dict(weights=u, reduction=reduction, implementation=implementation, **options)
        if integer:
            y = labels.reshape(BATCH)
            return sce.softmax_cross_entropy_with_integer_labels(z, y, **common)
        y = labels.reshape(*BATCH, V)
        return sce.softmax_cross_entropy(z, y, where=where.reshape(BATCH), **common)

    return loss


def _every_reduction(loss, *args, reductions=REDUCTIONS):
    """``{reduction: (value, gradients)}`` of ``loss(*args, reduction)`` (summed for
    ``"none"``), differentiated with respect to every argument, in one ``jit``."""

    def run(*args):
        out = {}
        for r in reductions:
            total = lambda *a, r=r: jnp.sum(loss(*a, r))
            out[r] = (loss(*args, r), jax.grad(total, argnums=tuple(range(len(args))))(*args))
        return out

    return jax.jit(run)(*args)


def _numpy_expected(integer, logits, labels, where, options, weights, reduction):
    """``(value, dlogits, dweights)`` in float64: `numpy_reference` of the spec, an example of
    weight 0 contributing nothing (its logits' gradient 0, whatever its logits)."""
    ref_options = dict(options)
    ref_options["class_weights"] = f64(jnp.asarray(CLASS_WEIGHTS, jnp.float32))
    ref_options["temperature"] = float(np.float32(options["temperature"]))
    full_where = None if where is None else np.repeat(where[:, None], V, axis=1)
    labels = f64(labels) if not integer else np.asarray(labels)
    common = dict(integer=integer, class_weights=ref_options["class_weights"])
    plain = numpy_reference.cross_entropy(
        f64(logits), labels, integer=integer, where=full_where, **ref_options
    )
    ct = numpy_reference.reduction_cotangent(
        plain, labels, reduction=reduction, weights=weights, **common
    )
    ref = numpy_reference.cross_entropy(
        f64(logits), labels, integer=integer, where=full_where, cotangent=ct, **ref_options
    )
    value = numpy_reference.reduce(ref, labels, reduction=reduction, weights=weights, **common)
    dlogits = np.where((weights == 0)[:, None], 0.0, ref.dlogits)
    dweights = numpy_reference.weights_gradient(
        ref, labels, reduction=reduction, weights=weights, **common
    )
    return value, dlogits, dweights


@pytest.mark.parametrize(("name", "integer"), SOFTMAX_CASES)
def test_softmax_losses_match_numpy(name, integer):
    """Every implementation, every reduction, with class weights, smoothing, z-loss, a
    temperature and an example that does not count; the zero-weight example has NaN logits."""
    logits, labels, where, options = _softmax_case(integer)
    logits = logits.at[NAN_ROW].set(jnp.nan)
    loss = _softmax_loss(integer, labels, where, options, IMPLEMENTATIONS[name])
    results = _every_reduction(loss, logits, jnp.asarray(WEIGHTS, jnp.float32))
    for reduction, (value, (dlogits, dweights)) in results.items():
        want, want_dlogits, want_dweights = _numpy_expected(
            integer, logits, labels, where, options, WEIGHTS, reduction
        )
        assert value.dtype == jnp.float32
        assert value.shape == (BATCH if reduction == "none" else ())
        np.testing.assert_allclose(f64(value).ravel(), np.ravel(want), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f64(dlogits), want_dlogits, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(f64(dweights), want_dweights, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(dlogits[NAN_ROW], 0.0)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_zero_weights_hide_nan_and_inf_logits(name):
    """A zero weight on a row of NaN logits and on one with a +inf logit: the loss and every
    gradient (logits, weights, an array temperature) are what they are with those rows finite,
    except the weights' gradient there (the unweighted loss, taken as 0 where it is not
    finite)."""
    logits, labels, _, options = _softmax_case(True, seed=1)
    del options["temperature"]
    weights = jnp.asarray(WEIGHTS, jnp.float32).at[2].set(0.0)
    temperature = jnp.float32(0.8)

    def loss(logits, weights, temperature):
        return sce.softmax_cross_entropy_with_integer_labels(
            logits,
            labels,
            weights=weights,
            reduction="mean",
            temperature=temperature,
            implementation=IMPLEMENTATIONS[name],
            **options,
        )

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    bad = logits.at[NAN_ROW].set(jnp.nan).at[2, 3].set(jnp.inf)
    value, (dlogits, dweights, dtemperature) = fn(bad, weights, temperature)
    clean_value, (clean_dlogits, clean_dweights, clean_dt) = fn(logits, weights, temperature)
    assert np.isfinite(value) and np.isfinite(dtemperature)
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    np.testing.assert_allclose(dtemperature, clean_dt, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(dlogits[jnp.asarray([NAN_ROW, 2])], 0.0)
    np.testing.assert_allclose(dlogits, clean_dlogits, rtol=1e-6, atol=1e-7)
    others = np.array([i not in (NAN_ROW, 2) for i in range(N)])
    np.testing.assert_allclose(dweights[others], clean_dweights[others], rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(dweights))


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "probabilities"])
def test_matches_pytorch_losses_times_weights(integer):
    """PyTorch's ``reduction="none"`` losses times the weights, their sum, and the weighted
    mean ``sum(u l) / sum(u c)``: values and gradients with respect to logits and weights."""
    torch = pytest.importorskip("torch")  # CI installs the CPU wheel; the test extras do not
    logits, labels, _, _ = _softmax_case(integer, seed=2)
    logits = f64(logits)
    if not integer:
        labels = f64(labels)
    weights = WEIGHTS.copy()
    options = dict(class_weights=CLASS_WEIGHTS, label_smoothing=0.1)
    if integer:
        options["ignore_index"] = -100
    x = torch.tensor(logits, requires_grad=True)
    u = torch.tensor(weights, requires_grad=True)
    cw = torch.tensor(CLASS_WEIGHTS)
    if integer:
        t = torch.tensor(np.asarray(labels))
        losses = torch.nn.functional.cross_entropy(
            x, t, weight=cw, ignore_index=-100, label_smoothing=0.1, reduction="none"
        )
        c = torch.where(t != -100, cw[t.clamp(min=0)], 0.0)
    else:
        losses = torch.nn.functional.cross_entropy(
            x, torch.tensor(labels), weight=cw, label_smoothing=0.1, reduction="none"
        )
        c = torch.ones(N, dtype=torch.float64)
    torch_values = {
        "none": losses * u,
        "sum": (losses * u).sum(),
        "mean": (losses * u).sum() / (u * c).sum(),
    }
    fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
    for reduction, want in torch_values.items():
        dx, du = torch.autograd.grad(want.sum(), (x, u), retain_graph=True)
        loss = lambda z, w, r=reduction: jnp.sum(fn(z, labels, weights=w, reduction=r, **options))
        value, (dz, dw) = jax.value_and_grad(loss, argnums=(0, 1))(logits, weights)
        np.testing.assert_allclose(value, want.sum().item(), rtol=1e-12)
        np.testing.assert_allclose(dz, dx.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(dw, du.numpy(), rtol=1e-10, atol=1e-14)


def _linear_case(seed: int = 3):
    rng = np.random.default_rng(seed)
    d = 5
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
    labels = rng.integers(0, V, size=N)
    labels[SKIPPED_ROW] = -100
    return x, w, jnp.asarray(labels)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_fused_loss_matches_numpy(name):
    """`linear_softmax_cross_entropy` with weights; the zero-weight example's inputs are NaN,
    which reach neither the projection's gradient nor the other examples'."""
    x, w, labels = _linear_case()
    x = x.at[NAN_ROW].set(jnp.nan)
    options = dict(ignore_index=-100, class_weights=CLASS_WEIGHTS, label_smoothing=0.1)

    def loss(x, w, weights, reduction):
        return sce.linear_softmax_cross_entropy(
            x.reshape(*BATCH, -1),
            w,
            labels.reshape(BATCH),
            weights=weights.reshape(BATCH),
            reduction=reduction,
            implementation=IMPLEMENTATIONS[name],
            **options,
        )

    # The reductions are the pipeline's, outside the implementation: the Pallas kernels, slow in
    # the interpreter, run under the mean here (and under every reduction in the logits losses).
    reductions = ("mean",) if name.startswith("pallas") else REDUCTIONS
    weights = jnp.asarray(WEIGHTS, jnp.float32)
    results = _every_reduction(loss, x, w, weights, reductions=reductions)
    logits = f64(x) @ f64(w)
    clean_x = np.where(np.isnan(f64(x)), 0.0, f64(x))
    for reduction, (value, (dx, dw, dweights)) in results.items():
        want, dlogits, want_dweights = _numpy_expected(
            True, logits, labels, None, options | {"temperature": 1.0}, WEIGHTS, reduction
        )
        np.testing.assert_allclose(f64(value).ravel(), np.ravel(want), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f64(dx), dlogits @ f64(w).T, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(f64(dw), clean_x.T @ dlogits, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(f64(dweights), want_dweights, rtol=2e-5, atol=1e-6)


def _weighted_reduce(losses, weights, denominator_weights, reduction):
    """The weighted reductions in float64 NumPy: ``u l`` (0 where ``u`` is 0), its sum, and
    ``sum(u l) / sum(u c)``."""
    weighted = np.where(weights == 0, 0.0, weights * losses)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / np.sum(weights * denominator_weights)


def _check_weighting(fn, inputs, weights, reduction, want):
    """``fn(inputs, weights)`` against ``want``, and for ``"none"`` its gradients against those
    of ``sum(u * fn(inputs, None))``, whose unweighted losses are tested against their
    references elsewhere (the reductions' gradients are the softmax losses', tested above)."""
    np.testing.assert_allclose(jax.jit(fn)(inputs, weights), want, rtol=1e-10, atol=1e-12)
    if reduction != "none":
        return
    product = lambda x, u: jnp.sum(u * fn(x, None))
    ours = jax.jit(jax.grad(lambda x, u: jnp.sum(fn(x, u)), argnums=(0, 1)))(inputs, weights)
    want = jax.jit(jax.grad(product, argnums=(0, 1)))(inputs, weights)
    for got, expected in zip(ours, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("integer", [True, False], ids=["integer", "probabilities"])
def test_focal_loss_with_weights(integer, reduction):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(N, V)) * 2
    alpha = CLASS_WEIGHTS
    p = np.exp(logits - np.log(np.exp(logits).sum(1, keepdims=True)))
    if integer:
        labels = rng.integers(0, V, size=N)
        labels[SKIPPED_ROW] = -100
        counted = labels != -100
        q = np.eye(V)[np.where(counted, labels, 0)] * counted[:, None]
        c = np.where(counted, alpha[np.where(counted, labels, 0)], 0.0)
        options = dict(ignore_index=-100)
    else:
        labels = rng.dirichlet(np.ones(V), size=N)
        q, c, options = labels, np.ones(N), {}
    losses = -np.sum(alpha * q * (1 - p) ** 2 * np.log(p), axis=1)
    want = _weighted_reduce(losses, WEIGHTS, c, reduction)

    def fn(z, u):
        return sce.softmax_focal_loss(
            z, labels, alpha=alpha, weights=u, reduction=reduction, **options
        )

    _check_weighting(fn, logits, WEIGHTS, reduction, want)
    # gamma = 0 is the cross-entropy with class_weights=alpha, weights and all.
    ce = sce.softmax_focal_loss(
        logits, labels, gamma=0.0, alpha=alpha, weights=WEIGHTS, reduction=reduction, **options
    )
    fn = sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
    np.testing.assert_allclose(
        ce, fn(logits, labels, class_weights=alpha, weights=WEIGHTS, reduction=reduction, **options)
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_weights(reduction):
    """Weights of the classes' shape ``[C]``, broadcast over ``[B, C]`` elements, with
    ``pos_weight``, smoothing and a ``where`` mask; ``"mean"`` divides by the weights of the
    unmasked elements (not by their number, as PyTorch's ``BCEWithLogitsLoss(weight=)`` does)."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 3)) * 3
    labels = (rng.uniform(size=(4, 3)) < 0.5).astype(np.float64)
    pos_weight = np.array([2.0, 0.5, 1.0])
    where = rng.uniform(size=(4, 3)) < 0.8
    weights = np.array([0.5, 0.0, 1.5])
    y = 0.9 * labels + 0.05
    softplus = lambda t: np.logaddexp(0.0, t)
    losses = pos_weight * y * softplus(-logits) + (1 - y) * softplus(logits)
    u = np.where(where, np.broadcast_to(weights, (4, 3)), 0.0)
    want = _weighted_reduce(losses, u, 1.0, reduction)

    def fn(x, u):
        return sce.sigmoid_binary_cross_entropy(
            x,
            labels,
            pos_weight=pos_weight,
            label_smoothing=0.1,
            where=where,
            weights=u,
            reduction=reduction,
        )

    _check_weighting(fn, logits, weights, reduction, want)


def test_sigmoid_focal_loss_with_weights():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 3)) * 3
    labels = (rng.uniform(size=(4, 3)) < 0.5).astype(np.float64)
    weights = np.array([[0.5], [0.0], [2.0], [-1.0]])
    p = 1 / (1 + np.exp(-logits))
    p_t = labels * p + (1 - labels) * (1 - p)
    alpha_t = 0.25 * labels + 0.75 * (1 - labels)
    losses = -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
    fn = lambda x, u: sce.sigmoid_focal_loss(x, labels, alpha=0.25, weights=u)
    _check_weighting(fn, logits, weights, "none", np.where(weights == 0, 0.0, weights * losses))


@pytest.mark.parametrize("log_targets", [False, True])
def test_kl_divergence_with_weights(log_targets):
    rng = np.random.default_rng(7)
    log_p = np.log(rng.dirichlet(np.ones(V), size=BATCH))
    q = rng.dirichlet(np.ones(V), size=BATCH)
    weights = np.array([[1.5], [0.0]])
    want = np.where(weights == 0, 0.0, weights * np.sum(q * (np.log(q) - log_p), axis=-1))
    if log_targets:
        fn = lambda x, u: sce.kl_divergence_with_log_targets(x, np.log(q), weights=u)
    else:
        fn = lambda x, u: sce.kl_divergence(x, q, weights=u)
    _check_weighting(fn, log_p, weights, "none", want)


def test_zero_weights_hide_nan_in_the_autodiff_losses():
    """Focal, binary and divergence losses (plain autodiff): an example of weight 0 with NaN
    inputs has loss 0, and gradient 0 where the other examples' are untouched."""
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(4, 5))
    bad = logits.copy()
    bad[1] = np.nan
    labels = np.array([0, 1, 2, 3])
    probs = rng.dirichlet(np.ones(5), size=4)
    log_p = np.log(rng.dirichlet(np.ones(5), size=4))
    bad_log_p = log_p.copy()
    bad_log_p[1, 2] = np.nan
    u = np.array([1.0, 0.0, 2.0, 0.5])
    losses = {
        "focal": (lambda x: sce.softmax_focal_loss(x, labels, weights=u, reduction="mean"), bad),
        "focal_probabilities": (
            lambda x: sce.softmax_focal_loss(x, probs, weights=u, reduction="sum"),
            bad,
        ),
        "binary": (
            lambda x: sce.sigmoid_binary_cross_entropy(
                x, probs, weights=u[:, None], reduction="mean"
            ),
            bad,
        ),
        "sigmoid_focal": (lambda x: sce.sigmoid_focal_loss(x, probs, weights=u[:, None]), bad),
        "kl": (lambda x: sce.kl_divergence(x, probs, weights=u), bad_log_p),
        "kl_log_targets": (
            lambda x: sce.kl_divergence_with_log_targets(x, np.log(probs), weights=u),
            bad_log_p,
        ),
    }
    for name, (fn, poisoned) in losses.items():
        clean = log_p if name.startswith("kl") else logits
        value_and_grad = jax.jit(jax.value_and_grad(lambda x, fn=fn: jnp.sum(fn(x))))
        value, grad = value_and_grad(poisoned)
        want, want_grad = value_and_grad(clean)
        np.testing.assert_allclose(value, want, rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(grad[1], 0.0, err_msg=name)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15, err_msg=name)


def test_weights_broadcast_to_the_batch_shape():
    """A weight per batch row, a scalar, the class axis first, and a tuple of class axes: the
    weights broadcast to the logits' shape without the class axes."""
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(2, 3, V))
    labels = rng.integers(0, V, size=(2, 3))
    losses = sce.softmax_cross_entropy_with_integer_labels(logits, labels)
    row = np.array([[2.0], [0.5]])
    ours = sce.softmax_cross_entropy_with_integer_labels(logits, labels, weights=row)
    np.testing.assert_allclose(ours, losses * row)
    ours = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, weights=3.0, reduction="mean"
    )
    np.testing.assert_allclose(ours, np.mean(losses), rtol=1e-12)
    first = np.moveaxis(logits, -1, 0)
    ours = sce.softmax_cross_entropy_with_integer_labels(first, labels, axis=0, weights=row)
    np.testing.assert_allclose(ours, losses * row)
    # Classes over axes (0, 2): the batch is axis 1 alone.
    probs = np.full(logits.shape, 1 / (2 * V))
    per_batch = np.array([1.0, 0.0, 2.0])
    losses = sce.softmax_cross_entropy(logits, probs, axis=(0, 2))
    ours = sce.softmax_cross_entropy(logits, probs, axis=(0, 2), weights=per_batch)
    np.testing.assert_allclose(ours, losses * per_batch)


def test_weight_dtypes_and_special_values():
    rng = np.random.default_rng(10)
    logits = jnp.asarray(rng.normal(size=(4, V)), jnp.bfloat16)
    labels = jnp.asarray([0, 1, 2, -100])
    ce = lambda **kw: sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, ignore_index=-100, reduction="mean", **kw
    )
    mask = jnp.asarray([True, False, True, True])
    assert ce(weights=mask).dtype == jnp.float32
    np.testing.assert_array_equal(ce(weights=mask), ce(weights=mask.astype(jnp.float32)))
    np.testing.assert_array_equal(ce(weights=jnp.asarray([2, 0, 1, 5])), ce(weights=[2.0, 0, 1, 5]))
    # float64 weights with 16-bit logits: losses in float32, the weights' gradient in float64.
    w64 = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    grad = jax.grad(lambda u: ce(weights=u))(w64)
    assert grad.dtype == jnp.float64 and ce(weights=w64).dtype == jnp.float32
    # A NaN weight makes the result NaN, unless its example does not count.
    assert np.isnan(ce(weights=jnp.asarray([1.0, np.nan, 1.0, 1.0])))
    assert np.isfinite(ce(weights=jnp.asarray([1.0, 1.0, 1.0, np.nan])))
    # All weights zero: the mean is 0, as when nothing counts, with zero gradients.
    value, grad = jax.value_and_grad(lambda u: ce(weights=u))(jnp.zeros(4))
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def _error_calls(weights):
    z = np.zeros((2, 3, V))
    y = np.zeros((2, 3), int)
    p = np.full((2, 3, V), 1 / V)
    x, w = np.zeros((2, 3, 4)), np.zeros((4, V))
    return {
        "integer": lambda: sce.softmax_cross_entropy_with_integer_labels(z, y, weights=weights),
        "probabilities": lambda: sce.softmax_cross_entropy(z, p, weights=weights),
        "linear": lambda: sce.linear_softmax_cross_entropy(x, w, y, weights=weights),
        "focal": lambda: sce.softmax_focal_loss(z, y, weights=weights),
        "binary": lambda: sce.sigmoid_binary_cross_entropy(y * 1.0, y * 1.0, weights=weights),
        "sigmoid_focal": lambda: sce.sigmoid_focal_loss(y * 1.0, y * 1.0, weights=weights),
        "kl": lambda: sce.kl_divergence(z, p, weights=weights),
        "kl_log_targets": lambda: sce.kl_divergence_with_log_targets(z, z, weights=weights),
    }


@pytest.mark.parametrize("name", list(_error_calls(None)))
def test_bad_weights_raise_naming_weights(name):
    with pytest.raises(ValueError, match=r"weights shape \(3, 2\) does not broadcast to the"):
        _error_calls(np.ones((3, 2)))[name]()
    with pytest.raises(TypeError, match="weights must be real numbers"):
        _error_calls(np.ones((2, 3), np.complex64))[name]()


def test_the_error_names_the_batch_shape():
    z = np.zeros((2, 3, V))
    with pytest.raises(ValueError, match=r"batch shape \(2, 3\) \(logits shape \(2, 3, 7\)"):
        sce.softmax_cross_entropy_with_integer_labels(z, np.zeros((2, 3), int), weights=[1.0] * 4)
    with pytest.raises(ValueError, match=r"batch shape \(3,\) \(logits shape \(2, 3, 7\) with"):
        sce.softmax_cross_entropy(z, z, axis=(0, 2), weights=np.ones(2))


def test_jit_and_vmap():
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(3, N, V)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, size=(3, N)))
    weights = jnp.asarray(rng.uniform(0, 2, size=(3, N)), jnp.float32)

    def loss(z, y, u):
        return sce.softmax_cross_entropy_with_integer_labels(z, y, weights=u, reduction="mean")

    each = jnp.stack([loss(logits[i], labels[i], weights[i]) for i in range(3)])
    np.testing.assert_allclose(jax.jit(jax.vmap(loss))(logits, labels, weights), each, rtol=1e-6)
    # One set of logits, a batch of weightings, and gradients through the vmap.
    fixed = jax.vmap(loss, in_axes=(None, None, 0))(logits[0], labels[0], weights)
    want = jnp.stack([loss(logits[0], labels[0], u) for u in weights])
    np.testing.assert_allclose(fixed, want, rtol=1e-6)
    grads = jax.vmap(jax.grad(loss, argnums=(0, 2)), in_axes=(None, None, 0))(
        logits[0], labels[0], weights
    )
    for i in range(3):
        want = jax.grad(loss, argnums=(0, 2))(logits[0], labels[0], weights[i])
        np.testing.assert_allclose(grads[0][i], want[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grads[1][i], want[1], rtol=1e-6, atol=1e-7)
