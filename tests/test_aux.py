"""``return_aux=True``: lse, argmax, max_prob, entropy and target_logprob, and their gradients.

Every implementation ("reference", "xla", both Pallas schedules with small ragged blocks, and the
fused loss's "xla" and Pallas paths) is compared with the float64 NumPy reference
(`numpy_reference.monitoring` for the auxiliary values, `numpy_reference.cross_entropy` for the
loss): values, dtypes, shapes, and the gradient of a combination of the loss and every float
field with per-example coefficients, with respect to the logits (the fused loss's inputs, weight
and bias) and an array temperature. Shapes are tiny: N = 6 rows, V = 200 classes (not a multiple
of any block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
import pytest
from jax_softmax_ce.kernels import _blocks
from platforms import interpret

import jax_softmax_ce as sce

N, V = 6, 200
FIELDS = ("lse", "max_prob", "entropy", "target_logprob")


def implementation(name: str, *dtypes):
    """``"reference"``, ``"xla"``, or ``"gpu"``/``"tpu"``: that Pallas schedule with small
    blocks (several vocabulary blocks, the last one ragged)."""
    if name in ("reference", "xla"):
        return name
    if name == "tpu":
        blocks = sce.BlockSizes(max(_blocks.sublanes(d) for d in dtypes), 128)
    else:
        blocks = sce.BlockSizes(4, 64)
    return sce.Pallas(block_sizes=blocks, schedule=name, interpret=interpret(name))


IMPLEMENTATIONS = ("reference", "xla", "gpu", "tpu")


def make_case(*, integer: bool, seed=0, dtype=jnp.float32, scale=3.0):
    logits, labels = numpy_reference.random_case(N, V, integer=integer, seed=seed, scale=scale)
    return jnp.asarray(logits, dtype), jnp.asarray(labels, jnp.int32 if integer else jnp.float32)


def coefficients(seed=5):
    """Per-example cotangents of the loss and of each float field."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=N) for name in ("loss", *FIELDS)}


def masks(kind: str):
    rng = np.random.default_rng(7)
    if kind == "row":
        return np.array([True, False, True, True, True, True])
    if kind == "col":
        return rng.random((1, V)) < 0.7
    full = rng.random((N, V)) < 0.6
    full[2] = False  # a fully masked example
    return full


INTEGER_CASES = {
    "plain": {},
    "options": dict(label_smoothing=0.1, class_weights="random", z_loss=1e-3),
    "softcap": dict(logit_softcap=4.0),
    "temperature": dict(temperature=1.7),
    "array_temperature": dict(temperature="array"),
    "everything": dict(
        label_smoothing=0.2,
        class_weights="random",
        z_loss=1e-3,
        logit_softcap=5.0,
        temperature="array",
    ),
    "ignore_index": dict(ignore_index=-100),
    "row_mask": dict(where="row"),
    "col_mask": dict(where="col"),
    "full_mask": dict(where="full", label_smoothing=0.1),
}
PROBABILITY_CASES = {
    "plain": {},
    "options": dict(label_smoothing=0.1, class_weights="random", z_loss=1e-3, logit_softcap=6.0),
    "array_temperature": dict(temperature="array"),
    "full_mask": dict(where="full"),
}


