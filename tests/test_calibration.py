"""inverse_frequency_weights against scikit-learn, expected_calibration_error and
reliability_diagram_data against a NumPy loop, fit_temperature against SciPy's scalar minimiser
on a float64 NLL (value and implicit gradient), and temperature scaling lowering the ECE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special
from sklearn.utils.class_weight import compute_class_weight

import jax_softmax_ce as sce

# --- inverse_frequency_weights -------------------------------------------------------------------


def test_weights_match_sklearn_and_zero_for_absent_classes():
    labels = np.random.default_rng(0).choice(
        [0, 1, 2, 4, 6], size=200, p=[0.5, 0.2, 0.15, 0.1, 0.05]
    )
    weights = sce.inverse_frequency_weights(labels, 7)
    assert weights.shape == (7,) and weights.dtype == jnp.float64
    present = np.unique(labels)
    np.testing.assert_array_equal(np.asarray(weights)[[3, 5]], [0.0, 0.0])
    # sklearn's "balanced" uses the number of classes it is given; ours divides by num_classes.
    expected = compute_class_weight("balanced", classes=present, y=labels) * len(present) / 7
    np.testing.assert_allclose(np.asarray(weights)[present], expected, rtol=1e-12)


def weights_reference(labels, num_classes, keep=None, ignore_index=None):
    """scikit-learn's balanced weights of the kept, not ignored labels; all NaN when one of
    them is outside ``[0, num_classes)``."""
    labels = np.asarray(labels).reshape(-1)
    keep = np.ones(labels.shape, bool) if keep is None else np.asarray(keep).reshape(-1)
    kept = labels[keep & (labels != ignore_index)]
    if np.any((kept < 0) | (kept >= num_classes)):
        return np.full(num_classes, np.nan)
    present = np.unique(kept)
    weights = np.zeros(num_classes)
    balanced = compute_class_weight("balanced", classes=present, y=kept)
    weights[present] = balanced * len(present) / num_classes
    return weights


weights_jit = jax.jit(
    sce.inverse_frequency_weights, static_argnames=("num_classes", "ignore_index")
)


def test_weights_where_and_ignore_index():
    labels = np.array([[0, 0, 1, -100], [2, 2, 2, 5]])
    where = np.array([[True, True, True, True], [True, False, True, False]])  # masks a 2 and the 5
    weights = weights_jit(labels, num_classes=3, where=where, ignore_index=-100)
    np.testing.assert_allclose(
        weights, compute_class_weight("balanced", classes=np.arange(3), y=[0, 0, 1, 2, 2])
    )
    np.testing.assert_allclose(weights, weights_reference(labels, 3, where, -100))
    # An ignore_index inside [0, V) is not counted either: its class gets 0.
    in_range = np.array([0, 0, 1, 3, 2, 2, 2, 1])
    np.testing.assert_allclose(
        weights_jit(in_range, num_classes=4, ignore_index=2),
        weights_reference(in_range, 4, ignore_index=2),
    )
    assert weights_jit(in_range, num_classes=4, ignore_index=2)[2] == 0


@pytest.mark.parametrize("bad_label", [-100, -1, 4, 2**40])
def test_weights_out_of_range_label_gives_nan(bad_label):
    """A label outside ``[0, V)`` that is neither ``ignore_index`` nor masked is never silently
    skipped: every weight is NaN, also an absent class's. Masked, it is not looked at."""
    labels = np.array([0, 0, 1, -7, 2, bad_label], np.int64)
    assert np.all(np.isnan(weights_reference(labels, 4, ignore_index=-7)))
    assert np.all(np.isnan(weights_jit(labels, num_classes=4, ignore_index=-7)))
    assert np.all(np.isnan(sce.inverse_frequency_weights(labels[labels != -7], 4)))
    keep = labels != bad_label
    np.testing.assert_allclose(
        weights_jit(labels, num_classes=4, where=keep, ignore_index=-7),
        weights_reference(labels, 4, keep, -7),
    )


