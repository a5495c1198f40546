"""The Mosaic GPU probe of the benchmarks (`benchmarks.mosaic_gpu_probe`), off a GPU.

Its values and gradients run in Pallas' Mosaic GPU interpreter (jax >= 0.11) against a float64
NumPy formula, and both kernels lower for an H100 (on jax 0.10 and 0.11), which runs Mosaic
GPU's own layout, tiling and shared-memory checks. Only compiling and timing need the GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks import mosaic_gpu_probe as probe

# Ragged in both directions: 104 rows are one strip of 64 and one of 40; 576 columns are 9
# blocks of 64 (float32) and 4.5 blocks of 128 (bfloat16).
N, V = 104, 576
DTYPES = [jnp.float32, jnp.bfloat16]


def _problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3 * rng.normal(size=(N, V)), dtype)
    labels = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    cotangent = rng.normal(size=N)
    return logits, labels, cotangent


def _float64_loss_and_grad(logits, labels, cotangent):
    """Per-example ``lse - z_y`` and ``ct (softmax - onehot)``, in float64 from the rounded
    inputs."""
    z = np.asarray(logits.astype(jnp.float32), np.float64)
    y = np.asarray(labels)
    top = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(axis=1, keepdims=True)) + top
    onehot = np.arange(V)[None, :] == y[:, None]
    return (lse[:, 0] - z[np.arange(N), y]), cotangent[:, None] * (np.exp(z - lse) - onehot)


@pytest.mark.skipif(
    not hasattr(plgpu, "InterpretGPUParams"), reason="the Mosaic GPU interpreter needs jax >= 0.11"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("min_programs", [probe.MIN_PROGRAMS, 6])
def test_interpreted_values_and_gradients(dtype, min_programs, monkeypatch):
    # The default splits the vocabulary into one block per program. With 6 programs for 2 row
    # strips, each split takes several blocks; in bfloat16 (5 blocks, 3 splits of 2) the last
    # split runs a whole block past V.
    monkeypatch.setattr(probe, "MIN_PROGRAMS", min_programs)
    logits, labels, cotangent = _problem(dtype)
    loss_fn = functools.partial(probe.per_example, interpret=True)

    def weighted_sum(z):
        return jnp.sum(loss_fn(z, labels) * jnp.asarray(cotangent, jnp.float32))

    loss = jax.jit(loss_fn)(logits, labels)
    grad = jax.jit(jax.grad(weighted_sum))(logits)
    want_loss, want_grad = _float64_loss_and_grad(logits, labels, cotangent)
    assert loss.shape == (N,) and loss.dtype == jnp.float32
    assert grad.shape == (N, V) and grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-5, atol=1e-5)
    # A bfloat16 gradient is rounded once, to 8 bits: half an ulp of values below |ct|.
    atol = 1e-6 if dtype == jnp.float32 else np.abs(cotangent).max() * 2.0**-8
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_lowers_for_h100(dtype, lowering_target):
    logits, labels, _ = _problem(dtype)

    def mean_loss(z, y):
        return jnp.mean(probe.per_example(z, y))

    with lowering_target("gpu"):
        lowered = jax.jit(jax.value_and_grad(mean_loss)).trace(logits, labels)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2  # the forward and the backward kernel


@pytest.mark.parametrize("shape", [(N, V + 8), (N + 4, V)])
def test_untiled_shapes_raise(shape):
    logits = jnp.zeros(shape, jnp.float32)
    labels = jnp.zeros(shape[:1], jnp.int32)
    with pytest.raises(NotImplementedError, match=r"multiples of \(8, 32\).*\[N, V\]"):
        probe.per_example(logits, labels)