def resolve(options: dict, labels, *, integer: bool):
    """``(jax keyword arguments, numpy keyword arguments, labels, array temperature or None)``."""
    options = dict(options)
    array_t = None
    if options.get("temperature") == "array":
        array_t = 0.8
        options.pop("temperature")
    if options.get("class_weights") == "random":
        options["class_weights"] = np.random.default_rng(3).uniform(0.5, 2.0, V)
    if "where" in options:
        options["where"] = masks(options["where"])
    if "ignore_index" in options:
        labels = labels.at[1].set(options["ignore_index"])
    numpy_options = dict(options)
    if "where" in options and options["where"].ndim == 1:
        numpy_options["where"] = options["where"][:, None]
    if array_t is not None:
        numpy_options["temperature"] = array_t
    if integer and options.get("where") is not None and options["where"].shape == (1, V):
        # a label on a masked class gives an infinite loss: keep the labels on valid classes
        valid = np.flatnonzero(options["where"][0])
        labels = jnp.asarray(valid[np.asarray(labels) % len(valid)], jnp.int32)
    if integer and options.get("where") is not None and options["where"].shape == (N, V):
        fixed = []
        for i, t in enumerate(np.asarray(labels)):
            ok = np.flatnonzero(options["where"][i])
            fixed.append(ok[t % len(ok)] if len(ok) else t)
        labels = jnp.asarray(fixed, jnp.int32)
    return options, numpy_options, labels, array_t


def loss_fn(integer: bool):
    if integer:
        return sce.softmax_cross_entropy_with_integer_labels
    return sce.softmax_cross_entropy


def objective(aux, loss, c, *, integer: bool):
    def term(coefficient, value):
        return jnp.sum(jnp.asarray(coefficient, value.dtype) * value)

    total = term(c["loss"], loss)
    for name in FIELDS:
        if name == "target_logprob" and not integer:
            continue
        total = total + term(c[name], getattr(aux, name))
    return total


def run_case(impl_name, options, *, integer, dtype=jnp.float32, seed=0):
    """Values and gradients of one implementation, and the float64 reference's."""
    logits, labels = make_case(integer=integer, seed=seed, dtype=dtype)
    options, numpy_options, labels, array_t = resolve(options, labels, integer=integer)
    impl = implementation(impl_name, dtype)
    c = coefficients()
    fn = loss_fn(integer)

    @jax.jit
    def go(logits, temperature):
        def f(logits, temperature):
            kwargs = dict(options)
            if temperature is not None:
                kwargs["temperature"] = temperature
            loss, aux = fn(logits, labels, implementation=impl, return_aux=True, **kwargs)
            return objective(aux, loss, c, integer=integer), (loss, aux)

        argnums = (0,) if temperature is None else (0, 1)
        return jax.value_and_grad(f, argnums=argnums, has_aux=True)(logits, temperature)

    t = None if array_t is None else jnp.float32(array_t)
    (_, (loss, aux)), grads = go(logits, t)
    exact = np.asarray(logits.astype(jnp.float64))
    ce = numpy_reference.cross_entropy(
        exact, np.asarray(labels), integer=integer, cotangent=c["loss"], **numpy_options
    )
    mon_options = {
        k: v
        for k, v in numpy_options.items()
        if k in ("where", "logit_softcap", "temperature", "ignore_index")
    }
    mon = numpy_reference.monitoring(
        exact,
        np.asarray(labels),
        integer=integer,
        coefficients={k: c[k] for k in FIELDS},
        **mon_options,
    )
    return loss, aux, grads, ce, mon


def tolerance(dtype):
    return {jnp.bfloat16: 1e-4, jnp.float32: 2e-5, jnp.float64: 1e-10}[dtype]


def check(loss, aux, grads, ce, mon, *, integer, dtype=jnp.float32, array_t=False):
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    tol = tolerance(dtype)
    assert aux.argmax.dtype == jnp.int32 and aux.argmax.shape == (N,)
    np.testing.assert_array_equal(aux.argmax, mon.argmax)
    for name in FIELDS:
        got, want = getattr(aux, name), getattr(mon, name)
        if name == "target_logprob" and not integer:
            assert got is None
            continue
        assert got.dtype == acc and got.shape == (N,), name
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_allclose(loss, ce.loss, rtol=tol, atol=tol)
    want = ce.dlogits + mon.dlogits
    scale = max(1.0, float(np.max(np.abs(want))))
    # the gradient is rounded once to the logits' dtype
    g_tol = {jnp.bfloat16: 1e-2, jnp.float32: 2e-5, jnp.float64: 1e-10}[dtype]
    np.testing.assert_allclose(
        np.asarray(grads[0].astype(jnp.float64)), want, rtol=g_tol, atol=g_tol * scale
    )
    if array_t:
        want_t = ce.dtemperature + mon.dtemperature
        np.testing.assert_allclose(float(grads[1]), want_t, rtol=1e-4, atol=1e-4)