def test_weights_feed_class_weights():
    rng = np.random.default_rng(1)
    labels = rng.choice(4, size=64, p=[0.7, 0.2, 0.1, 0.0])
    weights = sce.inverse_frequency_weights(labels, 4)
    logits = rng.standard_normal((64, 4))
    per_example = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, class_weights=weights
    )
    # Every class that occurs carries the same total weight N / V.
    totals = np.bincount(labels, weights=np.asarray(weights)[labels], minlength=4)
    np.testing.assert_allclose(totals[:3], 64 / 4)
    mean = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, class_weights=weights, reduction="mean"
    )
    np.testing.assert_allclose(mean, np.sum(per_example) / np.sum(totals), rtol=1e-12)


def test_weights_errors():
    with pytest.raises(TypeError, match="labels must be integer"):
        sce.inverse_frequency_weights(jnp.zeros(3), 2)
    with pytest.raises(ValueError, match="num_classes must be a positive"):
        sce.inverse_frequency_weights(jnp.zeros(3, jnp.int32), 0)
    with pytest.raises(TypeError, match="ignore_index must be a Python int"):
        sce.inverse_frequency_weights(jnp.zeros(3, jnp.int32), 2, ignore_index=1.0)


# --- expected_calibration_error and reliability_diagram_data --------------------------------------


def bins_reference(logits, labels, num_bins, keep=None, ignore_index=None):
    """Per-bin (count, mean confidence, accuracy) and the ECE, with an explicit loop. Examples
    outside ``keep`` or labelled ``ignore_index`` are left out; a label outside ``[0, V)`` is
    neither right nor wrong: NaN."""
    p = special.softmax(np.asarray(logits, np.float64), axis=-1)
    conf, pred = p.max(-1), p.argmax(-1)
    labels = np.asarray(labels)
    keep = np.ones(len(conf), bool) if keep is None else keep.copy()
    if ignore_index is not None:
        keep &= labels != ignore_index
    correct = np.where((labels >= 0) & (labels < p.shape[-1]), pred == labels, np.nan)
    count, confidence, accuracy = np.zeros((3, num_bins))
    ece = 0.0
    for b in range(num_bins):
        in_bin = keep & (conf > b / num_bins) & (conf <= (b + 1) / num_bins)
        count[b] = in_bin.sum()
        if count[b]:
            confidence[b] = conf[in_bin].mean()
            accuracy[b] = correct[in_bin].mean()
            ece += count[b] / keep.sum() * abs(accuracy[b] - confidence[b])
    return count, confidence, accuracy, ece


def overconfident(n=2000, v=5, scale=3.0, seed=0):
    """Calibrated logits (labels drawn from their softmax), then sharpened by ``scale``."""
    rng = np.random.default_rng(seed)
    logits = 1.5 * rng.standard_normal((n, v))
    u = rng.uniform(size=(n, 1))
    labels = (u > np.cumsum(special.softmax(logits, -1), -1)).sum(-1)
    return scale * logits, labels


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_and_diagram_match_reference(num_bins):
    logits, labels = overconfident(n=500, v=6)
    diagram = sce.reliability_diagram_data(logits, labels, num_bins)
    count, confidence, accuracy, ece = bins_reference(logits, labels, num_bins)
    np.testing.assert_array_equal(diagram.count, count)
    np.testing.assert_allclose(diagram.confidence, confidence, rtol=1e-12)
    np.testing.assert_allclose(diagram.accuracy, accuracy, rtol=1e-12)
    np.testing.assert_allclose(diagram.bin_edges, np.linspace(0, 1, num_bins + 1))
    np.testing.assert_allclose(sce.expected_calibration_error(logits, labels, num_bins), ece)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64])
def test_diagram_count_is_int32(dtype):
    logits, labels = overconfident(n=300, v=5, seed=7)
    diagram = jax.jit(sce.reliability_diagram_data, static_argnums=2)(
        jnp.asarray(logits, dtype), labels, 12
    )
    assert diagram.count.dtype == jnp.int32
    assert diagram.confidence.dtype == diagram.accuracy.dtype == diagram.bin_edges.dtype
    rounded = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float64))
    np.testing.assert_array_equal(diagram.count, bins_reference(rounded, labels, 12)[0])


