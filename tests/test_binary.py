"""sigmoid_binary_cross_entropy and sigmoid_focal_loss against float64 NumPy/SciPy references and
optax (including optax's own test classes, run against our functions): values, gradients, dtypes,
shapes, large logits, options, errors and transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_port
import pytest
from optax.losses import _classification_test as optax_tests
from scipy import special

import jax_softmax_ce as sce

_AgainstOurs = optax_port.against_ours(
    sigmoid_binary_cross_entropy=sce.sigmoid_binary_cross_entropy,
    sigmoid_focal_loss=sce.sigmoid_focal_loss,
    kl_divergence=sce.kl_divergence,
    kl_divergence_with_log_targets=sce.kl_divergence_with_log_targets,
)


class TestOptaxSigmoidCrossEntropy(_AgainstOurs, optax_tests.SigmoidCrossEntropyTest):
    pass


class TestOptaxSigmoidFocalLoss(_AgainstOurs, optax_tests.SigmoidFocalLossTest):
    def setUp(self):
        super().setUp()
        # optax's test_scale multiplies its float32 `p` by float64 NumPy labels; under the strict
        # promotion of our conftest that line of the test itself (not our code) would raise.
        self.enter_context(jax.numpy_dtype_promotion("standard"))


# --- float64 references --------------------------------------------------------------------------


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


def bce_reference(x, y, pos_weight=None, label_smoothing=0.0, where=None):
    """Loss and d loss / d x per element, float64."""
    x, y = np.broadcast_arrays(f64(x), f64(y))
    y = (1 - label_smoothing) * y + 0.5 * label_smoothing
    w = np.ones_like(x) if pos_weight is None else np.broadcast_to(f64(pos_weight), x.shape)
    # -log sigmoid(x) = logaddexp(0, -x), exact for any magnitude.
    loss = w * y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
    grad = -w * y * special.expit(-x) + (1 - y) * special.expit(x)
    if where is not None:
        mask = np.broadcast_to(where, x.shape)
        loss, grad = np.where(mask, loss, 0), np.where(mask, grad, 0)
    return loss, grad


def reduce_reference(loss, where, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    count = loss.size if where is None else np.broadcast_to(where, loss.shape).sum()
    return loss.sum() / count if count else 0.0


def focal_reference(x, y, alpha=None, gamma=2.0):
    x, y = f64(x), f64(y)
    p = special.expit(x)
    p_t = y * p + (1 - y) * (1 - p)
    ce = y * np.logaddexp(0, -x) + (1 - y) * np.logaddexp(0, x)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def rng_data(shape, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal(shape), rng.uniform(size=shape)


# --- sigmoid_binary_cross_entropy -----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"pos_weight": np.array([3.0, 1.0, 0.5, 2.0, 1.0, 0.0, 4.0])},
        {"label_smoothing": 0.2},
        {"where": "mask"},
        {"pos_weight": np.array([3.0, 1.0, 0.5, 2.0, 1.0, 0.0, 4.0]), "label_smoothing": 0.1},
    ],
    ids=["plain", "pos_weight", "smoothing", "where", "pos_weight+smoothing"],
)
def test_bce_matches_reference(options, reduction):
    x, y = rng_data((5, 7))
    y[0] = (y[0] > 0.5).astype(float)
    options = dict(options)
    if options.get("where") == "mask":
        options["where"] = np.random.default_rng(1).uniform(size=(5, 7)) > 0.3
    where = options.get("where")
    loss_ref, grad_ref = bce_reference(x, y, **options)
    expected = reduce_reference(loss_ref, where, reduction)

    def f(x):
        return sce.sigmoid_binary_cross_entropy(x, y, reduction=reduction, **options)

    out = f(jnp.asarray(x))
    assert out.dtype == jnp.float64 and out.shape == np.shape(expected)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    grad = jax.grad(lambda x: jnp.sum(f(x)))(jnp.asarray(x))
    scale = {"none": 1.0, "sum": 1.0}.get(reduction)
    if scale is None:
        count = x.size if where is None else where.sum()
        scale = 1.0 / count
    np.testing.assert_allclose(grad, scale * grad_ref, rtol=1e-12, atol=1e-12)


def test_bce_matches_optax():
    x, y = rng_data((4, 6), seed=2)
    x32 = jnp.asarray(x, jnp.float32)
    ours = sce.sigmoid_binary_cross_entropy(x32, jnp.asarray(y, jnp.float32))
    theirs = optax.sigmoid_binary_cross_entropy(x32, jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert ours.dtype == jnp.float32


def test_bce_label_gradient():
    x, y = rng_data((3, 4), seed=3)
    w = np.array([2.0, 1.0, 0.5, 3.0])
    grad = jax.grad(lambda y: jnp.sum(sce.sigmoid_binary_cross_entropy(x, y, pos_weight=w)))(y)
    # d/dy [w y softplus(-x) + (1 - y) softplus(x)]
    np.testing.assert_allclose(grad, w * np.logaddexp(0, -x) - np.logaddexp(0, x), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16])
def test_bce_large_logits(dtype):
    x = np.array([1e4, -1e4, 3e4, -3e4, 60.0, -60.0, 0.0])
    if dtype == jnp.float16:
        x = np.clip(x, -6e4, 6e4)
    y = np.array([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 0.5])
    xd = jnp.asarray(x).astype(dtype)
    loss_ref, grad_ref = bce_reference(xd, y)
    out = sce.sigmoid_binary_cross_entropy(xd, y.astype(np.float32))
    assert out.dtype == (jnp.float64 if dtype == jnp.float64 else jnp.float32)
    np.testing.assert_allclose(f64(out), loss_ref, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(sce.sigmoid_binary_cross_entropy(x, y.astype(np.float32))))(
        xd
    )
    assert grad.dtype == dtype
    tol = 1e-2 if dtype in (jnp.bfloat16, jnp.float16) else 1e-6
    np.testing.assert_allclose(f64(grad), grad_ref, rtol=tol, atol=tol)


def test_bce_infinite_logits():
    x = jnp.array([-np.inf, np.inf, -np.inf, np.inf, np.nan])
    y = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0])
    out = sce.sigmoid_binary_cross_entropy(x, y)
    np.testing.assert_array_equal(out[:4], [0.0, 0.0, np.inf, np.inf])
    assert np.isnan(out[4])
    grad = jax.grad(lambda x: jnp.sum(sce.sigmoid_binary_cross_entropy(x, y)[:2]))(x)
    np.testing.assert_array_equal(grad[:2], [0.0, 0.0])


def test_bce_where_excludes_nan_and_counts_mean():
    x = jnp.array([[0.5, np.nan], [-1.0, 2.0]])
    y = jnp.array([[1.0, 1.0], [0.0, 1.0]])
    where = jnp.array([[True, False], [True, True]])
    out = sce.sigmoid_binary_cross_entropy(x, y, where=where, reduction="mean")
    loss_ref, _ = bce_reference(np.nan_to_num(np.asarray(x)), y, where=np.asarray(where))
    np.testing.assert_allclose(out, loss_ref.sum() / 3, rtol=1e-12)
    grad = jax.grad(lambda x: sce.sigmoid_binary_cross_entropy(x, y, where=where, reduction="sum"))(
        x
    )
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0
    nothing = sce.sigmoid_binary_cross_entropy(
        x, y, where=jnp.zeros((2, 2), bool), reduction="mean"
    )
    assert nothing == 0


def test_bce_broadcasting_shapes():
    x = jnp.zeros((4, 1))
    y = jnp.ones((3,))
    assert sce.sigmoid_binary_cross_entropy(x, y).shape == (4, 3)
    out = sce.sigmoid_binary_cross_entropy(
        jnp.zeros((2, 3)), 1.0, pos_weight=jnp.array([1.0, 2, 3])
    )
    np.testing.assert_allclose(out, np.broadcast_to(np.log(2) * np.array([1.0, 2, 3]), (2, 3)))


def test_bce_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match="logits must be floating"):
        sce.sigmoid_binary_cross_entropy(jnp.zeros((2, 3), jnp.int32), x)
    with pytest.raises(ValueError, match=r"labels shape \(4,\)"):
        sce.sigmoid_binary_cross_entropy(x, jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"pos_weight shape \(2,\)"):
        sce.sigmoid_binary_cross_entropy(x, x, pos_weight=jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"where shape \(2, 2\)"):
        sce.sigmoid_binary_cross_entropy(x, x, where=jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match="label_smoothing"):
        sce.sigmoid_binary_cross_entropy(x, x, label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction"):
        sce.sigmoid_binary_cross_entropy(x, x, reduction="avg")


def test_bce_transformations():
    x, y = rng_data((3, 4, 5), seed=4)
    w = np.linspace(0.5, 2.0, 5)

    def f(x, y):
        return sce.sigmoid_binary_cross_entropy(x, y, pos_weight=w, reduction="mean")

    expected = np.array(
        [
            reduce_reference(bce_reference(a, b, w)[0], None, "mean")
            for a, b in zip(x, y, strict=True)
        ]
    )
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, y), expected, rtol=1e-12)
    np.testing.assert_allclose(
        jax.vmap(f, in_axes=(1, 1))(x, y),
        [reduce_reference(bce_reference(x[:, i], y[:, i], w)[0], None, "mean") for i in range(4)],
        rtol=1e-12,
    )
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(f)(x, y))))(x)
    np.testing.assert_allclose(grad, bce_reference(x, y, w)[1] / 20, rtol=1e-12)
    # Plain autodiff: forward mode works, and the Hessian is diagonal with sigma(x)(1 - sigma(x))
    # scaled by (w y + 1 - y).
    x1, y1 = x[0, 0], y[0, 0]
    hess = jax.hessian(lambda x: jnp.sum(sce.sigmoid_binary_cross_entropy(x, y1, pos_weight=w)))(x1)
    s = special.expit(x1)
    np.testing.assert_allclose(np.diag(hess), (w * y1 + 1 - y1) * s * (1 - s), rtol=1e-10)


# --- sigmoid_focal_loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, alpha", [(0.0, None), (0.5, 0.25), (2.0, None), (5.0, 0.25)])
def test_focal_matches_reference_and_optax(gamma, alpha):
    x, y = rng_data((6, 5), seed=5)
    y[:3] = np.round(y[:3])
    out = sce.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(out, focal_reference(x, y, alpha, gamma), rtol=1e-10, atol=1e-14)
    theirs = optax.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(out, theirs, rtol=1e-10, atol=1e-14)
    grad = jax.grad(lambda x: jnp.sum(sce.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)))(x)
    h = 1e-6
    numeric = (
        focal_reference(x + h, y, alpha, gamma) - focal_reference(x - h, y, alpha, gamma)
    ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_focal_large_logits(gamma):
    x = jnp.array([1e4, -1e4, 80.0, -80.0, 1e4, -1e4], jnp.float32)
    y = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], jnp.float32)
    out = sce.sigmoid_focal_loss(x, y, gamma=gamma)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, focal_reference(x, y, None, gamma), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(sce.sigmoid_focal_loss(x, y, gamma=gamma))))(x)
    hess = jax.jit(jax.hessian(lambda x: jnp.sum(sce.sigmoid_focal_loss(x, y, gamma=gamma))))(x)
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))
    np.testing.assert_allclose(grad[4:], [1.0, -1.0], rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_infinite_logits(gamma):
    """At +-inf the loss is 0 on the side of the label and +inf on the other, and the gradient
    is the binary cross-entropy's (0 and +-1), the limit of the finite case; gamma=0 is the
    binary cross-entropy exactly, also there."""
    x = jnp.array([np.inf, -np.inf, np.inf, -np.inf, np.nan])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0])
    out = sce.sigmoid_focal_loss(x, y, gamma=gamma)
    np.testing.assert_array_equal(out[:4], [0.0, 0.0, np.inf, np.inf])
    assert np.isnan(out[4])
    grad = jax.grad(lambda x: jnp.sum(sce.sigmoid_focal_loss(x, y, gamma=gamma)[:4]))(x)
    np.testing.assert_array_equal(grad[:4], [0.0, 0.0, 1.0, -1.0])


def test_focal_errors():
    x, y = jnp.zeros((2, 4)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"alpha shape \(3,\) does not broadcast"):
        sce.sigmoid_focal_loss(x, y, alpha=jnp.ones(3) / 2)
    with pytest.raises(ValueError, match=r"alpha shape \(2, 1, 4\) does not broadcast"):
        sce.sigmoid_focal_loss(x, y, alpha=jnp.ones((2, 1, 4)) / 2)  # it would widen the loss
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not broadcast"):
        sce.sigmoid_focal_loss(x, jnp.ones(3))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sce.sigmoid_focal_loss(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        sce.sigmoid_focal_loss(x, y, alpha=2.0)
    with pytest.raises(TypeError, match="logits"):
        sce.sigmoid_focal_loss(jnp.zeros((2, 4), jnp.int32), y)
    # An array alpha of the class axis broadcasts, as in optax.
    per_class = sce.sigmoid_focal_loss(x, y, alpha=jnp.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(
        per_class[0], np.array([0.1, 0.2, 0.3, 0.4]) * focal_reference(0.0, 1.0)
    )


def test_focal_transformations_and_dtype():
    x, y = rng_data((3, 4), seed=6)
    f = jax.jit(jax.vmap(lambda x, y: sce.sigmoid_focal_loss(x, y, alpha=0.3, gamma=1.5)))
    np.testing.assert_allclose(f(x, y), focal_reference(x, y, 0.3, 1.5), rtol=1e-10)
    xb = jnp.asarray(x, jnp.bfloat16)
    out = sce.sigmoid_focal_loss(xb, y)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, focal_reference(xb, y), rtol=1e-5, atol=1e-7)
    assert jax.grad(lambda x: jnp.sum(sce.sigmoid_focal_loss(x, y)))(xb).dtype == jnp.bfloat16
