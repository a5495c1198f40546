"""The sharding checks, run on 8 host devices in a process of their own.

    PYTHONPATH=. python tests/_sharded.py [CHECK ...]      # every check without names

The other test modules run in pytest processes whose CPU backend has 4 devices (tests/conftest.py),
and a backend's device count is fixed once it starts, so `tests/test_sharding.py` runs this script
in a subprocess and reads its report: one JSON line per check, ``{"check", "ok", "error"}``. The
mesh is ``(2, 4)`` named ``("data", "model")``; shapes are small (16 rows by 64 classes per
device at most) so that the whole script runs in about a minute on two cores.

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