# The strict TPU interpreter is the slowest: it runs the cases that combine the options. "xla"
# runs every case; the GPU schedule's interpreter and the reference run the cases of one option
# each too, in the slow set (CI).
TPU_CASES = ("everything", "full_mask", "ignore_index", "plain")


def cases(names, tpu_names=TPU_CASES):
    return [
        pytest.param(
            impl,
            name,
            marks=[pytest.mark.slow]
            if impl in ("gpu", "reference") and name not in tpu_names
            else [],
        )
        for impl in IMPLEMENTATIONS
        for name in sorted(names)
        if impl != "tpu" or name in tpu_names
    ]


@pytest.mark.parametrize("impl_name, name", cases(INTEGER_CASES))
def test_integer_labels(impl_name, name):
    options = INTEGER_CASES[name]
    loss, aux, grads, ce, mon = run_case(impl_name, options, integer=True)
    check(loss, aux, grads, ce, mon, integer=True, array_t=options.get("temperature") == "array")


@pytest.mark.parametrize("impl_name, name", cases(PROBABILITY_CASES, ("options", "full_mask")))
def test_probability_labels(impl_name, name):
    options = PROBABILITY_CASES[name]
    loss, aux, grads, ce, mon = run_case(impl_name, options, integer=False)
    check(loss, aux, grads, ce, mon, integer=False, array_t=options.get("temperature") == "array")


