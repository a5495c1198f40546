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

import functools
import json
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


for _impl in ("xla", None):
    for _spec in SPECS:
        _name = f"jit_{_impl or 'auto'}_{_spec}"
        CHECKS[_name] = functools.partial(jit_case, _impl, _spec)


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
