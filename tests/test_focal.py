"""softmax_focal_loss against a float64 NumPy reference (values, and gradients by central
differences), against our cross-entropy at gamma=0 (bit for bit) and optax: labels of both kinds,
alpha, where, ignore_index, reductions, p_t -> 1, large logits, dtypes, errors, transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special

import jax_softmax_ce as sce


def focal_reference(z, labels, gamma, alpha=None, where=None, ignore_index=None):
    """Per-example losses, float64, written directly from the formula."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return _focal_reference(z, labels, gamma, alpha, where, ignore_index)


def _focal_reference(z, labels, gamma, alpha, where, ignore_index):
    z = np.asarray(z, np.float64)
    v = z.shape[-1]
    valid = np.ones_like(z, bool) if where is None else np.broadcast_to(where, z.shape)
    zm = np.where(valid, z, -np.inf)
    log_p = special.log_softmax(zm, axis=-1)
    p = np.exp(log_p)
    a = np.ones(v) if alpha is None else np.asarray(alpha, np.float64)
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        y = np.eye(v)[np.clip(labels, 0, v - 1)]
    else:
        y = np.where(valid, labels, 0)
    terms = np.where(y * a != 0, -a * y * (1 - p) ** gamma * np.where(y != 0, log_p, 0), 0)
    loss = terms.sum(-1)
    if ignore_index is not None:
        loss = np.where(labels == ignore_index, 0, loss)
    return np.where(valid.any(-1), loss, 0)


def numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def data(n=6, v=7, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((n, v))
    return z, rng.integers(0, v, n), rng.dirichlet(np.ones(v), n)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
@pytest.mark.parametrize("integer", [True, False])
def test_matches_reference(gamma, integer):
    z, t, y = data()
    labels = t if integer else y
    alpha = np.linspace(0.25, 1.0, 7)
    out = sce.softmax_focal_loss(z, labels, gamma=gamma, alpha=alpha)
    assert out.shape == (6,) and out.dtype == jnp.float64
    np.testing.assert_allclose(out, focal_reference(z, labels, gamma, alpha), rtol=1e-12)
    grad = jax.grad(lambda z: jnp.sum(sce.softmax_focal_loss(z, labels, gamma=gamma, alpha=alpha)))(
        z
    )
    expected = numeric_grad(lambda z: focal_reference(z, labels, gamma, alpha).sum(), z)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)
    if not integer:
        d_labels = jax.grad(lambda y: jnp.sum(sce.softmax_focal_loss(z, y, gamma=gamma)))(y)
        p = special.softmax(z, axis=-1)
        np.testing.assert_allclose(d_labels, -((1 - p) ** gamma) * np.log(p), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("integer", [True, False])
def test_gamma_zero_is_our_cross_entropy_exactly(integer, reduction):
    z, t, y = data(seed=1)
    where = np.random.default_rng(2).uniform(size=z.shape) > 0.2
    alpha = np.linspace(0.5, 2.0, 7)
    if integer:
        labels = np.where(np.arange(6) == 2, -100, t)
        kw = {"ignore_index": -100}
        ce = sce.softmax_cross_entropy_with_integer_labels
    else:
        labels, kw, ce = y, {}, sce.softmax_cross_entropy
    out = sce.softmax_focal_loss(
        z, labels, gamma=0.0, alpha=alpha, where=where, reduction=reduction, **kw
    )
    expected = ce(z, labels, where=where, class_weights=alpha, reduction=reduction, **kw)
    np.testing.assert_array_equal(out, expected)
    plain = sce.softmax_focal_loss(jnp.asarray(z, jnp.float32), t, gamma=0)
    theirs = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(z, jnp.float32), t)
    np.testing.assert_allclose(plain, theirs, rtol=1e-6)


