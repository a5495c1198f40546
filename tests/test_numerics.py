"""Issue 15's accuracy goals, asserted for every implementation against float64.

Logits are built with the label's logit 0 to 60 above the runner-up (the confident predictions of
a trained model, where ``1 - p_t`` is far below float32's epsilon) and the other logits spread
from flat to peaked, for V in {3, 1000, 32000}. The float64 reference (`numpy_reference`) forms
``1 - p`` at the max and every other quantity without cancellation, on the very values the
implementation sees (the logits rounded to their dtype, then widened).

Goals:

- float32: every gradient entry with ``|g| >= 1e-30`` within a relative 1e-5 of float64 at every
  margin, and the loss within 1e-6. With label smoothing or a z-loss, an entry is the difference
  ``c p_k - a_k`` of two terms of opposite sign that may cancel to any size: no float32
  computation can keep relative accuracy there (``a_k = e / V`` is itself rounded), so those
  entries are held to 1e-5 of the size of the terms, the error of the inputs' own rounding.
- bfloat16 and float16: the gradient is the float64 gradient rounded to the dtype, within one
  unit in the last place, and the float32 loss within 1e-6.
- The probability labels' gradient and the temperature's to 1e-5 too.

The fused linear loss is checked on the same logits, as ``I @ logits`` (``inputs`` the identity,
``weight`` the logits in the "dv" layout): the matmul is exact, and the weight's gradient is the
logits' gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from platforms import interpret

import jax_softmax_ce as sce

MARGINS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
SPREADS = (0.5, 1.0, 4.0)  # the other logits' standard deviation: flat to peaked
OPTIONS = {"plain": {}, "options": {"label_smoothing": 0.1, "z_loss": 1e-4}}
TINY = 1e-30  # float32 flushes subnormals on some backends; entries below are not judged


def pallas(schedule: str) -> sce.Pallas:
    return sce.Pallas(schedule=schedule, interpret=interpret(schedule))


IMPLEMENTATIONS = {
    "xla": "xla",
    "reference": "reference",
    "pallas-tpu": pallas("tpu"),
    "pallas-gpu": pallas("gpu"),
}


def confident_logits(num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return numpy_reference.confident_logits(num_classes, MARGINS, SPREADS, seed=seed)


def check(loss, grad, logits, labels, opts, dtype, *, soft_labels=None):
    """Asserts the goals for ``loss`` and ``grad`` (the logits gradient of the summed loss)."""
    exact = numpy_reference.cross_entropy(
        np.asarray(logits, np.float64),
        labels if soft_labels is None else soft_labels,
        integer=soft_labels is None,
        **opts,
    )
    assert loss.dtype == jnp.float32 and loss.shape == exact.loss.shape
    assert grad.dtype == dtype and grad.shape == exact.dlogits.shape
    loss, grad = np.asarray(loss, np.float64), np.asarray(grad.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(loss, exact.loss, rtol=1e-6, atol=0)
    if dtype != jnp.float32:
        assert numpy_reference.ulps(grad, exact.dlogits, dtype).max() <= 1
        return
    judged = np.abs(exact.dlogits) >= TINY
    if opts:  # a difference of two terms: relative to their size
        error = np.abs(grad - exact.dlogits) / exact.dlogits_terms
        assert error[judged].max() <= 1e-5
    else:
        np.testing.assert_allclose(grad[judged], exact.dlogits[judged], rtol=1e-5, atol=0)
    return exact


# The README's test command checks float32 and bfloat16 at the smallest and the largest
# vocabulary; float16 (whose range decides nothing that bfloat16 does not) and V = 1000 run with
# the slow tests (CI runs both).
SLOW = pytest.mark.slow
NUM_CLASSES = [3, pytest.param(1000, marks=SLOW), 32000]
DTYPES = [jnp.float32, jnp.bfloat16, pytest.param(jnp.float16, marks=SLOW)]


@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_logits_loss_keeps_relative_accuracy(name, opts, dtype, num_classes):
    if dtype == jnp.float16 and name == "pallas-tpu":
        pytest.skip("the TPU schedule refuses float16 (Mosaic has no float16 math)")
    raw, labels = confident_logits(num_classes)
    logits = jnp.asarray(raw, dtype)

    def total(z):
        loss = sce.softmax_cross_entropy_with_integer_labels(
            z, labels, implementation=IMPLEMENTATIONS[name], **opts
        )
        return jnp.sum(loss), loss

    grad, loss = jax.grad(total, has_aux=True)(logits)
    check(loss, grad, logits.astype(jnp.float32), labels, opts, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_fused_loss_keeps_relative_accuracy(name, opts, dtype):
    if dtype == jnp.float16 and name == "pallas-tpu":
        pytest.skip("the TPU schedule refuses float16 (Mosaic has no float16 math)")
    raw, labels = confident_logits(1000, seed=1)
    weight = jnp.asarray(raw, dtype)  # [D = N, V]
    inputs = jnp.eye(raw.shape[0], dtype=dtype)

    def total(w):
        loss = sce.linear_softmax_cross_entropy(
            inputs, w, labels, implementation=IMPLEMENTATIONS[name], **opts
        )
        return jnp.sum(loss), loss

    grad, loss = jax.grad(total, has_aux=True)(weight)
    check(loss, grad, weight.astype(jnp.float32), labels, opts, dtype)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_label_and_temperature_gradients_keep_relative_accuracy(name):
    """Probability labels (one-hot with a little mass elsewhere) on confident logits: the
    logits', the labels' and an array temperature's gradients."""
    raw, labels = confident_logits(1000, seed=2)
    soft = np.full(raw.shape, 1e-6 / (raw.shape[1] - 1))
    soft[np.arange(raw.shape[0]), labels] = 1.0 - 1e-6
    logits = jnp.asarray(raw, jnp.float32)
    temperature = 1.5

    def total(z, y, t):
        loss = sce.softmax_cross_entropy(z, y, temperature=t, implementation=IMPLEMENTATIONS[name])
        return jnp.sum(loss), loss

    (grad, dlabels, dtemperature), loss = jax.grad(total, argnums=(0, 1, 2), has_aux=True)(
        logits, jnp.asarray(soft, jnp.float32), jnp.float32(temperature)
    )
    exact = numpy_reference.cross_entropy(
        np.asarray(logits, np.float64),
        np.asarray(jnp.asarray(soft, jnp.float32), np.float64),
        integer=False,
        temperature=temperature,
    )
    np.testing.assert_allclose(np.asarray(loss, np.float64), exact.loss, rtol=1e-6)
    # The target's entry is (1 - p_t) - 1e-6 here: a difference of terms, judged relative to them.
    error = np.abs(np.asarray(grad, np.float64) - exact.dlogits) / exact.dlogits_terms
    assert error[np.abs(exact.dlogits) >= TINY].max() <= 1e-5
    np.testing.assert_allclose(np.asarray(dlabels, np.float64), exact.dlabels, rtol=1e-5)
    np.testing.assert_allclose(float(dtemperature), exact.dtemperature, rtol=1e-5)


