"""The sharding checks, run on 8 host devices in a process of their own.

    PYTHONPATH=. python tests/_sharded.py [CHECK ...]      # every check without names

The other test modules run in pytest processes whose CPU backend has 4 devices (tests/conftest.py),
and a backend's device count is fixed once it starts, so `tests/test_sharding.py` runs this script
in a subprocess and reads its report: one JSON line per check, ``{"check", "ok", "error"}``. The
mesh is ``(2, 4)`` named ``("data", "model")``; shapes are small (16 rows by 64 classes per
device at most) so that the whole script runs in about three minutes on two cores.

Each check compares values and gradients with the unsharded call and with the float64 NumPy
reference (`numpy_reference`), and reads the compiled HLO (`benchmarks.collectives`): no
all-gather may produce an array as large as a logits shard times the model axis.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import re
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_softmax_ce as sce
from benchmarks import collectives

MESH_SHAPE = (2, 4)
AXES = ("data", "model")
N, V = 32, 256  # 16 rows by 64 classes per device under P("data", "model")
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def mesh(axis_type=jax.sharding.AxisType.Auto):
    return jax.make_mesh(MESH_SHAPE, AXES, axis_types=(axis_type,) * len(AXES))


def f64(x):
    return np.asarray(x, np.float64)


def data(seed=0, n=N, v=V):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3.0 * rng.normal(size=(n, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return logits, labels


def no_logits_gather(compiled, shard_elements: int) -> None:
    """Fails where an all-gather of ``compiled`` produces an array of at least a logits shard
    times the model axis (``shard_elements * 4``) elements."""
    limit = shard_elements * MESH_SHAPE[1]
    largest = collectives.largest_gather(compiled.as_text(), int(np.prod(MESH_SHAPE)))
    assert largest < limit, f"an all-gather of {largest} elements (a logits shard is {limit})"


SPECS = {"rows": P("data", None), "vocab": P(None, "model"), "both": P("data", "model")}


def logits_loss(implementation, **options):
    def loss(x, y):
        return sce.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="sum", implementation=implementation, **options
        )

    return jax.value_and_grad(loss)


def jit_case(implementation, spec_name):
    m = mesh()
    spec = SPECS[spec_name]
    logits, labels = data(seed=1)
    fn = jax.jit(logits_loss(implementation, label_smoothing=0.1, z_loss=1e-3))
    sharded = jax.device_put(logits, NamedSharding(m, spec))
    y = jax.device_put(labels, NamedSharding(m, P(spec[0])))
    value, grad = fn(sharded, y)
    want_value, want_grad = jax.jit(logits_loss("xla", label_smoothing=0.1, z_loss=1e-3))(
        logits, labels
    )
    ref = numpy_reference.cross_entropy(
        f64(logits), f64(labels), integer=True, label_smoothing=0.1, z_loss=1e-3
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(value, ref.loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(f64(grad), f64(want_grad), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f64(grad), ref.dlogits, rtol=1e-4, atol=1e-6)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert grad.sharding.is_equivalent_to(sharded.sharding, 2), (grad.sharding, spec)
    shard = int(np.prod(sharded.sharding.shard_shape(logits.shape)))
    no_logits_gather(fn.lower(sharded, y).compile(), shard)


for _impl in ("xla", None, "pallas"):
    for _spec in SPECS:
        _name = f"jit_{_impl or 'auto'}_{_spec}"
        CHECKS[_name] = functools.partial(jit_case, _impl, _spec)


def jit_probabilities_case(implementation, spec_name):
    """Probability labels sharded like the logits under jit (they are not class ids: only
    integer labels move to a shard's ids): values and gradients as float64."""
    m = mesh()
    spec = SPECS[spec_name]
    logits, _ = data(seed=12)
    rng = np.random.default_rng(13)
    labels = jax.nn.softmax(jnp.asarray(2.0 * rng.normal(size=logits.shape), jnp.float32))

    def loss(x, y):
        return sce.softmax_cross_entropy(
            x, y, label_smoothing=0.1, reduction="sum", implementation=implementation
        )

    fn = jax.jit(jax.value_and_grad(loss))
    x = jax.device_put(logits, NamedSharding(m, spec))
    value, grad = fn(x, jax.device_put(labels, NamedSharding(m, spec)))
    ref = numpy_reference.cross_entropy(
        f64(logits), f64(labels), integer=False, label_smoothing=0.1
    )
    np.testing.assert_allclose(value, ref.loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(f64(grad), ref.dlogits, rtol=1e-4, atol=1e-6)
    assert grad.dtype == logits.dtype and grad.sharding.is_equivalent_to(x.sharding, 2)


for _spec in ("vocab", "both"):
    CHECKS[f"jit_pallas_{_spec}_probabilities"] = functools.partial(
        jit_probabilities_case, "pallas", _spec
    )


OPTION_SETS = {
    "plain": {},
    "options": dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=20.0, temperature=1.3),
    "masked": dict(label_smoothing=0.2, ignore_index=3),
}


def vocab_parallel_case(implementation, option_set, integer=True):
    """Inside shard_map over the whole mesh: rows over "data", classes over "model" with
    ``vocab_axis_name="model"``; class weights and a class mask sliced like the logits, an
    array temperature replicated (its gradient summed over every shard)."""
    m = mesh()
    options = dict(OPTION_SETS[option_set])
    logits, labels = data(seed=2)
    rng = np.random.default_rng(3)
    if not integer:
        labels = jax.nn.softmax(jnp.asarray(rng.normal(size=logits.shape), jnp.float32))
    class_weights = jnp.asarray(rng.uniform(0.5, 2.0, V), jnp.float32)
    where = jnp.asarray(rng.uniform(size=(1, V)) > 0.1)
    if integer:  # no label on a masked class (an infinite loss)
        where = where.at[0, labels].set(True)
    if option_set == "masked":
        labels = labels.at[:4].set(3) if integer else labels
        options["where"] = where
    temperature = jnp.asarray(options.pop("temperature", 1.0), jnp.float32)
    loss_fn = (
        sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
    )
    if not integer:
        options.pop("ignore_index", None)

    masked = options.pop("where", None) is not None

    def total(x, y, w, t, vocab_axis=None, where=None):
        return loss_fn(
            x,
            y,
            class_weights=w,
            temperature=t,
            reduction="sum",
            implementation=implementation,
            vocab_axis_name=vocab_axis,
            where=where if masked else None,
            **options,
        )

    grad_fn = jax.value_and_grad(total, argnums=(0, 3))
    row, cls = P("data", "model"), P("model")
    label_spec = P("data") if integer else row

    def per_shard(x, y, w, t, where):
        value, (dx, dt) = grad_fn(x, y, w, t, "model", where=where)
        # With check_vma the replicated temperature's gradient comes back summed over every
        # shard; without, as JAX's autodiff gives it too, over the vocabulary axis only.
        return jax.lax.psum(value, "data"), dx, dt if check_vma else jax.lax.psum(dt, "data")

    # The interpreter of the GPU schedule fails check_vma (see tests/test_pallas.py); the
    # reference differentiates through psum and needs it.
    check_vma = implementation != "pallas"
    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=m,
            in_specs=(row, label_spec, cls, P(), P(None, "model")),
            out_specs=(P(), row, P()),
            check_vma=check_vma,
        )
    )
    value, dx, dt = fn(logits, labels, class_weights, temperature, where)
    want_value, (want_dx, want_dt) = jax.jit(grad_fn)(
        logits, labels, class_weights, temperature, where=where
    )
    ref = numpy_reference.cross_entropy(
        f64(logits),
        f64(labels),
        integer=integer,
        where=np.broadcast_to(np.asarray(where), logits.shape) if masked else None,
        class_weights=f64(class_weights),
        temperature=float(temperature),
        **options,
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(value, ref.loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(f64(dx), f64(want_dx), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(dx), ref.dlogits, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dt, want_dt, rtol=1e-4)
    np.testing.assert_allclose(dt, ref.dtemperature, rtol=1e-4)
    assert dx.dtype == logits.dtype and dx.shape == logits.shape


for _impl in ("xla", "pallas", "reference"):
    for _set in OPTION_SETS:
        CHECKS[f"vocab_parallel_{_impl}_{_set}"] = functools.partial(
            vocab_parallel_case, _impl, _set
        )
    CHECKS[f"vocab_parallel_{_impl}_probabilities"] = functools.partial(
        vocab_parallel_case, _impl, "options", integer=False
    )


def fused_vocab_parallel_case(implementation, vd=False):
    """The fused loss inside shard_map: inputs over "data", the projection's classes over
    "model" with ``vocab_axis_name="model"``."""
    m = mesh()
    rng = np.random.default_rng(4)
    d = 16
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, V)) / 2.0, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    class_weights = jnp.asarray(rng.uniform(0.5, 2.0, V), jnp.float32)
    options = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=20.0, reduction="sum")
    weight = w.T if vd else w
    layout = "vd" if vd else "dv"

    def total(x, w, y, cw, vocab_axis=None):
        return sce.linear_softmax_cross_entropy(
            x,
            w,
            y,
            class_weights=cw,
            implementation=implementation,
            weight_layout=layout,
            vocab_axis_name=vocab_axis,
            **options,
        )

    grad_fn = jax.value_and_grad(total, argnums=(0, 1))
    check_vma = implementation != "pallas"

    def per_shard(x, w, y, cw):
        value, (dx, dw) = grad_fn(x, w, y, cw, "model")
        if not check_vma:  # the projection's gradient, summed over the rows' shards
            dw = jax.lax.psum(dw, "data")
        return jax.lax.psum(value, "data"), dx, dw

    w_spec = P("model", None) if vd else P(None, "model")
    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=m,
            in_specs=(P("data", None), w_spec, P("data"), P("model")),
            out_specs=(P(), P("data", None), w_spec),
            check_vma=check_vma,
        )
    )
    value, dx, dw = fn(x, weight, labels, class_weights)
    want_value, (want_dx, want_dw) = jax.jit(grad_fn)(x, weight, labels, class_weights)
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    ref = numpy_reference.cross_entropy(
        logits,
        f64(labels),
        integer=True,
        class_weights=f64(class_weights),
        label_smoothing=0.1,
        z_loss=1e-3,
        logit_softcap=20.0,
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(value, ref.loss.sum(), rtol=1e-4)
    np.testing.assert_allclose(f64(dx), f64(want_dx), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f64(dw), f64(want_dw), rtol=1e-4, atol=1e-5)
    ref_dw = np.asarray(x, np.float64).T @ ref.dlogits
    np.testing.assert_allclose(f64(dw), ref_dw.T if vd else ref_dw, rtol=1e-3, atol=1e-4)
    assert dx.dtype == x.dtype and dw.shape == weight.shape


for _impl in ("xla", "pallas", "reference"):
    CHECKS[f"fused_vocab_parallel_{_impl}"] = functools.partial(fused_vocab_parallel_case, _impl)
CHECKS["fused_vocab_parallel_xla_vd"] = functools.partial(fused_vocab_parallel_case, "xla", True)


def explicit_case(implementation, spec_name):
    """An explicit-axis mesh under jit: values and gradients as unsharded, the gradient's type
    sharded like the logits."""
    m = mesh(jax.sharding.AxisType.Explicit)
    spec = SPECS[spec_name]
    logits, labels = data(seed=5)
    fn = jax.jit(logits_loss(implementation, label_smoothing=0.1))
    want_value, want_grad = jax.jit(logits_loss("xla", label_smoothing=0.1))(logits, labels)
    with jax.sharding.use_mesh(m) if hasattr(jax.sharding, "use_mesh") else jax.set_mesh(m):
        x = jax.device_put(logits, NamedSharding(m, spec))
        y = jax.device_put(labels, NamedSharding(m, P(spec[0])))
        value, grad = fn(x, y)
        assert jax.typeof(grad).sharding.spec == spec, jax.typeof(grad).sharding
        shard = int(np.prod(x.sharding.shard_shape(logits.shape)))
        no_logits_gather(fn.lower(x, y).compile(), shard)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(f64(grad), f64(want_grad), rtol=1e-5, atol=1e-7)


for _impl in ("xla", "pallas", "reference"):
    for _spec in SPECS:
        CHECKS[f"explicit_{_impl}_{_spec}"] = functools.partial(explicit_case, _impl, _spec)


def fused_jit_case(implementation, vd=False, explicit=False):
    """The fused loss under jit: inputs over "data", the projection's classes over "model"."""
    m = mesh(jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto)
    rng = np.random.default_rng(6)
    d = 16
    x = jnp.asarray(rng.normal(size=(N, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(V, d) if vd else (d, V)) / 2.0, jnp.float32)
    labels = jnp.asarray(rng.integers(0, V, N), jnp.int32)

    def loss(implementation):
        return jax.value_and_grad(
            lambda x, w, y: sce.linear_softmax_cross_entropy(
                x,
                w,
                y,
                label_smoothing=0.1,
                z_loss=1e-3,
                reduction="sum",
                implementation=implementation,
                weight_layout="vd" if vd else "dv",
            ),
            argnums=(0, 1),
        )

    fn = jax.jit(loss(implementation))
    want_value, (want_dx, want_dw) = jax.jit(loss("xla"))(x, w, labels)
    w_spec = P("model", None) if vd else P(None, "model")
    context = jax.set_mesh(m) if explicit else contextlib.nullcontext()
    with context:
        xs = jax.device_put(x, NamedSharding(m, P("data", None)))
        ws = jax.device_put(w, NamedSharding(m, w_spec))
        ys = jax.device_put(labels, NamedSharding(m, P("data")))
        value, (dx, dw) = fn(xs, ws, ys)
        compiled = fn.lower(xs, ws, ys).compile()
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(f64(dx), f64(want_dx), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f64(dw), f64(want_dw), rtol=1e-4, atol=1e-5)
    assert dx.sharding.is_equivalent_to(xs.sharding, 2), dx.sharding
    assert dw.sharding.is_equivalent_to(ws.sharding, 2), dw.sharding
    # Neither the projection nor a logits-sized array is gathered.
    no_logits_gather(compiled, min(w.size, (N // 2) * (V // 4) * 4) // 4)


# Blocks smaller than a shard's classes, so that the loops and kernels walk the vocabulary.
FUSED = {
    "xla": sce.Xla(block_sizes=sce.BlockSizes(16, 32)),
    "pallas": sce.Pallas(block_sizes=sce.BlockSizes(16, 32, 16)),
}
FUSED["reference"] = "reference"
for _impl, _config in FUSED.items():
    CHECKS[f"fused_jit_{_impl}"] = functools.partial(fused_jit_case, _config)
    CHECKS[f"fused_jit_{_impl}_vd"] = functools.partial(fused_jit_case, _config, True)
    CHECKS[f"fused_explicit_{_impl}"] = functools.partial(fused_jit_case, _config, explicit=True)


# ------------------------------------------------------------- return_aux, classes sharded

AUX_FIELDS = ("lse", "max_prob", "entropy", "target_logprob")


def aux_data(integer: bool):
    """Logits and labels whose rows meet the cross-shard rules of the monitoring statistics
    (4 shards of 64 classes): row 0's max is in shards 1 and 2 (classes 70 and 130: argmax 70),
    row 1's in shards 0 and 3 (3 and 200: argmax 3), row 17's (the other rows' shard) in
    shards 2 and 1 (150 and 100: argmax 100), row 2's far above the rest in the last shard
    (class 250, a confident row, its label); rows 4 and 5 ignored (integer labels)."""
    logits, labels = data(seed=8)
    logits = (
        logits.at[0, jnp.array([70, 130])]
        .set(12.0)
        .at[1, jnp.array([3, 200])]
        .set(12.0)
        .at[17, jnp.array([150, 100])]
        .set(12.0)
        .at[2, 250]
        .set(40.0)
    )
    if integer:
        labels = labels.at[2].set(250).at[1].set(200).at[jnp.array([4, 5])].set(-100)
    else:
        rng = np.random.default_rng(9)
        labels = jax.nn.softmax(jnp.asarray(2.0 * rng.normal(size=(N, V)), jnp.float32))
    return logits, labels


def aux_coefficients(n=N):
    """``[5, n]`` per-example cotangents of the loss and of each float aux field."""
    return jnp.asarray(np.random.default_rng(10).normal(size=(5, n)), jnp.float32)


def aux_objective(loss, aux, c, integer: bool):
    """``sum_i c_0 loss_i + c_1 lse_i + c_2 max_prob_i + c_3 entropy_i (+ c_4 target_logprob_i)``
    over this device's rows."""
    total = jnp.sum(c[0] * loss)
    for k, name in enumerate(AUX_FIELDS[: 4 if integer else 3], start=1):
        total = total + jnp.sum(c[k] * getattr(aux, name))
    return total


def aux_reference(z, labels, c, integer: bool, options: dict):
    """``(ce, mon)``: the float64 loss and aux values and their gradients of `aux_objective`
    for the ``[N, V]`` logits ``z``."""
    labels = np.asarray(labels, np.float64 if not integer else np.int64)
    c = f64(c)
    ce = numpy_reference.cross_entropy(z, labels, integer=integer, cotangent=c[0], **options)
    mon_options = {
        k: v for k, v in options.items() if k in ("logit_softcap", "temperature", "ignore_index")
    }
    mon = numpy_reference.monitoring(
        z,
        labels,
        integer=integer,
        coefficients=dict(zip(AUX_FIELDS, c[1:], strict=False)),
        **mon_options,
    )
    return ce, mon


def check_aux_values(loss, aux, ce, mon, integer: bool, dtype=jnp.float32):
    """The losses and every aux field against float64, with their dtypes and shapes; the
    argmax exactly (ties across shards at the lower global id)."""
    n = len(mon.argmax)
    assert aux.argmax.dtype == jnp.int32 and aux.argmax.shape == (n,), aux.argmax
    np.testing.assert_array_equal(aux.argmax, mon.argmax)
    assert loss.dtype == dtype and loss.shape == (n,)
    np.testing.assert_allclose(f64(loss), ce.loss, rtol=2e-5, atol=2e-5)
    for name in AUX_FIELDS:
        got, want = getattr(aux, name), getattr(mon, name)
        if not integer and name == "target_logprob":
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == (n,), (name, got.dtype, got.shape)
        np.testing.assert_allclose(f64(got), want, rtol=2e-5, atol=2e-5, err_msg=name)


AUX_OPTIONS = {
    True: dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=30.0, ignore_index=-100),
    False: dict(label_smoothing=0.1, logit_softcap=30.0),
}


def aux_vocab_parallel_case(implementation, integer=True):
    """``return_aux`` inside shard_map with ``vocab_axis_name="model"`` (rows over "data"), an
    array temperature replicated: values, and the gradients of a combination of the loss and
    every float aux field with respect to the logits and the temperature, against float64
    and the unsharded call."""
    m = mesh()
    logits, labels = aux_data(integer)
    options = AUX_OPTIONS[integer]
    c = aux_coefficients()
    temperature = jnp.float32(1.3)
    loss_fn = (
        sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
    )

    def objective(x, y, c, t, vocab_axis=None):
        loss, aux = loss_fn(
            x,
            y,
            temperature=t,
            implementation=implementation,
            return_aux=True,
            vocab_axis_name=vocab_axis,
            **options,
        )
        return aux_objective(loss, aux, c, integer), (loss, aux)

    grad_fn = jax.value_and_grad(objective, argnums=(0, 3), has_aux=True)
    check_vma = implementation != "pallas"  # as in vocab_parallel_case

    def per_shard(x, y, c, t):
        (value, (loss, aux)), (dx, dt) = grad_fn(x, y, c, t, "model")
        return (
            jax.lax.psum(value, "data"),
            loss,
            aux,
            dx,
            dt if check_vma else jax.lax.psum(dt, "data"),
        )

    rows = P("data")
    aux_specs = sce.CrossEntropyAux(rows, rows, rows, rows, rows if integer else None)
    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=m,
            in_specs=(
                P("data", "model"),
                rows if integer else P("data", "model"),
                P(None, "data"),
                P(),
            ),
            out_specs=(P(), rows, aux_specs, P("data", "model"), P()),
            check_vma=check_vma,
        )
    )
    value, loss, aux, dx, dt = fn(logits, labels, c, temperature)
    (want_value, (want_loss, want_aux)), (want_dx, want_dt) = jax.jit(grad_fn)(
        logits, labels, c, temperature
    )
    ce, mon = aux_reference(f64(logits), labels, c, integer, dict(options, temperature=1.3))
    check_aux_values(loss, aux, ce, mon, integer)
    np.testing.assert_array_equal(aux.argmax, want_aux.argmax)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(f64(dx), f64(want_dx), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(dx), ce.dlogits + mon.dlogits, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dt, ce.dtemperature + mon.dtemperature, rtol=1e-4)
    np.testing.assert_allclose(dt, want_dt, rtol=1e-4)
    assert dx.dtype == logits.dtype and dx.shape == logits.shape
    if integer:
        assert list(np.asarray(aux.argmax)[[0, 1, 17, 2, 4, 5]]) == [70, 3, 100, 250, -1, -1]
        assert aux.lse[4] == 0 and aux.entropy[4] == 0 and aux.target_logprob[4] == 0
        assert not np.any(np.asarray(dx)[[4, 5]])


for _impl in ("xla", "pallas", "reference"):
    CHECKS[f"aux_vocab_parallel_{_impl}"] = functools.partial(aux_vocab_parallel_case, _impl)
    CHECKS[f"aux_vocab_parallel_{_impl}_probabilities"] = functools.partial(
        aux_vocab_parallel_case, _impl, integer=False
    )


def aux_jit_case(implementation, spec_name, integer=True):
    """``return_aux`` under jit with the classes sharded (``P(None, "model")``, or rows and
    classes): values and gradients against float64, the gradient sharded like the logits, and
    no logits-sized gather."""
    m = mesh()
    spec = SPECS[spec_name]
    logits, labels = aux_data(integer)
    options = AUX_OPTIONS[integer]
    c = aux_coefficients()
    loss_fn = (
        sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
    )

    def objective(x, y):
        loss, aux = loss_fn(x, y, implementation=implementation, return_aux=True, **options)
        return aux_objective(loss, aux, c, integer), (loss, aux)

    fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    x = jax.device_put(logits, NamedSharding(m, spec))
    y = jax.device_put(labels, NamedSharding(m, P(spec[0]) if integer else spec))
    (_, (loss, aux)), grad = fn(x, y)
    ce, mon = aux_reference(f64(logits), labels, c, integer, options)
    check_aux_values(loss, aux, ce, mon, integer)
    np.testing.assert_allclose(f64(grad), ce.dlogits + mon.dlogits, rtol=1e-4, atol=1e-6)
    assert grad.dtype == logits.dtype and grad.sharding.is_equivalent_to(x.sharding, 2)
    no_logits_gather(fn.lower(x, y).compile(), int(np.prod(x.sharding.shard_shape(x.shape))))


for _impl in ("xla", "pallas", "reference"):
    CHECKS[f"aux_jit_{_impl}_vocab"] = functools.partial(aux_jit_case, _impl, "vocab")
CHECKS["aux_jit_pallas_both"] = functools.partial(aux_jit_case, "pallas", "both")
CHECKS["aux_jit_pallas_vocab_probabilities"] = functools.partial(
    aux_jit_case, "pallas", "vocab", integer=False
)


def aux_fused_data(d=16):
    """Inputs, a ``[D, V]`` projection and labels: columns 70 and 130 equal and made the max
    of row 0 (argmax 70, across shards), column 250 (the last shard) that of row 1, its label;
    rows 2 and 3 ignored."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(N, d))
    w = rng.normal(size=(d, V)) / 2.0
    w[:, 70] = w[:, 130] = 3.0 * x[0] / np.linalg.norm(x[0])
    w[:, 250] = 3.0 * x[1] / np.linalg.norm(x[1])
    labels = rng.integers(0, V, N)
    labels[1], labels[2], labels[3] = 250, -100, -100
    return (
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(labels, jnp.int32),
    )


FUSED_AUX_OPTIONS = dict(label_smoothing=0.1, logit_softcap=30.0, ignore_index=-100)


def check_fused_aux(x, w, labels, c, loss, aux, dx, dw):
    """The fused loss's values and its inputs' and projection's gradients against float64."""
    x64, w64 = f64(x), f64(w)
    ce, mon = aux_reference(x64 @ w64, labels, c, True, FUSED_AUX_OPTIONS)
    check_aux_values(loss, aux, ce, mon, True)
    assert list(np.asarray(aux.argmax)[:4]) == [70, 250, -1, -1], aux.argmax
    dz = ce.dlogits + mon.dlogits
    np.testing.assert_allclose(f64(dx), dz @ w64.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f64(dw), x64.T @ dz, rtol=1e-4, atol=1e-5)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert dw.dtype == w.dtype and dw.shape == w.shape


def fused_aux_objective(implementation, c, vocab_axis=None):
    def objective(x, w, y, c=c):
        loss, aux = sce.linear_softmax_cross_entropy(
            x,
            w,
            y,
            implementation=implementation,
            return_aux=True,
            vocab_axis_name=vocab_axis,
            **FUSED_AUX_OPTIONS,
        )
        return aux_objective(loss, aux, c, True), (loss, aux)

    return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)


def aux_fused_vocab_parallel_case(name):
    """The fused loss's ``return_aux`` inside shard_map with ``vocab_axis_name="model"``."""
    m = mesh()
    x, w, labels = aux_fused_data()
    c = aux_coefficients()
    implementation = FUSED[name]
    check_vma = name != "pallas"

    def per_shard(x, w, y, c):
        (_, (loss, aux)), (dx, dw) = fused_aux_objective(implementation, c, "model")(x, w, y)
        return loss, aux, dx, dw if check_vma else jax.lax.psum(dw, "data")

    rows = P("data")
    fn = jax.jit(
        jax.shard_map(
            per_shard,
            mesh=m,
            in_specs=(P("data", None), P(None, "model"), rows, P(None, "data")),
            out_specs=(
                rows,
                sce.CrossEntropyAux(rows, rows, rows, rows, rows),
                P("data", None),
                P(None, "model"),
            ),
            check_vma=check_vma,
        )
    )
    loss, aux, dx, dw = fn(x, w, labels, c)
    check_fused_aux(x, w, labels, c, loss, aux, dx, dw)


for _impl in ("xla", "pallas", "reference"):
    CHECKS[f"aux_fused_vocab_parallel_{_impl}"] = functools.partial(
        aux_fused_vocab_parallel_case, _impl
    )


def aux_fused_jit_case(implementation, explicit):
    """The fused loss's ``return_aux`` under jit, the projection's classes sharded over
    "model" (explicit axes: ``"xla"``'s loops per device; automatic: ``"pallas"``'s rule, and
    ``"xla"``'s loops in groups that XLA's partitioner splits)."""
    m = mesh(jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto)
    x, w, labels = aux_fused_data()
    c = aux_coefficients()
    fn = jax.jit(fused_aux_objective(implementation, c))
    context = jax.set_mesh(m) if explicit else contextlib.nullcontext()
    with context:
        xs = jax.device_put(x, NamedSharding(m, P("data", None)))
        ws = jax.device_put(w, NamedSharding(m, P(None, "model")))
        ys = jax.device_put(labels, NamedSharding(m, P("data")))
        (_, (loss, aux)), (dx, dw) = fn(xs, ws, ys)
        compiled = fn.lower(xs, ws, ys).compile()
    check_fused_aux(x, w, labels, c, loss, aux, dx, dw)
    assert dw.sharding.is_equivalent_to(ws.sharding, 2), dw.sharding
    no_logits_gather(compiled, min(w.size, (N // 2) * (V // 4) * 4) // 4)


CHECKS["aux_fused_explicit_xla"] = functools.partial(aux_fused_jit_case, FUSED["xla"], True)
CHECKS["aux_fused_explicit_pallas"] = functools.partial(aux_fused_jit_case, FUSED["pallas"], True)
CHECKS["aux_fused_jit_pallas"] = functools.partial(aux_fused_jit_case, FUSED["pallas"], False)
CHECKS["aux_fused_jit_xla"] = functools.partial(aux_fused_jit_case, FUSED["xla"], False)


@check
def readme_sharded_training():
    """The README's "Sharded training" examples run, on this (2, 4) mesh (all but the
    multi-host start, which needs a cluster)."""
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Sharded training", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    scope = {}
    for block in blocks:
        if "jax.distributed.initialize" not in block:
            exec(compile(block, "README.md", "exec"), scope)
    assert jax.typeof(scope["grad"]).shape == (64, 1024)
    assert scope["grad"].sharding.is_equivalent_to(scope["logits"].sharding, 2)
    want = jax.value_and_grad(
        lambda x: sce.softmax_cross_entropy_with_integer_labels(
            x, scope["labels"], reduction="mean"
        )
    )(np.asarray(scope["logits"]))
    np.testing.assert_allclose(scope["loss"], want[0], rtol=1e-6)
    np.testing.assert_allclose(scope["grad"], want[1], rtol=1e-5, atol=1e-8)
    want_total = sce.linear_softmax_cross_entropy(
        np.asarray(scope["hidden"]), np.asarray(scope["weight"]), scope["labels"], reduction="sum"
    )
    np.testing.assert_allclose(scope["total"], want_total, rtol=1e-5)
    assert scope["d_weight"].shape == (256, 1024)


def run(names) -> int:
    failures = 0
    for name in names:
        try:
            CHECKS[name]()
            result = {"check": name, "ok": True, "error": None}
        except Exception:
            failures += 1
            result = {"check": name, "ok": False, "error": traceback.format_exc()}
        print(json.dumps(result), flush=True)
    return failures


def configure() -> None:
    """8 host devices, and the settings of tests/conftest.py; before the backend starts."""
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_dtype_promotion", "strict")


if __name__ == "__main__":
    configure()
    sys.exit(1 if run(sys.argv[1:] or list(CHECKS)) else 0)