@pytest.mark.parametrize(
    "impl_name, dtype",
    [(i, jnp.bfloat16) for i in IMPLEMENTATIONS]
    + [(i, jnp.float64) for i in ("reference", "xla", "gpu")],
)
def test_dtypes(impl_name, dtype):
    loss, aux, grads, ce, mon = run_case(
        impl_name, {"label_smoothing": 0.1}, integer=True, dtype=dtype
    )
    check(loss, aux, grads, ce, mon, integer=True, dtype=dtype)
    assert grads[0].dtype == dtype


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_entropy_gradient_alone(impl_name):
    """The entropy bonus of RL: ``grad(sum entropy)`` with no loss term is ``p (E_p[z'] - z')``
    (here through a softcap and a temperature)."""
    logits, labels = make_case(integer=True, seed=2)
    options = dict(logit_softcap=5.0, temperature=1.3)

    def entropy(logits):
        _, aux = sce.softmax_cross_entropy_with_integer_labels(
            logits,
            labels,
            implementation=implementation(impl_name, logits.dtype),
            return_aux=True,
            **options,
        )
        return jnp.sum(aux.entropy)

    got = jax.jit(jax.grad(entropy))(logits)
    want = numpy_reference.monitoring(
        np.asarray(logits, np.float64),
        np.asarray(labels),
        integer=True,
        coefficients={"entropy": np.ones(N)},
        **options,
    ).dlogits
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert np.abs(want).max() > 1e-2  # not a vacuous comparison


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_ignored_out_of_range_and_masked_examples(impl_name):
    """Ignored and fully masked examples: argmax -1, zeros, zero gradient; an out-of-range label:
    target_logprob NaN (like the loss), the other fields as for any example; a row whose valid
    logits are all -inf: lse -inf, argmax -1, max_prob and entropy 0."""
    logits, labels = make_case(integer=True, seed=4)
    logits = logits.at[3].set(-jnp.inf)
    labels = labels.at[0].set(-100).at[1].set(V + 3)
    where = np.ones((N, 1), bool)
    where[2] = False
    impl = implementation(impl_name, logits.dtype)

    def entropy_and_lse(logits):
        loss, aux = sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, where=where, ignore_index=-100, implementation=impl, return_aux=True
        )
        lse = jnp.where(jnp.arange(N) != 3, aux.lse, 0)
        return jnp.sum(aux.entropy + lse + aux.max_prob), (loss, aux)

    grads, (loss, aux) = jax.jit(jax.grad(entropy_and_lse, has_aux=True))(logits)
    assert aux.argmax[0] == -1 and aux.argmax[2] == -1 and aux.argmax[3] == -1
    for name in FIELDS:
        assert getattr(aux, name)[0] == 0 and getattr(aux, name)[2] == 0, name
    assert np.isnan(aux.target_logprob[1]) and np.isnan(loss[1])
    mon = numpy_reference.monitoring(
        np.asarray(logits, np.float64), np.asarray(labels) % V, integer=True
    )
    np.testing.assert_allclose(aux.entropy[1], mon.entropy[1], rtol=1e-5)
    assert int(aux.argmax[1]) == mon.argmax[1]
    assert aux.lse[3] == -np.inf and aux.max_prob[3] == 0 and aux.entropy[3] == 0
    np.testing.assert_array_equal(grads[jnp.array([0, 2, 3])], 0)
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_ties_give_the_lowest_index(impl_name):
    """Ties within a block and across blocks (columns 10, 70 and 150 lie in different blocks of
    every schedule here) keep the lowest class id."""
    logits = jnp.zeros((N, V), jnp.float32)
    logits = logits.at[0, jnp.array([150, 70, 10])].set(5.0)  # across blocks
    logits = logits.at[1, jnp.array([131, 130])].set(5.0)  # within one block
    logits = logits.at[2, jnp.array([199, 198])].set(5.0)  # in the ragged last block
    labels = jnp.zeros((N,), jnp.int32)
    _, aux = sce.softmax_cross_entropy_with_integer_labels(
        logits, labels, implementation=implementation(impl_name, logits.dtype), return_aux=True
    )
    np.testing.assert_array_equal(aux.argmax, [10, 130, 198, 0, 0, 0])
    np.testing.assert_allclose(aux.max_prob[0], np.exp(5) / (3 * np.exp(5) + V - 3), rtol=1e-6)


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_one_ulp_below_the_max_is_not_a_tie(impl_name):
    """A lower class one float32 ulp below the max, at magnitudes from 1e-30 (a difference near
    the smallest normal number) to 1e30, does not share the argmax."""
    tops = np.array([1e-30, 1.0, 3e4, 1e30, 7.0, 0.5], np.float32)
    logits = np.zeros((N, V), np.float32)
    logits[:, 10] = np.nextafter(tops, np.float32(-np.inf))
    logits[:, 150] = tops
    labels = jnp.zeros((N,), jnp.int32)
    _, aux = sce.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits),
        labels,
        implementation=implementation(impl_name, jnp.float32),
        return_aux=True,
    )
    np.testing.assert_array_equal(aux.argmax, np.argmax(logits, axis=1))
    assert (np.argmax(logits, axis=1) == 150).all()