def test_empty_bins_edges_and_masks():
    # Confidences 0.5 (a bin edge: it belongs to the bin below), 1/3, and ~1; most bins empty.
    logits = np.array([[0.0, 0.0, -np.inf], [1.0, 1.0, 1.0], [40.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = np.array([1, 2, 0, 0])
    diagram = sce.reliability_diagram_data(logits, labels, 10)
    np.testing.assert_array_equal(diagram.count, [0, 0, 0, 2, 1, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(np.asarray(diagram.confidence)[[3, 4, 9]], [1 / 3, 0.5, 1.0])
    np.testing.assert_allclose(np.asarray(diagram.accuracy)[[3, 4, 9]], [0.5, 0.0, 1.0])
    assert np.all(diagram.confidence[diagram.count == 0] == 0)
    ece = sce.expected_calibration_error(logits, labels, 10)
    np.testing.assert_allclose(ece, (2 * abs(0.5 - 1 / 3) + 0.5 + 0.0) / 4)
    # Whole examples masked out; nothing counted gives 0, not NaN.
    keep = np.array([True, False, True, False])
    masked = sce.expected_calibration_error(logits, labels, 10, where=keep)
    np.testing.assert_allclose(masked, bins_reference(logits, labels, 10, keep)[3])
    assert sce.expected_calibration_error(logits, labels, 10, where=np.zeros(4, bool)) == 0


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_ece_and_diagram_ignore_index(ignore_index):
    """Ignored examples are in no bin and not in the ECE's denominator: the result is that of
    the other examples alone (the clean subset). An ``ignore_index`` inside ``[0, V)`` is
    ignored too, as in the losses."""
    logits, labels = overconfident(n=600, v=5, seed=8)
    labels[::7] = ignore_index
    clean = labels != ignore_index
    count, confidence, accuracy, ece = bins_reference(logits[clean], labels[clean], 10)
    diagram = jax.jit(
        lambda z, t: sce.reliability_diagram_data(z, t, 10, ignore_index=ignore_index)
    )(logits, labels)
    np.testing.assert_array_equal(diagram.count, count)
    np.testing.assert_allclose(diagram.confidence, confidence, rtol=1e-12)
    np.testing.assert_allclose(diagram.accuracy, accuracy, rtol=1e-12)
    ece_ignored = jax.jit(
        lambda z, t: sce.expected_calibration_error(z, t, 10, ignore_index=ignore_index)
    )(logits, labels)
    np.testing.assert_allclose(ece_ignored, ece, rtol=1e-12)
    # With a mask as well: both leave examples out.
    keep = np.arange(600) % 3 != 0
    np.testing.assert_allclose(
        sce.expected_calibration_error(logits, labels, 10, where=keep, ignore_index=ignore_index),
        bins_reference(logits, labels, 10, keep, ignore_index)[3],
        rtol=1e-12,
    )


@pytest.mark.parametrize("bad_label", [-100, -1, 5, 2**40])
def test_out_of_range_label_gives_nan_in_its_bin(bad_label):
    """A label outside ``[0, V)`` that is not ``ignore_index`` is neither counted as wrong nor
    dropped: its bin's accuracy and the ECE are NaN; counts and confidences are as usual."""
    logits, labels = overconfident(n=300, v=5, seed=9)
    labels = labels.astype(np.int64)
    labels[[3, 40]] = bad_label
    labels[::11] = -7  # ignored
    count, confidence, accuracy, ece = bins_reference(logits, labels, 10, ignore_index=-7)
    nan_bins = np.isnan(accuracy)
    assert 1 <= nan_bins.sum() <= 2 and np.isnan(ece)
    diagram = jax.jit(lambda z, t: sce.reliability_diagram_data(z, t, 10, ignore_index=-7))(
        logits, labels
    )
    np.testing.assert_array_equal(diagram.count, count)
    np.testing.assert_allclose(diagram.confidence, confidence, rtol=1e-12)
    np.testing.assert_array_equal(np.isnan(diagram.accuracy), nan_bins)
    np.testing.assert_allclose(diagram.accuracy, accuracy, rtol=1e-12)  # NaN where NaN
    assert np.isnan(sce.expected_calibration_error(logits, labels, 10, ignore_index=-7))
    assert np.isnan(jax.jit(sce.expected_calibration_error)(logits, labels))
    # A fully masked example is not looked at, its label included.
    keep = ~np.isin(np.arange(300), [3, 40])
    masked = sce.expected_calibration_error(logits, labels, 10, where=keep, ignore_index=-7)
    np.testing.assert_allclose(masked, bins_reference(logits, labels, 10, keep, -7)[3])
    assert np.isfinite(masked)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_logit_gives_nan_not_a_missing_example(bad):
    """128 classes, wide enough for XLA's vectorised max on CPU to skip a NaN."""
    logits = np.random.default_rng(3).normal(size=(32, 128))
    labels = np.zeros(32, int)
    logits[5, 7] = bad
    assert np.isnan(sce.expected_calibration_error(logits, labels, 10))
    diagram = sce.reliability_diagram_data(logits, labels, 10)
    assert int(np.sum(diagram.count)) == 32 and np.isnan(diagram.confidence[-1])


def test_ece_transformations_and_dtypes():
    logits, labels = overconfident(n=300, v=4, seed=1)
    stacked, stacked_labels = logits.reshape(3, 100, 4), labels.reshape(3, 100)
    ece = jax.jit(jax.vmap(lambda z, t: sce.expected_calibration_error(z, t, 8)))(
        stacked, stacked_labels
    )
    expected = [bins_reference(z, t, 8)[3] for z, t in zip(stacked, stacked_labels, strict=True)]
    np.testing.assert_allclose(ece, expected, rtol=1e-12)
    out = sce.expected_calibration_error(jnp.asarray(logits, jnp.bfloat16), labels)
    assert out.dtype == jnp.float32
    # d ECE / d logits flows through the confidences: sign(conf_b - acc_b) / N * d max_k p_k.
    grad = jax.grad(lambda z: sce.expected_calibration_error(z, labels, 15))(logits)
    p = special.softmax(logits, -1)
    _, confidence, accuracy, _ = bins_reference(logits, labels, 15)
    conf = p.max(-1)
    b = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    sign = np.sign(confidence[b] - accuracy[b])
    top = np.eye(4)[p.argmax(-1)]
    expected = (sign * conf)[:, None] * (top - p) / len(labels)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-15)


def test_ece_errors():
    with pytest.raises(ValueError, match="num_bins"):
        sce.expected_calibration_error(jnp.zeros((2, 3)), jnp.array([0, 1]), 0)
    with pytest.raises(TypeError, match="labels must be integer"):
        sce.reliability_diagram_data(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


# --- fit_temperature -----------------------------------------------------------------------------


def slope_reference(logits, labels, u, keep=None):
    """The mean NLL's slope in ``u = log T``: ``-mean(E_p[z / T] - E_y[z / T])``, float64."""
    z = np.asarray(logits, np.float64)
    y = np.eye(z.shape[-1])[labels] if np.asarray(labels).dtype.kind == "i" else labels
    keep = np.ones(len(z), bool) if keep is None else keep
    p = special.softmax(z * np.exp(-u), axis=-1)
    return -np.mean(((p - y) * z).sum(-1)[keep])


def temperature_reference(logits, labels, keep=None):
    """The root in ``u = log T`` of the NLL's slope, by Brent's root finder (a minimiser of the
    flat NLL would only reach sqrt(eps))."""
    slope = lambda u: slope_reference(logits, labels, u, keep)
    return np.exp(optimize.brentq(slope, -8.0, 8.0, xtol=1e-15, rtol=1e-15))


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 20.0])
def test_fit_temperature_matches_scipy(scale):
    logits, labels = overconfident(n=400, v=6, scale=scale, seed=2)
    t = sce.fit_temperature(logits, labels)
    assert t.shape == () and t.dtype == jnp.float64
    np.testing.assert_allclose(t, temperature_reference(logits, labels), rtol=1e-6)


def test_fit_temperature_with_a_class_mask():
    """A class-level ``where`` fits the temperature of the unmasked classes alone (its masked
    -inf logits once made the Newton step's second derivative NaN, and the fit stopped at 1)."""
    logits, labels = overconfident(n=400, v=6, scale=4.0, seed=5)
    labels = np.minimum(labels, 4)  # class 5 is masked and never a label
    where = (np.arange(6) < 5)[None, :]
    np.testing.assert_allclose(
        sce.fit_temperature(logits, labels, where=where),
        temperature_reference(logits[:, :5], labels),
        rtol=1e-6,
    )


def test_fit_temperature_float32_probability_labels_and_where():
    logits, labels = overconfident(n=400, v=6, scale=4.0, seed=3)
    t32 = sce.fit_temperature(jnp.asarray(logits, jnp.float32), labels)
    assert t32.dtype == jnp.float32
    np.testing.assert_allclose(t32, temperature_reference(logits, labels), rtol=1e-4)
    soft = 0.9 * np.eye(6)[labels] + 0.1 / 6
    np.testing.assert_allclose(
        sce.fit_temperature(logits, soft), temperature_reference(logits, soft), rtol=1e-6
    )
    keep = np.arange(400) % 3 != 0
    np.testing.assert_allclose(
        sce.fit_temperature(logits, labels, where=keep),
        temperature_reference(logits, labels, keep),
        rtol=1e-6,
    )


def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    logits, labels = overconfident(n=4000, v=5, scale=3.0, seed=4)
    t = sce.fit_temperature(logits, labels)
    np.testing.assert_allclose(t, 3.0, rtol=0.1)  # the sharpening it undoes
    before = sce.expected_calibration_error(logits, labels)
    after = sce.expected_calibration_error(logits / t, labels)
    fused = sce.expected_calibration_error(logits / 3.0, labels)
    assert before > 0.1 and after < 0.03 and after < before / 4
    np.testing.assert_allclose(after, fused, atol=0.02)


def test_fit_temperature_implicit_gradient_jit_and_vmap():
    logits, labels = overconfident(n=60, v=4, scale=2.0, seed=5)
    direction = np.random.default_rng(6).standard_normal(logits.shape)
    grad = jax.jit(jax.grad(lambda z: sce.fit_temperature(z, labels)))(logits)
    h = 1e-5
    numeric = (
        temperature_reference(logits + h * direction, labels)
        - temperature_reference(logits - h * direction, labels)
    ) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-5)
    stacked = np.stack([logits, 2.0 * logits])
    ts = jax.vmap(sce.fit_temperature, in_axes=(0, None))(stacked, labels)
    np.testing.assert_allclose(ts, [temperature_reference(z, labels) for z in stacked], rtol=1e-6)


def test_fit_temperature_without_minimiser_stays_bounded():
    # Every example already correct: the NLL keeps falling as T -> 0.
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1])
    t, info = sce.fit_temperature(logits, labels, return_info=True)
    assert np.isfinite(t) and np.exp(-10.0) < t < 0.05
    # The search stops before the bound, where the NLL is 0 to working precision.
    assert not info.at_bound
    nll = sce.softmax_cross_entropy_with_integer_labels(logits, labels, temperature=t)
    assert np.all(nll < 1e-12)


