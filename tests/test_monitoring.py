"""batch_metrics against a float64 NumPy reference, on `CrossEntropyAux` values built in NumPy
from logits (ignored, fully masked and zero-weight examples, weights, scalar and per-example
losses, jit and vmap, dtypes, errors); TensorBoard event files written with tensorboardX and read
back; and the README's logging example, run as it is written."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

import jax_softmax_ce as sce

NAMES = ["loss", "accuracy", "confidence", "entropy", "lse", "ece", "count"]


def numpy_aux(logits, valid=None, counted=None):
    """``(lse, argmax, max_prob, entropy)`` of each row of float64 ``logits`` ``[..., V]`` over
    the ``valid`` classes, with argmax -1 and zeros where ``counted`` is False or no class is
    valid."""
    z = np.asarray(logits, np.float64)
    valid = np.ones(z.shape, bool) if valid is None else np.broadcast_to(valid, z.shape)
    counted = np.ones(z.shape[:-1], bool) if counted is None else np.asarray(counted)
    counted = counted & valid.any(-1)
    z = np.where(valid, z, -np.inf)
    m = np.where(valid.any(-1), z.max(-1), 0)
    with np.errstate(all="ignore"):  # rows without a valid class, zeroed below
        lse = m + np.log(np.sum(np.exp(z - m[..., None]), -1))
        logp = z - lse[..., None]
        p = np.exp(logp)
        entropy = -np.sum(np.where(p > 0, p * logp, 0), -1)
    zeros = lambda x: np.where(counted, x, 0)
    argmax = np.where(counted, np.argmax(z, -1), -1)
    return zeros(lse), argmax, zeros(np.exp(-(lse - m))), zeros(entropy)


def make_aux(lse, argmax, max_prob, entropy, dtype=jnp.float32):
    return sce.CrossEntropyAux(
        lse=jnp.asarray(lse, dtype),
        argmax=jnp.asarray(argmax, jnp.int32),
        max_prob=jnp.asarray(max_prob, dtype),
        entropy=jnp.asarray(entropy, dtype),
        target_logprob=None,
    )


def reference_metrics(loss, aux, labels, weights=None, num_bins=15):
    """The metrics in float64, one example at a time; the ECE from an explicit loop over bins."""
    lse, _, max_prob, entropy = (np.asarray(x, np.float64).ravel() for x in aux[:4])
    argmax = np.asarray(aux[1]).ravel()
    labels = np.asarray(labels).ravel()
    u = np.ones(np.shape(aux[1])) if weights is None else np.asarray(weights, np.float64)
    u = np.broadcast_to(u, np.shape(aux[1])).ravel()
    keep = (argmax != -1) & (u != 0)
    u, total = u[keep], u[keep].sum()

    def mean(x):
        return float(np.sum(u * np.asarray(x)[keep]) / total) if total > 0 else 0.0

    correct = (argmax == labels).astype(np.float64)
    loss = np.asarray(loss, np.float64)
    ece = 0.0
    for b in range(num_bins):
        low, high = b / num_bins, (b + 1) / num_bins
        conf = max_prob[keep]
        in_bin = (conf > low) & (conf <= high) if b else conf <= high
        weight = u[in_bin].sum()
        if weight > 0:
            gap = abs(np.sum(u[in_bin] * correct[keep][in_bin]) - np.sum(u[in_bin] * conf[in_bin]))
            ece += gap / total
    return {
        "loss": float(loss) if loss.ndim == 0 else mean(loss.ravel()),
        "accuracy": mean(correct),
        "confidence": mean(max_prob),
        "entropy": mean(entropy),
        "lse": mean(lse),
        "ece": ece,
        "count": float(total),
    }


def assert_metrics(got, expected, rtol=1e-6):
    assert sorted(got) == sorted(NAMES)  # jit returns a dict with sorted keys
    for name in NAMES:
        np.testing.assert_allclose(
            float(got[name]), expected[name], rtol=rtol, atol=1e-7, err_msg=name
        )


def batch(seed=0, shape=(37,), num_classes=11, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(*shape, num_classes))
    labels = rng.integers(0, num_classes, size=shape)
    return logits, labels


def per_example_loss(logits, labels, aux):
    """``lse - z_t``, 0 for the examples that ``aux`` does not count."""
    lse, argmax = aux[0], aux[1]
    labels = np.clip(labels, 0, np.shape(logits)[-1] - 1)
    z_t = np.take_along_axis(np.asarray(logits), labels[..., None], -1)[..., 0]
    return np.where(np.asarray(argmax) != -1, np.asarray(lse) - z_t, 0)


@pytest.mark.parametrize("shape", [(37,), (4, 9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_against_reference_with_ignored_and_masked_examples(shape, dtype):
    logits, labels = batch(shape=shape)
    rng = np.random.default_rng(1)
    ignored = rng.random(shape) < 0.2
    labels = np.where(ignored, -100, labels)
    valid = rng.random(logits.shape) < 0.8  # a class mask, and one fully masked example
    valid[(0,) * len(shape)] = False
    aux = numpy_aux(logits, valid, counted=~ignored)
    assert np.sum(aux[1] == -1) > np.sum(ignored)
    loss = np.where(aux[1] != -1, rng.exponential(size=shape), 0)
    got = sce.batch_metrics(jnp.asarray(loss, dtype), make_aux(*aux, dtype), labels)
    assert all(value.dtype == dtype and value.shape == () for value in got.values())
    assert_metrics(
        got, reference_metrics(loss, aux, labels), rtol=1e-5 if dtype == jnp.float32 else 1e-12
    )
    assert float(got["count"]) == np.sum(aux[1] != -1)


def test_scalar_loss_is_reported_as_it_is():
    logits, labels = batch()
    aux = make_aux(*numpy_aux(logits))
    got = sce.batch_metrics(jnp.float32(1.25), aux, labels)
    assert float(got["loss"]) == 1.25
    assert_metrics(got, reference_metrics(1.25, aux, labels))


@pytest.mark.parametrize(
    "weights",
    [
        np.random.default_rng(2).random(37),
        np.where(np.arange(37) % 3 == 0, 0.0, 2.5),
        np.float64(0.5),  # a scalar broadcasts and cancels in every mean but "count"
    ],
    ids=["random", "zeros", "scalar"],
)
def test_weights(weights):
    logits, labels = batch()
    aux = numpy_aux(logits)
    loss = per_example_loss(logits, labels, aux)
    got = sce.batch_metrics(loss, make_aux(*aux, jnp.float64), labels, weights=weights)
    assert_metrics(got, reference_metrics(loss, aux, labels, weights), rtol=1e-12)


def test_zero_weight_examples_holding_nan_contribute_nothing():
    logits, labels = batch()
    lse, argmax, max_prob, entropy = numpy_aux(logits)
    loss = per_example_loss(logits, labels, (lse, argmax))
    weights = np.ones(37)
    weights[:5] = 0
    for x in (lse, max_prob, entropy, loss):
        x[:5] = np.nan
    got = sce.batch_metrics(loss, make_aux(lse, argmax, max_prob, entropy), labels, weights=weights)
    assert all(np.isfinite(float(value)) for value in got.values())
    kept = slice(5, None)
    expected = reference_metrics(
        loss[kept], [x[kept] for x in (lse, argmax, max_prob, entropy)], labels[kept]
    )
    assert_metrics(got, expected, rtol=1e-5)


def test_nan_in_a_counted_example_reaches_its_metrics():
    logits, labels = batch()
    lse, argmax, max_prob, entropy = numpy_aux(logits)
    loss = per_example_loss(logits, labels, (lse, argmax))
    loss[3], entropy[3] = np.nan, np.nan
    got = sce.batch_metrics(loss, make_aux(lse, argmax, max_prob, entropy), labels)
    assert np.isnan(float(got["loss"])) and np.isnan(float(got["entropy"]))
    assert np.isfinite(float(got["accuracy"])) and np.isfinite(float(got["ece"]))


def test_nothing_counted_gives_zeros():
    logits, labels = batch(shape=(5,))
    aux = numpy_aux(logits, counted=np.zeros(5, bool))
    got = sce.batch_metrics(np.zeros(5), make_aux(*aux), labels)
    assert all(float(value) == 0 for value in got.values())
    got = sce.batch_metrics(jnp.ones(5), make_aux(*numpy_aux(logits)), labels, weights=0.0)
    assert all(float(value) == 0 for value in got.values())


@pytest.mark.parametrize("num_bins", [1, 4, 15])
def test_ece_is_expected_calibration_error_of_the_logits(num_bins):
    logits, labels = batch(seed=3, shape=(200,), scale=1.5)
    labels[::7] = -100
    aux = make_aux(*numpy_aux(logits, counted=labels != -100), jnp.float64)
    got = sce.batch_metrics(0.0, aux, labels, num_bins=num_bins)["ece"]
    expected = sce.expected_calibration_error(logits, labels, num_bins, ignore_index=-100)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Predictions that are always right with confidence 1/2 are miscalibrated by 1/2.
    half = make_aux(np.zeros(4), np.zeros(4, int), np.full(4, 0.5), np.zeros(4))
    np.testing.assert_allclose(sce.batch_metrics(0.0, half, np.zeros(4, int))["ece"], 0.5)


def test_jit_traces_once_and_vmap(compilations):
    logits, labels = batch(shape=(3, 37))
    aux = make_aux(*numpy_aux(logits))
    loss = jnp.asarray(per_example_loss(logits, labels, aux), jnp.float32)
    metrics = jax.jit(sce.batch_metrics, static_argnames="num_bins")
    got = metrics(loss[0], jax.tree.map(lambda x: x[0], aux), labels[0], num_bins=10)
    expected = sce.batch_metrics(loss[0], jax.tree.map(lambda x: x[0], aux), labels[0], num_bins=10)
    assert_metrics(got, {name: float(value) for name, value in expected.items()}, rtol=1e-6)
    before = compilations()
    metrics(loss[1], jax.tree.map(lambda x: x[1], aux), labels[1], num_bins=10)
    assert compilations() == before
    mapped = jax.vmap(sce.batch_metrics)(loss, aux, labels)
    for i in range(3):
        row = jax.tree.map(lambda x, i=i: x[i], aux)
        expected = reference_metrics(loss[i], row, labels[i])
        assert_metrics({name: mapped[name][i] for name in NAMES}, expected, rtol=1e-5)


def test_bad_input():
    logits, labels = batch(shape=(6,))
    aux = make_aux(*numpy_aux(logits))
    with pytest.raises(TypeError, match=r"labels must be integer class ids, got float64"):
        sce.batch_metrics(0.0, aux, labels.astype(np.float64))
    with pytest.raises(ValueError, match=r"labels shape \(5,\) is not the batch shape \(6,\)"):
        sce.batch_metrics(0.0, aux, labels[:5])
    with pytest.raises(ValueError, match=r"loss shape \(6, 1\) is neither a scalar nor"):
        sce.batch_metrics(np.zeros((6, 1)), aux, labels)
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not broadcast to .* \(6,\)"):
        sce.batch_metrics(0.0, aux, labels, weights=np.ones(3))
    for num_bins in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_bins must be a positive Python int"):
            sce.batch_metrics(0.0, aux, labels, num_bins=num_bins)


# --- TensorBoard event files ---------------------------------------------------------------------


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files under ``directory``: each
    record is a little-endian uint64 length, a uint32 CRC, the serialised ``Event`` and a CRC."""
    scalars = {}
    for path in sorted(pathlib.Path(directory).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_written_with_tensorboardx_read_back(tmp_path):
    logits, labels = batch()
    aux = make_aux(*numpy_aux(logits))
    step_metrics = jax.jit(sce.batch_metrics)
    logged = []
    with SummaryWriter(str(tmp_path)) as writer:
        for step in range(3):
            metrics = jax.device_get(step_metrics(jnp.float32(step), aux, labels))
            for name, value in metrics.items():
                writer.add_scalar(f"train/{name}", value, step)
            logged.append(metrics)
    scalars = read_scalars(tmp_path)
    assert sorted(scalars) == sorted(f"train/{name}" for name in NAMES)
    for name in NAMES:
        expected = [(step, np.float32(metrics[name])) for step, metrics in enumerate(logged)]
        assert scalars[f"train/{name}"] == expected


# --- The README's example ------------------------------------------------------------------------


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_logging_example(tmp_path, monkeypatch):
    """Runs the README's logging example as it is written (it needs ``return_aux=True``), then
    checks what it printed and wrote: at step 0, with zero parameters, every logit is 0, which
    gives the metrics in closed form; the accuracy then grows."""
    monkeypatch.chdir(tmp_path)
    code = readme_block("## Monitoring while training")
    namespace = {}
    printed = io.StringIO()
    # JAX's defaults, as a reader runs it (optax's Adam is not strict-promotion clean).
    with jax.numpy_dtype_promotion("standard"), jax.enable_x64(False):
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"step {step}" for step in range(0, 100, 20)]

    scalars = read_scalars(tmp_path / "runs")
    assert sorted(scalars) == sorted(f"train/{name}" for name in NAMES)
    for name in NAMES:
        assert [step for step, _ in scalars[f"train/{name}"]] == list(range(100))
        assert f"{name} {scalars[f'train/{name}'][0][1]:.4f}" in lines[0]
    labels = np.asarray(namespace["labels"])
    counted = labels != -100
    accuracy = np.mean(labels[counted] == 0)  # argmax of equal logits is class 0
    log10 = np.log(10.0)
    step0 = {"loss": log10, "accuracy": accuracy, "confidence": 0.1, "entropy": log10}
    step0 |= {"lse": log10, "ece": abs(accuracy - 0.1), "count": np.sum(counted)}
    for name, value in step0.items():
        np.testing.assert_allclose(scalars[f"train/{name}"][0][1], value, atol=1e-6, err_msg=name)
    assert scalars["train/accuracy"][-1][1] > 0.8