def test_shapes_tuple_axis_batch_dims_and_reduction():
    """Per-example aux in the batch shape, whatever the reduction: a batch of two dims, and a
    tuple ``axis`` whose argmax is the flat index in the given axis order."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 4, 5, 6)) * 2, jnp.float32)  # classes: axes (3, 1)
    labels = jnp.asarray(rng.integers(0, 24, (3, 5)), jnp.int32)
    for impl in ("reference", "xla"):
        loss, aux = sce.softmax_cross_entropy_with_integer_labels(
            logits, labels, axis=(3, 1), reduction="mean", implementation=impl, return_aux=True
        )
        assert loss.shape == ()
        flat = jnp.transpose(logits, (0, 2, 3, 1)).reshape(15, 24)
        mon = numpy_reference.monitoring(
            np.asarray(flat, np.float64), np.asarray(labels).reshape(-1), integer=True
        )
        for name in ("lse", "argmax", *FIELDS[1:]):
            got = getattr(aux, name)
            assert got.shape == (3, 5), name
            np.testing.assert_allclose(got.reshape(-1), getattr(mon, name), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("impl_name", ["xla", "gpu"])
def test_vmap_and_jit(impl_name):
    logits, labels = make_case(integer=True, seed=6)
    batch = jnp.stack([logits, -logits])
    impl = implementation(impl_name, logits.dtype)

    def one(x):
        return sce.softmax_cross_entropy_with_integer_labels(
            x, labels, implementation=impl, return_aux=True
        )

    loss, aux = jax.jit(jax.vmap(one))(batch)
    assert loss.shape == (2, N) and aux.entropy.shape == (2, N) and aux.argmax.shape == (2, N)
    for k in range(2):
        mon = numpy_reference.monitoring(np.asarray(batch[k], np.float64), labels, integer=True)
        np.testing.assert_array_equal(aux.argmax[k], mon.argmax)
        np.testing.assert_allclose(aux.entropy[k], mon.entropy, rtol=2e-5)
    grads = jax.grad(lambda b: jnp.sum(jax.vmap(one)(b)[1].entropy))(batch)
    want = numpy_reference.monitoring(
        np.asarray(logits, np.float64), labels, integer=True, coefficients={"entropy": np.ones(N)}
    )
    np.testing.assert_allclose(grads[0], want.dlogits, rtol=2e-5, atol=2e-6)


def test_without_return_aux_nothing_changes():
    """``return_aux=True`` gives the same losses and, up to XLA's rounding of a differently
    fused backward, the same loss gradient. (That ``return_aux=False`` compiles to what it did
    before is checked on the compiled HLO, not here.)"""
    logits, labels = make_case(integer=True, seed=8)
    for impl in ("xla", implementation("gpu", jnp.float32)):

        def mean(x, aux, impl=impl):
            out = sce.softmax_cross_entropy_with_integer_labels(
                x, labels, implementation=impl, return_aux=aux, label_smoothing=0.1
            )
            return jnp.mean(out[0] if aux else out)

        plain = jax.jit(jax.value_and_grad(lambda x: mean(x, False)))(logits)
        with_aux = jax.jit(jax.value_and_grad(lambda x: mean(x, True)))(logits)
        np.testing.assert_array_equal(plain[0], with_aux[0])
        np.testing.assert_allclose(plain[1], with_aux[1], rtol=1e-6, atol=1e-8)


def test_aux_values_that_are_not_differentiated_cost_the_backward_nothing():
    """On the XLA path, where no aux value is differentiated (they are logged), the backward
    pass leaves their terms out (symbolic zeros): the gradient of the loss alone with
    ``return_aux=True`` and the aux values dropped compiles to the program without
    ``return_aux`` (XLA's cost analysis: the same flops and bytes; with their terms in the
    backward, their forward would be kept for it), the aux values logged cost less than the
    entropy differentiated too, and both gradients match float64."""
    logits, labels = make_case(integer=True, seed=9)

    def mean(x, aux, entropy=0.0):
        out = sce.softmax_cross_entropy_with_integer_labels(
            x, labels, implementation="xla", return_aux=aux, label_smoothing=0.1
        )
        if not aux:
            return jnp.mean(out)
        if not entropy:  # not even a zero times the entropy: its cotangent is then no symbolic 0
            return jnp.mean(out[0]), out[1]
        return jnp.mean(out[0]) + entropy * jnp.mean(out[1].entropy), out[1]

    def cost(f):
        analysis = jax.jit(jax.grad(f, has_aux=True)).lower(logits).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return {k: analysis[k] for k in ("flops", "bytes accessed")}

    plain = cost(lambda x: (mean(x, False), None))
    assert cost(lambda x: (mean(x, True)[0], None)) == plain  # the aux values dropped
    logged = cost(lambda x: mean(x, True))
    assert cost(lambda x: mean(x, True, entropy=0.5))["flops"] > logged["flops"]
    exact = np.asarray(logits, np.float64)
    for weight in (0.0, 0.5):
        grad, aux = jax.jit(jax.grad(lambda x, w=weight: mean(x, True, w), has_aux=True))(logits)
        ce = numpy_reference.cross_entropy(
            exact,
            np.asarray(labels),
            integer=True,
            label_smoothing=0.1,
            cotangent=np.full(N, 1 / N),
        )
        mon = numpy_reference.monitoring(
            exact,
            np.asarray(labels),
            integer=True,
            coefficients={"entropy": np.full(N, weight / N)},
        )
        np.testing.assert_allclose(grad, ce.dlogits + mon.dlogits, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(aux.entropy, mon.entropy, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------- fused loss

D = 5


def fused_case(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(V,)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    return x, w, b, y


def fused_implementation(name):
    if name in ("reference", "xla"):
        return name
    blocks = sce.BlockSizes(8, 128, 128) if name == "tpu" else sce.BlockSizes(16, 64, 16)
    return sce.Pallas(block_sizes=blocks, schedule=name, interpret=interpret(name))


@pytest.mark.parametrize(
    "impl_name, name",
    [
        (i, n)
        for i in IMPLEMENTATIONS
        for n in ("plain", "everything")
        if (i, n) != ("tpu", "plain")
    ],
)
def test_fused_loss(impl_name, name):
    x, w, b, y = fused_case()
    options = {}
    if name == "everything":
        options = dict(
            label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, ignore_index=-100, temperature=0.9
        )
        y = y.at[1].set(-100)
    c = coefficients(seed=9)
    impl = fused_implementation(impl_name)

    def f(x, w, b):
        loss, aux = sce.linear_softmax_cross_entropy(
            x, w, y, bias=b, implementation=impl, return_aux=True, **options
        )
        return objective(aux, loss, c, integer=True), aux

    grads, aux = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(x, w, b)
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    numpy_options = {k: v for k, v in options.items() if k not in ("label_smoothing", "z_loss")}
    mon = numpy_reference.monitoring(
        z, np.asarray(y), integer=True, coefficients={k: c[k] for k in FIELDS}, **numpy_options
    )
    ce = numpy_reference.cross_entropy(
        z, np.asarray(y), integer=True, cotangent=c["loss"], **options
    )
    np.testing.assert_array_equal(aux.argmax, mon.argmax)
    for field in FIELDS:
        np.testing.assert_allclose(getattr(aux, field), getattr(mon, field), rtol=2e-5, atol=2e-5)
    dz = ce.dlogits + mon.dlogits
    want = (dz @ np.asarray(w, np.float64).T, np.asarray(x, np.float64).T @ dz, dz.sum(0))
    for got, exact in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_fused_entropy_gradient_alone(impl_name):
    """With no loss term, rows whose loss cotangent is 0 still get the entropy's gradient (the
    fused loss must not drop them from the projection's gradient)."""
    x, w, _, y = fused_case(seed=1)

    def entropy(x, w):
        _, aux = sce.linear_softmax_cross_entropy(
            x, w, y, implementation=fused_implementation(impl_name), return_aux=True
        )
        return jnp.sum(aux.entropy)

    gx, gw = jax.jit(jax.grad(entropy, argnums=(0, 1)))(x, w)
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    dz = numpy_reference.monitoring(
        z, np.asarray(y), integer=True, coefficients={"entropy": np.ones(N)}
    ).dlogits
    np.testing.assert_allclose(gx, dz @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, np.asarray(x, np.float64).T @ dz, rtol=1e-4, atol=1e-5)
    assert np.abs(gw).max() > 1e-2


