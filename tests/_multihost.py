"""The README's multi-host recipe, run as two processes of this host.

    PYTHONPATH=.:tests python tests/_multihost.py PROCESS_ID PORT     # PROCESS_ID 0 and 1

`tests/test_sharding.py::test_two_processes_as_the_readme_says` starts both. Each process has 4
CPU devices; `jax.distributed.initialize` (gloo collectives on the CPU) joins them in one mesh
``(jax.process_count(), jax.local_device_count())`` named ``("data", "model")``, so the rows are
split across the processes and the classes within each, and each process places only its own
rows with `jax.make_array_from_process_local_data`, as the README says. Checked against the
float64 NumPy reference (values, and gradients gathered from both processes):

- the logits loss under ``jit`` with ``P("data", "model")`` logits, for ``"xla"``,
  ``"pallas"`` and the automatic choice;
- the fused loss inside ``shard_map`` with ``vocab_axis_name="model"`` (the README's example).

Prints one JSON line, ``{"process", "errors"}``: each check's error, or None where it passed.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import numpy as np
import numpy_reference
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_softmax_ce as sce

N, V, D = 16, 64, 32
RNG = np.random.default_rng(0)
LOGITS = (3.0 * RNG.normal(size=(N, V))).astype(np.float32)
LABELS = RNG.integers(0, V, N).astype(np.int32)
HIDDEN = RNG.normal(size=(N, D)).astype(np.float32)
WEIGHT = (RNG.normal(size=(D, V)) / 4).astype(np.float32)


def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.process_count(), jax.local_device_count()), ("data", "model"))


def local(array: np.ndarray, spec: P) -> jax.Array:
    """The global array from this process's rows (all of it where ``spec`` splits no rows)."""
    process = jax.process_index()
    rows = array[process * N // 2 : (process + 1) * N // 2] if spec[0] == "data" else array
    return jax.make_array_from_process_local_data(NamedSharding(mesh(), spec), rows, array.shape)


def gathered(x: jax.Array) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)


def logits_loss(implementation):
    @jax.jit
    def step(x, y):
        def loss(x):
            return sce.softmax_cross_entropy_with_integer_labels(
                x, y, reduction="mean", implementation=implementation
            )

        return jax.value_and_grad(loss)(x)

    value, grad = step(local(LOGITS, P("data", "model")), local(LABELS, P("data")))
    want = numpy_reference.cross_entropy(LOGITS, LABELS, integer=True)
    np.testing.assert_allclose(float(value), want.loss.mean(), rtol=1e-5)
    np.testing.assert_allclose(gathered(grad), want.dlogits / N, rtol=1e-5, atol=1e-7)
    assert grad.sharding.spec == P("data", "model"), grad.sharding


def fused_loss_in_shard_map():
    def per_device(x, w, y):
        def loss(x, w):
            return sce.linear_softmax_cross_entropy(
                x, w, y, reduction="sum", vocab_axis_name="model"
            )

        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
        return jax.lax.psum(value, "data"), grads

    fused = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh(),
            in_specs=(P("data", None), P(None, "model"), P("data")),
            out_specs=(P(), (P("data", None), P(None, "model"))),
        )
    )
    args = local(HIDDEN, P("data", None)), local(WEIGHT, P(None, "model")), local(LABELS, P("data"))
    total, (d_hidden, d_weight) = fused(*args)
    x, w = HIDDEN.astype(np.float64), WEIGHT.astype(np.float64)
    want = numpy_reference.cross_entropy(x @ w, LABELS, integer=True)
    d_logits = want.dlogits
    np.testing.assert_allclose(float(total), want.loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(gathered(d_hidden), d_logits @ w.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gathered(d_weight), x.T @ d_logits, rtol=1e-4, atol=1e-6)


CHECKS = {
    "jit_xla": lambda: logits_loss("xla"),
    "jit_pallas": lambda: logits_loss("pallas"),
    "jit_auto": lambda: logits_loss(None),
    "shard_map_fused": fused_loss_in_shard_map,
}


def main(process: int, port: str) -> None:
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    errors = {}
    with jax.default_matmul_precision("float32"):
        for name, run in CHECKS.items():
            try:
                run()
                errors[name] = None
            except Exception:
                errors[name] = traceback.format_exc()[-3000:]
    print(json.dumps({"process": process, "errors": errors}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
