"""``return_aux`` on the XLA path: the argmax from the maxes of chunks of the vocabulary, and
the sum against the max in chunks.

With integer labels, no softcap and no mask of classes, and a vocabulary with a chunk width
(``V = 512``: 8 chunks of 64; ``V = 4096``: 8 chunks of 512), the XLA path takes the row max
over chunks of the logits and finds the argmax in the lowest chunk at the max, gathered again,
instead of a second reduction over the whole row (`_xla._max_and_argmax`). With float32 logits
and ``V = 4096`` (which has `_xla._chunk`'s width, 32; 512 has none), on the CPU, the sum
against the max is also taken over chunks, with the label's chunk summed again without the
label (`_xla._lse_at_max`). This module compares everything ``return_aux`` returns (values and
the gradient of the loss and every float field) with the float64 reference
(`numpy_reference.monitoring`) on both, with ties within, across and at the edges of chunks,
and asserts that each path is the one taken, so that none of it passes vacuously.
(`test_aux.py` covers the other path: its ``V = 200`` has no chunk width.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from test_aux import tolerance

import jax_softmax_ce as sce

N, V = 8, 512
WIDTHS = {512: 64, 4096: 512}  # the argmax's chunks (`_xla._argmax_chunk`), to place ties
WIDTH = WIDTHS[V]
FIELDS = ("lse", "max_prob", "entropy", "target_logprob")


def options_of(name: str, v: int) -> dict:
    return {
        "plain": {},
        "temperature": {"temperature": 1.7},
        "array_temperature": {"temperature": "array"},
        "row_mask": {"where": "row"},
        "ignore_index": {"ignore_index": -100},
        "weights_and_options": {
            "label_smoothing": 0.1,
            "z_loss": 1e-3,
            "class_weights": np.linspace(0.5, 2.0, v),
        },
    }[name]


NAMES = ("plain", "temperature", "array_temperature", "row_mask", "ignore_index")


def scopes(logits, labels, **opts) -> str:
    """The lowered forward (for the CPU) with its locations, which name the scopes of
    `_xla._max_and_argmax` and `_xla._lse_at_max` where they serve."""
    lowered = jax.jit(
        lambda z: sce.softmax_cross_entropy_with_integer_labels(
            z, labels, implementation="xla", return_aux=True, **opts
        )
    ).lower(logits)
    return lowered.as_text(debug_info=True)


def finds_argmax_by_chunks(logits, labels, **opts) -> bool:
    return "max_and_argmax" in scopes(logits, labels, **opts)


def sums_by_chunks(logits, labels, **opts) -> bool:
    return "lse_at_max" in scopes(logits, labels, **opts)


def test_the_chunks_serve_where_they_should():
    labels = np.zeros(4, np.int32)
    assert finds_argmax_by_chunks(jnp.zeros((4, V)), labels)
    assert finds_argmax_by_chunks(jnp.zeros((4, V), jnp.bfloat16), labels)
    assert finds_argmax_by_chunks(jnp.zeros((4, V)), labels, temperature=2.0)
    assert finds_argmax_by_chunks(jnp.zeros((4, V)), labels, where=np.ones((4, 1), bool))
    assert not finds_argmax_by_chunks(jnp.zeros((4, 200)), labels)  # 200 has no chunk width
    assert not finds_argmax_by_chunks(jnp.zeros((4, V)), labels, logit_softcap=30.0)
    assert not finds_argmax_by_chunks(jnp.zeros((4, V)), labels, where=np.ones((1, V), bool))
    plain = jax.jit(
        lambda z: sce.softmax_cross_entropy_with_integer_labels(z, labels, implementation="xla")
    ).lower(jnp.zeros((4, V)))
    assert "max_and_argmax" not in plain.as_text(debug_info=True)
    wide = jnp.zeros((4, 4096), jnp.float32)
    assert sums_by_chunks(wide, labels)
    assert sums_by_chunks(wide, labels, temperature=2.0, where=np.ones((4, 1), bool))
    assert not sums_by_chunks(jnp.zeros((4, V), jnp.float32), labels)  # no `_xla._chunk` width
    assert not sums_by_chunks(wide.astype(jnp.bfloat16), labels)
    assert not sums_by_chunks(wide, labels, logit_softcap=30.0)


def problem(seed: int = 0, v: int = V):
    """Random rows, a row whose max is tied in three chunks, one whose max is tied within a
    chunk, and one whose max is in the last column."""
    logits, labels = numpy_reference.random_case(N, v, integer=True, seed=seed)
    w = WIDTHS[v]
    logits[0, [3 * w + 5, w + w - 1, 6 * w]] = 20.0  # across chunks: the second first
    logits[1, [2 * w + 7, 2 * w + 3]] = 20.0  # within one chunk: 2 w + 3 first
    logits[2, v - 1] = 20.0
    return logits, labels.astype(np.int32)


def expected_argmax(v: int) -> list[int]:
    w = WIDTHS[v]
    return [2 * w - 1, 2 * w + 3, v - 1]


def resolve(options: dict, labels):
    """``(jax keyword arguments, numpy loss arguments, numpy monitoring arguments, labels,
    array temperature or None)``."""
    options = dict(options)
    array_t = None
    if options.get("temperature") == "array":
        array_t = 0.8
        options.pop("temperature")
    if options.get("where") == "row":
        where = np.ones(N, bool)
        where[4] = False
        options["where"] = where
    if "ignore_index" in options:
        labels = labels.copy()
        labels[5] = options["ignore_index"]
    numpy_options = dict(options)
    if "where" in options:
        numpy_options["where"] = options["where"][:, None]
    if array_t is not None:
        numpy_options["temperature"] = array_t
    monitoring_options = {
        k: v for k, v in numpy_options.items() if k in ("where", "temperature", "ignore_index")
    }
    return options, numpy_options, monitoring_options, labels, array_t


@pytest.mark.parametrize(
    "v, name, dtype",
    [(v, name, jnp.float32) for v in WIDTHS for name in (*NAMES, "weights_and_options")]
    + [(V, "weights_and_options", jnp.bfloat16), (V, "weights_and_options", jnp.float64)],
)
def test_matches_float64(v, name, dtype):
    raw, labels = problem(v=v)
    logits = jnp.asarray(raw, dtype)
    options, numpy_options, monitoring_options, labels, array_t = resolve(
        options_of(name, v), labels
    )
    assert finds_argmax_by_chunks(logits, labels, **options)
    assert sums_by_chunks(logits, labels, **options) == (v == 4096)
    c = {k: np.random.default_rng(5 + i).normal(size=N) for i, k in enumerate(("loss", *FIELDS))}

    def objective(logits, temperature):
        kwargs = dict(options)
        if temperature is not None:
            kwargs["temperature"] = temperature
        loss, aux = sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, implementation="xla", return_aux=True, **kwargs
        )
        total = jnp.sum(jnp.asarray(c["loss"], loss.dtype) * loss)
        for field in FIELDS:
            value = getattr(aux, field)
            total = total + jnp.sum(jnp.asarray(c[field], value.dtype) * value)
        return total, (loss, aux)

    t = None if array_t is None else jnp.float32(array_t)
    argnums = (0,) if t is None else (0, 1)
    grads, (loss, aux) = jax.jit(jax.grad(objective, argnums=argnums, has_aux=True))(logits, t)

    exact = np.asarray(logits.astype(jnp.float64))
    ce = numpy_reference.cross_entropy(
        exact, labels, integer=True, cotangent=c["loss"], **numpy_options
    )
    mon = numpy_reference.monitoring(
        exact,
        labels,
        integer=True,
        coefficients={k: c[k] for k in FIELDS},
        **monitoring_options,
    )
    tol = tolerance(dtype)
    assert aux.argmax.dtype == jnp.int32 and aux.argmax.shape == (N,)
    np.testing.assert_array_equal(aux.argmax, mon.argmax)
    np.testing.assert_array_equal(aux.argmax[:3], expected_argmax(v))
    accumulation = jnp.float64 if dtype == jnp.float64 else jnp.float32
    for field in FIELDS:
        got = getattr(aux, field)
        assert got.dtype == accumulation and got.shape == (N,), field
        np.testing.assert_allclose(got, getattr(mon, field), rtol=tol, atol=tol, err_msg=field)
    np.testing.assert_allclose(loss, ce.loss, rtol=tol, atol=tol)
    want = ce.dlogits + mon.dlogits
    g_tol = {jnp.bfloat16: 1e-2, jnp.float32: 2e-5, jnp.float64: 1e-10}[dtype]
    scale = max(1.0, float(np.max(np.abs(want))))
    assert grads[0].dtype == dtype and grads[0].shape == (N, v)
    np.testing.assert_allclose(
        np.asarray(grads[0].astype(jnp.float64)), want, rtol=g_tol, atol=g_tol * scale
    )
    if t is not None:
        want_t = ce.dtemperature + mon.dtemperature
        np.testing.assert_allclose(float(grads[1]), want_t, rtol=1e-4, atol=1e-4)


def test_ties_and_near_ties_at_the_edges_of_chunks():
    """Ties across a chunk boundary (columns 63 and 64) and at the first and last columns keep
    the lowest id; a class one ulp below the max in an earlier chunk is not a tie."""
    logits = np.zeros((5, V), np.float32)
    logits[0, [WIDTH, WIDTH - 1]] = 3.0
    logits[1, [V - 1, 0]] = 3.0
    logits[2, 0] = 3.0
    logits[3, 5] = np.nextafter(np.float32(3.0), np.float32(0))
    logits[3, V - 2] = 3.0
    logits[4] = -np.inf
    labels = np.zeros(5, np.int32)
    _, aux = jax.jit(
        lambda z: sce.softmax_cross_entropy_with_integer_labels(
            z, labels, implementation="xla", return_aux=True
        )
    )(jnp.asarray(logits))
    np.testing.assert_array_equal(aux.argmax, [WIDTH - 1, 0, 0, V - 2, -1])
    assert aux.max_prob[4] == 0 and aux.lse[4] == -np.inf


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_logit_stays_in_its_row(bad):
    """A NaN or +inf logit makes its row's loss and float aux values NaN and its argmax -1
    (in the chunk that holds the row's finite max, and in another), and leaves every other
    row's as they were."""
    raw, labels = problem(seed=3)
    rows = np.array([6, 7])
    bad_logits = raw.copy()
    bad_logits[6, np.argmax(raw[6])] = bad
    bad_logits[7, (np.argmax(raw[7]) + 3 * WIDTH) % V] = bad

    def run(x):
        return jax.jit(
            lambda z: sce.softmax_cross_entropy_with_integer_labels(
                z, labels, implementation="xla", return_aux=True
            )
        )(jnp.asarray(x, jnp.float32))

    loss, aux = jax.tree.map(np.asarray, run(bad_logits))
    clean_loss, clean = jax.tree.map(np.asarray, run(raw))
    assert np.isnan(loss[rows]).all() and np.isnan(aux.lse[rows]).all()
    np.testing.assert_array_equal(aux.argmax[rows], [-1, -1])
    keep = np.ones(N, bool)
    keep[rows] = False
    np.testing.assert_array_equal(aux.argmax[keep], clean.argmax[keep])
    np.testing.assert_array_equal(loss[keep], clean_loss[keep])
    np.testing.assert_array_equal(aux.entropy[keep], clean.entropy[keep])


def test_under_vmap_each_problem_finds_its_own_argmax():
    raws, labels = zip(*(problem(seed=s) for s in range(3)), strict=True)
    logits = jnp.asarray(np.stack(raws), jnp.float32)
    labels = jnp.asarray(np.stack(labels))
    _, aux = jax.jit(
        jax.vmap(
            lambda z, y: sce.softmax_cross_entropy_with_integer_labels(
                z, y, implementation="xla", return_aux=True
            )
        )
    )(logits, labels)
    for k in range(3):
        want = numpy_reference.monitoring(np.asarray(raws[k]), np.asarray(labels[k]), integer=True)
        np.testing.assert_array_equal(aux.argmax[k], want.argmax)
        np.testing.assert_allclose(aux.max_prob[k], want.max_prob, rtol=2e-5, atol=2e-5)


def test_ties_are_those_of_the_tempered_logits():
    """The argmax is that of ``z' = z * (1 / T)`` in float32 (`_tile.transform`), as on the
    other path: two logits one ulp apart that round to the same ``z'`` are a tie, within a
    chunk and across chunks, and the lower class id wins."""
    t = 3.0
    high = np.float32(3.4398108)
    low = np.nextafter(high, np.float32(0))
    assert low * np.float32(1 / t) == high * np.float32(1 / t)  # a tie only after rounding
    logits = np.zeros((2, V), np.float32)
    logits[0, [WIDTH + 2, WIDTH + 6]] = [low, high]  # within a chunk
    logits[1, [5, 3 * WIDTH + 1]] = [low, high]  # across chunks
    labels = np.zeros(2, np.int32)
    _, aux = jax.jit(
        lambda z: sce.softmax_cross_entropy_with_integer_labels(
            z, labels, implementation="xla", return_aux=True, temperature=t
        )
    )(jnp.asarray(logits))
    want = np.argmax(logits * np.float32(1 / t), axis=1)
    np.testing.assert_array_equal(want, [WIDTH + 2, 5])
    np.testing.assert_array_equal(aux.argmax, want)


def test_the_sum_by_chunks_hides_a_masked_nan_and_keeps_an_infinite_loss():
    """On the path that sums in chunks against the max (``V = 4096``, float32): a row that the
    row mask leaves out, with a NaN in it, has loss 0, a zero gradient and no aux values; a
    label at -inf gives an infinite loss; a row of -inf logits has lse -inf and argmax -1; a
    label outside ``[0, V)`` gives a NaN loss and target_logprob and the row's other values;
    and every other row is as in float64."""
    v = 4096
    raw, labels = problem(seed=1, v=v)
    raw[3, 10] = np.nan
    raw[4, labels[4]] = -np.inf
    raw[5] = -np.inf
    labels[6] = v + 3
    raw[6, [0, v - 1]] = raw[6].max() + 1.0  # the max, at either end of the row
    where = np.ones(N, bool)
    where[3] = False
    logits = jnp.asarray(raw, jnp.float32)
    assert sums_by_chunks(logits, labels, where=where)

    def total(z):
        loss, aux = sce.softmax_cross_entropy_with_integer_labels(
            z, labels, implementation="xla", where=where, return_aux=True
        )
        finite = jnp.isfinite(loss)
        monitored = jnp.where(jnp.arange(N) != 6, aux.entropy + aux.max_prob, 0)
        return jnp.sum(jnp.where(finite, loss, 0) + monitored), (loss, aux)

    grad, (loss, aux) = jax.jit(jax.grad(total, has_aux=True))(logits)
    assert loss[3] == 0 and aux.argmax[3] == -1 and aux.entropy[3] == 0
    np.testing.assert_array_equal(grad[3], 0)
    assert loss[4] == np.inf
    assert aux.lse[5] == -np.inf and aux.argmax[5] == -1 and aux.max_prob[5] == 0
    np.testing.assert_array_equal(grad[5], 0)
    assert np.isnan(loss[6]) and np.isnan(aux.target_logprob[6])
    row = numpy_reference.monitoring(raw[6:7], labels[6:7] % v, integer=True)
    assert int(aux.argmax[6]) == row.argmax[0]
    np.testing.assert_allclose(aux.lse[6], row.lse[0], rtol=2e-6)
    np.testing.assert_allclose(aux.entropy[6], row.entropy[0], rtol=2e-5)
    keep = np.array([i not in (3, 4, 5, 6) for i in range(N)])
    clean = np.where(np.isnan(raw), 0.0, raw)
    ce = numpy_reference.cross_entropy(clean[keep], labels[keep], integer=True)
    mon = numpy_reference.monitoring(raw[keep], labels[keep], integer=True)
    np.testing.assert_allclose(loss[keep], ce.loss, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(aux.argmax[keep], mon.argmax)
    np.testing.assert_allclose(aux.entropy[keep], mon.entropy, rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(grad))