@pytest.mark.parametrize("impl_name", ["xla", "gpu"])
def test_grad_of_grad_matches_autodiff(impl_name):
    """Reverse over reverse through the auxiliary values' backward, against plain autodiff of
    ``implementation="reference"``."""
    logits, labels = make_case(integer=True, seed=10)
    logits, labels = logits[:, :70], labels % 70

    def gradient_norm(impl):
        def f(x):
            loss, aux = sce.softmax_cross_entropy_with_integer_labels(
                x, labels, implementation=impl, return_aux=True, logit_softcap=4.0
            )
            return jnp.sum(loss) + jnp.sum(aux.entropy) + jnp.sum(aux.max_prob + aux.lse)

        return jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2)))(logits)

    want = gradient_norm("reference")
    got = gradient_norm(implementation(impl_name, logits.dtype))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_inside_shard_map_and_with_sharded_inputs(impl_name, mesh):
    """Inside ``shard_map`` (rows split, a replicated array temperature whose gradient comes back
    summed), and, for ``"xla"``, logits sharded under ``jit``: values and gradients of the loss
    plus the entropy as unsharded."""
    spec = jax.sharding.PartitionSpec("d")
    rng = np.random.default_rng(14)
    logits = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 12, 8), jnp.int32)
    temperature = jnp.float32(1.3)
    impl = implementation(impl_name, logits.dtype)

    def objective_of(x, y, t):
        loss, aux = sce.softmax_cross_entropy_with_integer_labels(
            x, y, temperature=t, implementation=impl, return_aux=True
        )
        return jnp.sum(loss) + jnp.sum(aux.entropy), aux

    # As in test_pallas.py: Pallas' generic interpreter pads refs with an unvarying value, which
    # the varying-axes check rejects (with or without return_aux). Without the check, nothing
    # knows that the replicated temperature's gradient must be summed over the shards.
    check_vma = not (impl_name == "gpu" and interpret("gpu"))

    def per_shard(x, y, t):
        (value, aux), grads = jax.value_and_grad(objective_of, (0, 2), has_aux=True)(x, y, t)
        return jax.lax.psum(value, "d"), aux.argmax, *grads

    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(spec, spec, jax.sharding.PartitionSpec()),
            out_specs=(jax.sharding.PartitionSpec(), spec, spec, jax.sharding.PartitionSpec()),
            check_vma=check_vma,
        )
    )
    sharding = jax.sharding.NamedSharding(mesh, spec)
    value, argmax, d_logits, d_t = fn(
        jax.device_put(logits, sharding), jax.device_put(labels, sharding), temperature
    )
    exact = np.asarray(logits, np.float64)
    ce = numpy_reference.cross_entropy(exact, np.asarray(labels), integer=True, temperature=1.3)
    mon = numpy_reference.monitoring(
        exact,
        np.asarray(labels),
        integer=True,
        temperature=1.3,
        coefficients={"entropy": np.ones(8)},
    )
    np.testing.assert_allclose(value, ce.loss.sum() + mon.entropy.sum(), rtol=1e-6)
    np.testing.assert_array_equal(argmax, mon.argmax)
    np.testing.assert_allclose(d_logits, ce.dlogits + mon.dlogits, atol=2e-6)
    if check_vma:
        np.testing.assert_allclose(d_t, ce.dtemperature + mon.dtemperature, rtol=1e-5)
    if impl_name == "xla":
        for vocab in (False, True):
            placed = jax.sharding.PartitionSpec(None, "d") if vocab else spec
            x = jax.device_put(logits, jax.sharding.NamedSharding(mesh, placed))
            value, grad = jax.jit(
                jax.value_and_grad(lambda x: objective_of(x, labels, temperature)[0])
            )(x)
            np.testing.assert_allclose(value, ce.loss.sum() + mon.entropy.sum(), rtol=1e-6)
            np.testing.assert_allclose(grad, ce.dlogits + mon.dlogits, atol=2e-6)


