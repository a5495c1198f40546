"""kl_divergence and kl_divergence_with_log_targets against SciPy float64 references and optax
(including optax's own test classes, run against our functions): values, gradients, masks, axes,
infinities, dtypes, errors and transformations."""

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
    kl_divergence=sce.kl_divergence,
    kl_divergence_with_log_targets=sce.kl_divergence_with_log_targets,
)


class TestOptaxKLDivergence(_AgainstOurs, optax_tests.KLDivergenceTest):
    pass


class TestOptaxKLDivergenceWithLogTargets(_AgainstOurs, optax_tests.KLDivergenceWithLogTargetsTest):
    pass


def distributions(shape, seed=0):
    rng = np.random.default_rng(seed)
    log_p = special.log_softmax(2.0 * rng.standard_normal(shape), axis=-1)
    q = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    return log_p, q


def kl_reference(log_p, q, where=None):
    terms = special.rel_entr(q, np.exp(log_p))  # q log(q / p), 0 where q = 0
    terms = np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - log_p), terms)
    if where is not None:
        terms = np.where(where, terms, 0)
    return terms.sum(-1)


@pytest.mark.parametrize("log_targets", [False, True])
def test_matches_scipy_and_optax(log_targets):
    log_p, q = distributions((4, 3, 7))
    q[0, 0, :3] = 0.0
    q[0, 0] /= q[0, 0].sum()
    with np.errstate(divide="ignore"):
        log_q = np.log(q)
    if log_targets:
        f, theirs, targets = (
            sce.kl_divergence_with_log_targets,
            optax.losses.kl_divergence_with_log_targets,
            log_q,
        )
    else:
        f, theirs, targets = sce.kl_divergence, optax.kl_divergence, q
    out = f(log_p, targets)
    assert out.shape == (4, 3) and out.dtype == jnp.float64
    np.testing.assert_allclose(out, kl_reference(log_p, q), rtol=1e-12, atol=1e-15)
    if not log_targets:  # optax gives NaN at log q = -inf
        np.testing.assert_allclose(out, theirs(log_p, targets), rtol=1e-12, atol=1e-15)
    d_log_p, d_targets = jax.grad(lambda a, b: jnp.sum(f(a, b)), argnums=(0, 1))(log_p, targets)
    np.testing.assert_allclose(d_log_p, -q, rtol=1e-12, atol=1e-15)
    if log_targets:  # d/d(log q) of e^{log q} (log q - log p) = q (log q - log p + 1)
        safe = np.where(q > 0, np.log(np.where(q > 0, q, 1)), 0)
        expected = np.where(q > 0, q * (safe - log_p + 1), 0)
    else:  # d/dq of q log q - q log p = log q + 1 - log p, and -log p at q = 0
        expected = np.where(q > 0, np.log(np.where(q > 0, q, 1)) + 1 - log_p, -log_p)
    np.testing.assert_allclose(d_targets, expected, rtol=1e-12, atol=1e-14)


def test_empty_class_axis():
    out = sce.kl_divergence(jnp.zeros((3, 0)), jnp.zeros((3, 0)))
    np.testing.assert_array_equal(out, np.zeros(3))
    assert sce.kl_divergence_with_log_targets(jnp.zeros((0,)), jnp.zeros((0,))) == 0


