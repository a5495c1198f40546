"""What sharded training costs: bytes across devices, and compiled memory of sharded logits.

    python -m benchmarks.sharded bytes          # 8 host devices, mesh (2, 4) ("data", "model")
    JAX_PLATFORMS=cpu python -m benchmarks.sharded tpu-memory   # needs libtpu (compile only)

``bytes`` compiles ``value_and_grad`` of the losses on 8 host CPU devices for each sharding of
the logits (of the fused loss's projection) and sums the bytes that one device sends per step,
read from the compiled program's collectives (`benchmarks.collectives`), at two vocabulary
sizes: the issue's goal is O(tokens) floats for the logits losses, never O(tokens x
vocabulary), so the bytes must not grow with the vocabulary. It writes
``benchmarks/results/sharded_bytes.json``.

``tpu-memory`` compiles the logits loss with ``P(None, "model")`` sharded bfloat16 logits
``[8192, 128256]`` for a 4-chip TPU v5e (``v5e:2x2``, compile-only devices from libtpu) and
reports each device's temporary memory against its logits shard (goal: at most 1%). It writes
``benchmarks/results/sharded_memory_v5e.json``. ``"pallas"`` fails there, and the failure is
recorded as such: libtpu's compiler knows no partitioner for `custom_partitioning`'s calls
("Custom emitter for CustomSPMDPartitioning not found"). jax registers its partitioner with
jaxlib's own XLA (the CPU backend) and, through the PJRT custom partitioner extension, with the
plugins that implement it (the CUDA plugin: `tests/test_compile_targets.py` compiles the rule
for four GPUs); libtpu implements no such extension, so a TPU host fails alike (jax's own tests
skip custom partitioning on libtpu; jax-ml/jax#38196). ``"pallas:shard_map"`` is the same loss
inside ``shard_map`` with ``vocab_axis_name``, which needs no partitioner (and
``"xla:shard_map"`` its XLA twin). The logits and their gradient are pinned row-major; the
compiler's own choice for the sharded parameter is column-major, which costs the kernel two
shard-sized layout copies (also recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

RESULTS = pathlib.Path(__file__).parent / "results"
SPECS = {"rows": P("data", None), "vocab": P(None, "model"), "both": P("data", "model")}
FUSED_SPECS = {"rows": P(None, None), "vocab": P(None, "model")}  # the projection's
S = jax.ShapeDtypeStruct


def _info() -> dict:
    from benchmarks import targets

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "versions": targets.versions(),
    }


def _logits_loss(implementation):
    import jax_softmax_ce as sce

    def loss(x, y):
        return sce.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="mean", implementation=implementation
        )

    return jax.value_and_grad(loss)


def _fused_loss(implementation):
    import jax_softmax_ce as sce

    def loss(x, w, y):
        return sce.linear_softmax_cross_entropy(
            x, w, y, reduction="mean", implementation=implementation
        )

    return jax.value_and_grad(loss, argnums=(0, 1))


def collective_bytes(n: int, vocab_sizes, d: int) -> dict:
    """The bytes one device sends per step, for each loss, implementation and sharding."""

    devices = len(jax.devices())
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rows = []
    for v in vocab_sizes:
        labels = S((n,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
        for impl in ("xla", "pallas"):
            for name, spec in SPECS.items():
                logits = S((n, v), jnp.float32, sharding=NamedSharding(mesh, spec))
                text = jax.jit(_logits_loss(impl)).lower(logits, labels).compile().as_text()
                rows.append(_row("logits", impl, name, n, v, None, text, devices))
            for name, spec in FUSED_SPECS.items():
                x = S((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
                w = S((d, v), jnp.float32, sharding=NamedSharding(mesh, spec))
                text = jax.jit(_fused_loss(impl)).lower(x, w, labels).compile().as_text()
                rows.append(_row("fused", impl, name, n, v, d, text, devices))
            print(json.dumps(rows[-1]), flush=True)
    return {"benchmark": "sharded_bytes", **_info(), "mesh": {"data": 2, "model": 4}, "rows": rows}


def _row(case, impl, sharding, n, v, d, text, devices) -> dict:
    from benchmarks import collectives

    found = collectives.collectives(text, devices)
    sent = collectives.bytes_crossing(text, devices)
    return {
        "case": case,
        "implementation": impl,
        "sharding": sharding,
        "shape": {"N": n, "V": v, **({"D": d} if d else {})},
        "dtype": "float32",
        "bytes_sent_per_device": sent,
        "bytes_per_token": sent / n,
        "largest_all_gather_elements": collectives.largest_gather(text, devices),
        "logits_shard_bytes": 4 * n * v // 8 if sharding == "both" else 4 * n * v // 4,
        "collectives": [
            {
                "kind": c.kind,
                "result_bytes": c.result_bytes,
                "group_size": c.group_size,
                "runs": c.runs,
            }
            for c in found
        ],
    }


def _vocab_parallel_loss(mesh, implementation):
    """The logits loss inside ``shard_map`` with ``vocab_axis_name="model"``: each chip's kernel
    on its classes, the row states combined (what the partitioning rule does under ``jit``)."""
    import jax_softmax_ce as sce

    def per_device(x, y):
        def loss(x):
            total = sce.softmax_cross_entropy_with_integer_labels(
                x, y, reduction="sum", implementation=implementation, vocab_axis_name="model"
            )
            return total / y.shape[0]

        return jax.value_and_grad(loss)(x)

    return jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=(P(), P(None, "model"))
    )


def tpu_memory() -> dict:
    """Per-device temporary memory of the logits loss on a v5e:2x2 with vocabulary-sharded
    logits."""
    from jax.experimental import topologies

    from benchmarks import targets

    topology = topologies.get_topology_desc(
        topology_name="v5e:2x2", platform="tpu", chips_per_host_bounds=(2, 2, 1)
    )
    mesh = jax.sharding.Mesh(topology.devices, ("model",))
    n, v = 8192, 128256
    logits = S((n, v), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "model")))
    labels = S((n,), jnp.int32, sharding=NamedSharding(mesh, P()))
    shard_bytes = n * (v // 4) * 2
    programs = {
        "xla": _logits_loss("xla"),
        "pallas": _logits_loss("pallas"),
        "pallas:shard_map": _vocab_parallel_loss(mesh, "pallas"),
        "xla:shard_map": _vocab_parallel_loss(mesh, "xla"),
    }
    # Row-major logits and gradient, as a training step's producer and consumer hold them:
    # left to itself, XLA lays a parameter whose minor axis is sharded out column-major, and
    # then copies it to and from the kernel's row-major blocks (two shard-sized temporaries).
    from jax.experimental.layout import Format, Layout

    row_major = Format(Layout(major_to_minor=(0, 1)), logits.sharding)
    pinned = S((n, v), jnp.bfloat16, sharding=row_major)
    outs = (NamedSharding(mesh, P()), row_major)
    rows = []
    for impl, program in programs.items():
        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                compiled = jax.jit(program, out_shardings=outs).lower(pinned, labels).compile()
                free = jax.jit(program).lower(logits, labels).compile()
        except Exception as err:  # a refusal or a compiler error is a result too
            rows.append({"implementation": impl, "status": "failed", "reason": str(err)[:500]})
            continue
        memory = targets.Memory.of(compiled)
        rows.append(
            {
                "implementation": impl,
                "status": "ok",
                "kernels": targets.kernel_calls(compiled),
                "temp_bytes": memory.temp,
                "temp_fraction_of_shard": memory.temp / shard_bytes,
                "goal": 0.01,
                "met": memory.temp / shard_bytes <= 0.01,
                "argument_bytes": memory.argument,
                "output_bytes": memory.output,
                "temp_bytes_with_compiler_chosen_layouts": targets.Memory.of(free).temp,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {
        "benchmark": "sharded_memory",
        **_info(),
        "target": "v5e:2x2",
        "sharding": "P(None, 'model') over 4 chips",
        "layout": "row-major logits and gradient (jax.experimental.layout.Format)",
        "dtype": "bfloat16",
        "pass": "value_and_grad of the mean loss",
        "shape": {"N": n, "V": v},
        "logits_shard_bytes": shard_bytes,
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("bytes", "tpu-memory"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)
    if args.what == "bytes":
        jax.config.update("jax_num_cpu_devices", 8)
        out = collective_bytes(args.tokens, args.vocab, args.hidden)
        path = RESULTS / "sharded_bytes.json"
    else:
        out = tpu_memory()
        path = RESULTS / "sharded_memory_v5e.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