def test_fused_xla_with_rows_sharded_over_an_explicit_mesh(mesh):
    """The fused loss's XLA loops under ``auto_axes`` (explicitly sharded rows) return the aux
    values sharded like the losses, and the same values and gradients as unsharded."""
    x, w, _, y = fused_case(seed=3)
    explicit = jax.make_mesh(
        mesh.axis_sizes, mesh.axis_names, axis_types=(jax.sharding.AxisType.Explicit,)
    )

    def f(x, w, y):
        loss, aux = sce.linear_softmax_cross_entropy(x, w, y, implementation="xla", return_aux=True)
        return jnp.sum(loss) + jnp.sum(aux.entropy), aux.argmax

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    rows = jax.sharding.PartitionSpec("d")
    n = len(mesh.devices.flat) * (N // len(mesh.devices.flat))
    with jax.set_mesh(explicit):
        (got, argmax), grads = fn(jax.device_put(x[:n], rows), w, jax.device_put(y[:n], rows))
    (want, want_argmax), want_grads = fn(x[:n], w, y[:n])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(argmax, want_argmax)
    for g, h in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("impl_name", IMPLEMENTATIONS)
def test_vocabulary_sharded_inside_shard_map(impl_name, integer, mesh):
    """With ``vocab_axis_name`` (the classes split over the mesh, 50 a device on four) the
    shards' statistics are combined: values and gradients as float64. Ties across shards keep
    the lowest global id (row 0: 10 and 60, row 2: 120 and 199), a max 40 above the rest in
    the last shard (row 3, its label) keeps its accuracy, an ignored example gets -1 and 0."""
    logits, labels = make_case(integer=integer, seed=12)
    logits = logits.at[0, jnp.array([60, 10])].set(12.0).at[2, jnp.array([199, 120])].set(12.0)
    logits = logits.at[3, V - 1].set(40.0)
    options = dict(label_smoothing=0.1, logit_softcap=30.0)
    if integer:
        labels = labels.at[3].set(V - 1).at[1].set(-100)
        options["ignore_index"] = -100
    c = coefficients()
    impl = implementation(impl_name, logits.dtype)
    fn = loss_fn(integer)

    def per_shard(x, y):
        def f(x):
            loss, aux = fn(
                x, y, implementation=impl, return_aux=True, vocab_axis_name="d", **options
            )
            return objective(aux, loss, c, integer=integer), (loss, aux)

        (_, out), grad = jax.value_and_grad(f, has_aux=True)(x)
        return out, grad

    whole, cols = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(None, "d")
    aux_specs = sce.CrossEntropyAux(whole, whole, whole, whole, whole if integer else None)
    sharded = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=(cols, whole if integer else cols),
            out_specs=((whole, aux_specs), cols),
            # as in test_inside_shard_map_and_with_sharded_inputs
            check_vma=not (impl_name == "gpu" and interpret("gpu")),
        )
    )
    placed = jax.sharding.NamedSharding(mesh, cols)
    (loss, aux), grad = sharded(
        jax.device_put(logits, placed), labels if integer else jax.device_put(labels, placed)
    )
    exact = np.asarray(logits, np.float64)
    ce = numpy_reference.cross_entropy(
        exact, np.asarray(labels), integer=integer, cotangent=c["loss"], **options
    )
    mon = numpy_reference.monitoring(
        exact,
        np.asarray(labels),
        integer=integer,
        coefficients={k: c[k] for k in FIELDS},
        **{k: v for k, v in options.items() if k != "label_smoothing"},
    )
    check(loss, aux, (grad,), ce, mon, integer=integer)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    if len(mesh.devices.flat) > 1:
        assert aux.argmax[0] == 10 and aux.argmax[2] == 120 and aux.argmax[3] == V - 1
    if integer:
        assert aux.argmax[1] == -1 and aux.entropy[1] == 0 and not np.any(grad[1])