def test_small_gamma_tends_to_cross_entropy():
    z, t, _ = data(seed=3)
    near = sce.softmax_focal_loss(z, t, gamma=1e-9)
    np.testing.assert_allclose(near, sce.softmax_cross_entropy_with_integer_labels(z, t), rtol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_where_ignore_index_and_reductions(reduction):
    z, t, _ = data(seed=4)
    t = np.minimum(t, 5)  # class 6 is masked below, except in row 5
    t[5] = 6
    t[1] = -100
    t[3] = 7  # out of range: NaN, as in optax
    t[2] = -1  # also out of range, and it must not wrap around to alpha[-1]
    where = np.ones(z.shape, bool)
    where[4] = False  # a fully masked example counts as nothing
    where[:, 6] = False
    where[5, 6] = True
    alpha = np.linspace(0.5, 2.0, 7)
    kw = dict(gamma=2.0, alpha=alpha, where=where, ignore_index=-100)
    per_example = sce.softmax_focal_loss(z, t, **kw)
    assert np.isnan(per_example[3]) and np.isnan(per_example[2])
    t[2] = 2
    per_example = sce.softmax_focal_loss(z, t, **kw)
    masked_label = sce.softmax_focal_loss(z, np.array([6, 0, 0, 0, 0, 0]), **kw)
    assert masked_label[0] == np.inf  # a label on a masked class: a class with logit -inf
    keep = np.array([0, 1, 2, 4, 5])
    expected = focal_reference(z, t, 2.0, alpha, where, ignore_index=-100)
    np.testing.assert_allclose(per_example[keep], expected[keep], rtol=1e-12)
    assert per_example[1] == 0 and per_example[4] == 0
    t[3] = 0
    out = sce.softmax_focal_loss(z, t, reduction=reduction, **kw)
    expected = focal_reference(z, t, 2.0, alpha, where, ignore_index=-100)
    counted = (t != -100) & where.any(-1)
    if reduction == "sum":
        expected = expected.sum()
    elif reduction == "mean":  # PyTorch's weighted mean, as the cross-entropy with class_weights
        expected = expected.sum() / alpha[t[counted]].sum()
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    grad = jax.grad(lambda z: jnp.sum(sce.softmax_focal_loss(z, t, reduction=reduction, **kw)))(z)
    assert np.all(np.isfinite(grad)) and np.all(grad[1] == 0) and np.all(grad[4] == 0)
    assert np.all(grad[:5, 6] == 0)


@pytest.mark.parametrize(
    "dtype, gamma", [(jnp.float32, 0.5), (jnp.float32, 5.0), (jnp.float64, 2.0)]
)
def test_confident_and_large_logits(dtype, gamma):
    # p_t -> 1 (the other classes underflow or nearly), p_t -> 0, and logits of magnitude 1e4.
    z = np.array(
        [[50.0, 0.0, 0.0], [1e4, 0.0, -1e4], [0.0, 1e4, 0.0], [30.0, 29.0, -5.0], [1e4, 1e4, 0.0]]
    )
    t = np.array([0, 0, 0, 0, 1])
    zd = jnp.asarray(z, dtype)
    out = jax.jit(lambda z: sce.softmax_focal_loss(z, t, gamma=gamma))(zd)
    assert out.dtype == dtype
    expected = focal_reference(z, t, gamma)
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == jnp.float32 else 1e-12)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(sce.softmax_focal_loss(z, t, gamma=gamma))))(zd)
    assert grad.dtype == dtype and np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[1], 0, atol=0)
    np.testing.assert_allclose(grad[2], [-1.0, 1.0, 0.0], atol=1e-6)  # p_t = 0: the CE gradient
    # Row 3: moderate logits, check against central differences of the float64 reference.
    numeric = numeric_grad(lambda r: focal_reference(r[None], t[3:4], gamma).sum(), z[3])
    np.testing.assert_allclose(grad[3], numeric, rtol=1e-4, atol=1e-6)
    hess = jax.jit(jax.hessian(lambda r: sce.softmax_focal_loss(r, 0, gamma=gamma)))(zd[0])
    assert np.all(np.isfinite(hess))


def test_half_precision():
    z, t, _ = data(seed=5)
    zb = jnp.asarray(z, jnp.bfloat16)
    out = sce.softmax_focal_loss(zb, t)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, focal_reference(np.asarray(zb, np.float64), t, 2.0), rtol=1e-5)
    assert jax.grad(lambda z: jnp.sum(sce.softmax_focal_loss(z, t)))(zb).dtype == jnp.bfloat16


def test_axis_and_transformations():
    z, t, _ = data(n=12, seed=6)
    zz, tt = z.reshape(3, 4, 7), t.reshape(3, 4)
    moved = sce.softmax_focal_loss(np.moveaxis(zz, -1, 1), tt, axis=1)
    np.testing.assert_allclose(moved, focal_reference(z, t, 2.0).reshape(3, 4), rtol=1e-12)

    def mean_loss(z, t):
        return sce.softmax_focal_loss(z, t, gamma=3.0, reduction="mean")

    batched = jax.jit(jax.vmap(mean_loss))(zz, tt)
    np.testing.assert_allclose(
        batched, focal_reference(z, t, 3.0).reshape(3, 4).mean(1), rtol=1e-12
    )
    grad = jax.jit(jax.grad(lambda z: jnp.sum(jax.vmap(mean_loss)(z, tt))))(zz)
    expected = numeric_grad(lambda z: focal_reference(z, t, 3.0).sum() / 4, z)
    np.testing.assert_allclose(grad.reshape(12, 7), expected, rtol=1e-6, atol=1e-8)


def test_errors():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"alpha shape \(2,\) must be \[3\]"):
        sce.softmax_focal_loss(z, jnp.array([0, 1]), alpha=jnp.ones(2))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sce.softmax_focal_loss(z, jnp.array([0, 1]), gamma=-1.0)
    with pytest.raises(ValueError, match="ignore_index applies to integer labels only"):
        sce.softmax_focal_loss(z, z, ignore_index=-100)
    with pytest.raises(TypeError, match="logits must be floating"):
        sce.softmax_focal_loss(jnp.zeros((2, 3), jnp.int32), jnp.array([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        sce.softmax_focal_loss(z, jnp.array([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match=r"labels shape \(3,\)"):
        sce.softmax_focal_loss(z, jnp.array([0, 1, 2]))