def test_the_check_fails_where_optax_loses_the_target_entry():
    """The goals are not vacuous: optax's gradient, ``softmax - onehot`` from one float32
    ``lse``, fails the float32 check from margin 20 on, where ``p_t`` rounds to 1."""
    optax = pytest.importorskip("optax")
    raw, labels = confident_logits(1000)
    logits = jnp.asarray(raw, jnp.float32)
    total = lambda z: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, labels))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    with pytest.raises(AssertionError):
        check(loss, jax.grad(total)(logits), logits, labels, {}, jnp.float32)


def test_ulps_counts_representable_values():
    one = np.float64(1.0)
    step = np.spacing(np.float16(1.0)).astype(np.float64)
    got = np.array([one, one + step, -one, 0.0, -0.0])
    exact = np.array([one, one, -one - step, -0.0, 2**-30])  # 2**-30 rounds to 0 in float16
    np.testing.assert_array_equal(numpy_reference.ulps(got, exact, np.float16), [0, 1, 1, 0, 0])


@pytest.mark.parametrize("exact_label", [True, False], ids=["z_label", "in_the_sum"])
def test_mass_besides_the_label_at_the_max(exact_label):
    """`_tile.lse_besides_label`, in both of its forms (the label's term added per row from
    ``z_label``, or kept in the sum): ``r = sum_k exp(z_k - max) - 1`` against float64, to
    float32's relative accuracy where the label is the max of a confident row (``r`` near 1e-26
    there), and for labels below the max, tied at the max with another class, outside
    ``[0, V)`` (-1 and V) and at a masked (-inf) class."""
    from jax_softmax_ce.kernels import _tile

    rng = np.random.default_rng(5)
    v = 300
    z = rng.normal(size=(7, v)) * 2
    labels = np.array([7, 7, 7, -1, v, 9, 7])
    z[0, 7] = z[0].max() + 60.0  # confident, the label at the max
    z[1, 7] = z[1].max() + 3.0
    z[2, 7] = z[2].min() - 1.0  # the label far below the max
    z[5, 9] = -np.inf  # a masked class
    z[6, 7] = z[6, 20] = z[6].max() + 1.0  # the label tied at the max: r holds the other's 1
    z32 = z.astype(np.float32)
    z64 = z32.astype(np.float64)
    m = z64.max(1, keepdims=True)
    e = np.exp(z64 - m)
    want = e.sum(1) - 1.0  # cancels only where the label is at the max; formed apart there
    want[:2] = np.delete(e[:2], 7, axis=1).sum(1)
    picked = z32[np.arange(7), np.clip(labels, 0, v - 1)][:, None]
    lse, ref = _tile.lse_besides_label(
        jnp.asarray(z32),
        jnp.asarray(z32.max(1, keepdims=True)),
        jnp.asarray(labels[:, None], jnp.int32),
        jnp.asarray(picked) if exact_label else None,
    )
    np.testing.assert_array_equal(ref, z32.max(1, keepdims=True))
    np.testing.assert_allclose(np.asarray(lse.r)[:, 0], want, rtol=2e-6)
    assert 0 < want[0] < 1e-25