fit_jit = jax.jit(sce.fit_temperature, static_argnames=("ignore_index", "return_info"))


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_fit_temperature_ignore_index(ignore_index):
    """Ignored examples are left out of the fit: the temperature of the clean subset."""
    logits, labels = overconfident(n=400, v=6, scale=3.0, seed=10)
    labels[::5] = ignore_index
    clean = labels != ignore_index
    expected = temperature_reference(logits[clean], labels[clean])
    t, info = fit_jit(logits, labels, ignore_index=ignore_index, return_info=True)
    np.testing.assert_allclose(t, expected, rtol=1e-6)
    assert info.converged and not info.at_bound
    t32 = sce.fit_temperature(jnp.asarray(logits, jnp.float32), labels, ignore_index=ignore_index)
    np.testing.assert_allclose(t32, expected, rtol=1e-4)


def anticorrelated(n=200, v=5, seed=11):
    """Logits whose every prediction is wrong (the label is the least likely class): the NLL
    falls as ``T`` grows, towards log V, and has no minimiser."""
    logits = 2.0 * np.random.default_rng(seed).standard_normal((n, v))
    return logits, np.argmin(logits, axis=-1)


@pytest.mark.parametrize(
    ("bad_label", "data"),
    # A negative label (informative logits) and one past V (anticorrelated ones) outside the
    # slow set; the other pairs in it.
    [
        (-100, "informative"),
        (6, "anticorrelated"),
        *(
            pytest.param(label, data, marks=pytest.mark.slow)
            for label, data in [
                (-100, "anticorrelated"),
                (6, "informative"),
                (-1, "informative"),
                (-1, "anticorrelated"),
                (2**40, "informative"),
                (2**40, "anticorrelated"),
            ]
        ),
    ],
)
def test_fit_temperature_out_of_range_label_is_nan(data, bad_label):
    """A label outside ``[0, V)`` that is not ``ignore_index`` makes the NLL NaN at every
    temperature: the result is NaN, through the Newton loop and its clamps, also for logits
    whose fit would otherwise end at the bound."""
    if data == "informative":
        logits, labels = overconfident(n=200, v=6, seed=12)
    else:
        logits, labels = anticorrelated(v=6)
    labels = labels.astype(np.int64)
    labels[7] = bad_label
    labels[::9] = -7  # ignored
    t, info = fit_jit(logits, labels, ignore_index=-7, return_info=True)
    assert np.isnan(t) and not info.at_bound and not info.converged
    assert np.isnan(sce.fit_temperature(jnp.asarray(logits, jnp.float32), labels, ignore_index=-7))
    ts = jax.vmap(lambda z: sce.fit_temperature(z, labels, ignore_index=-7))(
        np.stack([logits, 0.5 * logits])
    )
    assert np.all(np.isnan(ts))
    # Masked, the example is not looked at.
    keep = np.arange(200) != 7
    clean = keep & (labels != -7)
    t, info = fit_jit(logits, labels, where=keep, ignore_index=-7, return_info=True)
    if data == "informative":
        np.testing.assert_allclose(t, temperature_reference(logits[clean], labels[clean]))
    else:
        assert info.at_bound
        np.testing.assert_allclose(t, np.exp(10.0), rtol=1e-12)