def test_infinities():
    log_p = jnp.array([[-np.inf, 0.0], [-np.inf, 0.0]])
    q = jnp.array([[0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_array_equal(sce.kl_divergence(log_p, q), [0.0, np.inf])
    np.testing.assert_array_equal(
        sce.kl_divergence_with_log_targets(log_p, jnp.log(q)), [0.0, np.inf]
    )
    for f, t in [(sce.kl_divergence, q[:1]), (sce.kl_divergence_with_log_targets, jnp.log(q[:1]))]:
        grads = jax.grad(lambda a, b, f=f: jnp.sum(f(a, b)), argnums=(0, 1))(log_p[:1], t)
        assert all(np.all(np.isfinite(g)) for g in grads)
        np.testing.assert_array_equal(grads[0], [[0.0, -1.0]])


def test_where_axis_and_shapes():
    log_p, q = distributions((3, 5, 6), seed=1)
    mask = np.random.default_rng(2).uniform(size=(3, 5, 6)) > 0.4
    np.testing.assert_allclose(
        sce.kl_divergence(log_p, q, where=mask), kl_reference(log_p, q, mask)
    )
    rows = np.array([[True, False, True, True, False]] * 3)
    np.testing.assert_allclose(
        sce.kl_divergence(log_p, q, where=rows), np.where(rows, kl_reference(log_p, q), 0)
    )
    moved = sce.kl_divergence(np.moveaxis(log_p, -1, 0), np.moveaxis(q, -1, 0), axis=0)
    np.testing.assert_allclose(moved, kl_reference(log_p, q), rtol=1e-12)
    both = sce.kl_divergence(log_p, q, axis=(1, 2))
    np.testing.assert_allclose(both, kl_reference(log_p, q).sum(-1), rtol=1e-12)
    everything = sce.kl_divergence(log_p, q, axis=None)
    assert everything.shape == ()
    np.testing.assert_allclose(everything, kl_reference(log_p, q).sum(), rtol=1e-12)
    np.testing.assert_allclose(
        sce.kl_divergence(log_p, q[0, 0]), kl_reference(log_p, np.broadcast_to(q[0, 0], q.shape))
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes(dtype):
    log_p, q = distributions((4, 9), seed=3)
    lp, qd = jnp.asarray(log_p).astype(dtype), jnp.asarray(q).astype(dtype)
    out = sce.kl_divergence(lp, qd)
    assert out.dtype == jnp.float32
    expected = kl_reference(np.asarray(lp.astype(jnp.float64)), np.asarray(qd.astype(jnp.float64)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda a: jnp.sum(sce.kl_divergence_with_log_targets(a, jnp.log(qd))))(lp)
    assert grad.dtype == dtype


def test_errors():
    with pytest.raises(TypeError, match="log_predictions must be floating"):
        sce.kl_divergence(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
    with pytest.raises(TypeError, match="log_targets must be floating"):
        sce.kl_divergence_with_log_targets(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(
        ValueError, match=r"targets shape \(2, 4\) does not broadcast to log_predictions"
    ):
        sce.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(
        ValueError, match=r"where shape \(4,\) does not broadcast to log_predictions shape"
    ):
        sce.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), where=jnp.ones((4,), bool))
    with pytest.raises(ValueError, match="axis 2 is out of range for log_predictions"):
        sce.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), axis=2)


def test_empty_batch_and_nan_prediction_on_an_absent_class():
    """An empty batch gives an empty result, as optax's; a NaN prediction on a class the target
    does not have still makes the divergence NaN (the class's term is 0 only for numbers)."""
    for fn in (sce.kl_divergence, sce.kl_divergence_with_log_targets):
        out = fn(jnp.zeros((0, 3)), jnp.zeros((0, 3)))
        assert out.shape == optax.kl_divergence(jnp.zeros((0, 3)), jnp.zeros((0, 3))).shape
    log_p = jnp.array([[np.nan, 0.0], [-np.inf, 0.0]])
    out = sce.kl_divergence_with_log_targets(log_p, jnp.array([[-np.inf, 0.0]] * 2))
    assert np.isnan(out[0]) and out[1] == 0.0
    out = sce.kl_divergence(log_p, jnp.array([[0.0, 1.0]] * 2))
    assert np.isnan(out[0]) and out[1] == 0.0


def test_transformations():
    log_p, q = distributions((2, 3, 5), seed=4)
    f = jax.jit(jax.vmap(jax.vmap(sce.kl_divergence), in_axes=(1, 1)))
    np.testing.assert_allclose(f(log_p, q), kl_reference(log_p, q).T, rtol=1e-12)
    g = jax.jit(
        jax.grad(lambda a: jnp.sum(jax.vmap(sce.kl_divergence_with_log_targets)(a, np.log(q))))
    )
    np.testing.assert_allclose(g(log_p), -q, rtol=1e-12)