def test_fit_temperature_non_finite_nll_is_nan():
    """A NaN or +inf logit, or a target of probability 0, makes the NLL non-finite at every
    temperature: NaN, not the bound the iterations drift to."""
    logits, labels = overconfident(n=100, v=4, seed=13)
    for value in [np.nan, np.inf]:
        bad = logits.copy()
        bad[3, 1] = value
        t, info = fit_jit(bad, labels, return_info=True)
        assert np.isnan(t) and not info.at_bound and not info.converged
    impossible = logits.copy()
    impossible[5, labels[5]] = -np.inf
    assert np.isnan(fit_jit(impossible, labels))


def test_fit_temperature_reports_the_bound():
    logits, labels = anticorrelated()
    # The float64 slope is still negative at the upper end: no minimiser below e^10.
    assert slope_reference(logits, labels, 10.0) < 0
    t, info = fit_jit(logits, labels, return_info=True)
    np.testing.assert_allclose(t, np.exp(10.0), rtol=1e-12)
    assert info.at_bound and not info.converged
    assert info.at_bound.dtype == info.converged.dtype == jnp.bool_
    np.testing.assert_allclose(sce.fit_temperature(logits, labels), t, rtol=1e-12)
    # Constant logits: the NLL does not depend on T, and the search ends at either bound.
    t, info = fit_jit(np.zeros((6, 3), np.float32), np.arange(6) % 3, return_info=True)
    assert info.at_bound and np.isclose(abs(np.log(t)), 10.0, rtol=1e-6)
    # A fit inside, under vmap: the info is batched too.
    good, good_labels = overconfident(n=200, v=5, seed=14)
    stacked, stacked_labels = np.stack([good, logits]), np.stack([good_labels, labels])
    ts, infos = jax.vmap(lambda z, y: sce.fit_temperature(z, y, return_info=True))(
        stacked, stacked_labels
    )
    np.testing.assert_allclose(ts[0], temperature_reference(good, good_labels), rtol=1e-6)
    np.testing.assert_allclose(ts[1], np.exp(10.0), rtol=1e-12)
    np.testing.assert_array_equal(infos.at_bound, [False, True])
    np.testing.assert_array_equal(infos.converged, [True, False])


def test_fit_temperature_ignore_index_needs_integer_labels():
    with pytest.raises(ValueError, match="ignore_index applies to integer labels only"):
        sce.fit_temperature(jnp.zeros((2, 3)), jnp.full((2, 3), 1 / 3), ignore_index=-100)
    with pytest.raises(TypeError, match="ignore_index must be a Python int"):
        sce.fit_temperature(jnp.zeros((2, 3)), jnp.array([0, 1]), ignore_index="-100")
