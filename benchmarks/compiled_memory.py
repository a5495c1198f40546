"""Compiled device memory of the losses on TPU and GPU targets, measured on a CPU host.

    JAX_PLATFORMS=cpu python -m benchmarks.compiled_memory        # every target, every loss
    JAX_PLATFORMS=cpu python -m benchmarks.compiled_memory --targets v5e h100

Each case is ``value_and_grad`` of a mean loss, compiled ahead of time for each target
(`benchmarks.targets`): the logits losses on bfloat16 ``[8192, 128256]`` logits, with respect
to the logits, and the fused loss on bfloat16 inputs ``[16384, 4096]`` and projection
``[4096, 128256]``, with respect to both. Each is compiled for optax (the logits materialised by
``inputs @ weight`` for the fused case), ours ``"xla"`` and ours ``"pallas"``, and, on TPU
targets, for tokamax's ``linear_softmax_cross_entropy_loss`` (its ``chunked_xla`` and
``mosaic_tpu`` implementations) where tokamax is installed. It needs libtpu and the jax CUDA
plugin (`benchmarks.targets`) and writes ``benchmarks/results/compiled_memory.json`` (targets,
versions, shapes, and temporary, argument and output bytes of each compiled program), with a
Markdown table and a plot beside it; `benchmarks.report` puts the table into the README.

The goals (the compile issue's): temporary memory at most 1% of the logits for the logits
losses, at most 5% (stretch 2%) for the fused loss, on every target, for ``"xla"`` and
``"pallas"``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin registers only then

import jax
import jax.numpy as jnp
import numpy as np

import jax_softmax_ce as sce
from benchmarks import report, targets

RESULTS = pathlib.Path(__file__).parent / "results"
LOGITS = (8192, 128256)
FUSED = (16384, 4096, 128256)
GOALS = {"logits": 0.01, "fused": 0.05}
STRETCH = {"fused": 0.02}
S = jax.ShapeDtypeStruct


def _mean(fn, *args):
    return jnp.mean(fn(*args))


def logits_programs() -> dict:
    """``{implementation: (fn, args)}`` of the logits loss's ``value_and_grad``."""
    import optax

    n, v = LOGITS
    args = (S((n, v), jnp.bfloat16), S((n,), jnp.int32))

    def ours(implementation):
        return lambda x, y: sce.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="mean", implementation=implementation
        )

    losses = {
        "optax": lambda x, y: _mean(optax.softmax_cross_entropy_with_integer_labels, x, y),
        "jax_softmax_ce:xla": ours("xla"),
        "jax_softmax_ce:pallas": ours("pallas"),
    }
    return {name: (jax.value_and_grad(fn), args) for name, fn in losses.items()}


def fused_programs(tpu: bool) -> dict:
    """``{implementation: (fn, args) or the reason it is absent}`` of the fused loss's
    ``value_and_grad`` with respect to the inputs and the projection."""
    import optax

    n, d, v = FUSED
    args = (S((n, d), jnp.bfloat16), S((d, v), jnp.bfloat16), S((n,), jnp.int32))

    def ours(implementation):
        return lambda x, w, y: sce.linear_softmax_cross_entropy(
            x, w, y, reduction="mean", implementation=implementation
        )

    losses = {
        "optax:x@w": lambda x, w, y: _mean(
            optax.softmax_cross_entropy_with_integer_labels, x @ w, y
        ),
        "jax_softmax_ce:xla": ours("xla"),
        "jax_softmax_ce:pallas": ours("pallas"),
    }
    out = {name: (jax.value_and_grad(fn, argnums=(0, 1)), args) for name, fn in losses.items()}
    if tpu:
        out.update(_tokamax_programs(args))
    return out


def _tokamax_programs(args) -> dict:
    """tokamax's fused loss, for each of its implementations we compare with."""
    wanted = ("chunked_xla", "mosaic_tpu")
    try:
        import tokamax
        from absl import flags
        from tokamax._src.ops.linear_softmax_cross_entropy_loss import api
    except ImportError as err:
        return {f"tokamax:{impl}": f"not installed ({err})" for impl in wanted}
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])  # tokamax reads absl flags, which would parse our argv
    out = {}
    for impl in wanted:
        if impl not in api.IMPLEMENTATIONS:
            out[f"tokamax:{impl}"] = f"tokamax {tokamax.__version__} has no {impl!r}"
            continue

        def loss(x, w, y, impl=impl):
            return tokamax.linear_softmax_cross_entropy_loss(
                x, y, w, reduction="mean", implementation=impl
            )

        out[f"tokamax:{impl}"] = (jax.value_and_grad(loss, argnums=(0, 1)), args)
    return out


def measure(name: str, target: str, program) -> dict:
    """One compiled program's memory, or why there is none."""
    if isinstance(program, str):
        return {"implementation": name, "status": "skipped", "reason": program}
    fn, args = program
    dev = targets.device(target)
    # tokamax's Mosaic kernel reads the number of cores from the abstract mesh, else from
    # jax.devices()[0], which is this host's CPU.
    mesh = jax.sharding.Mesh(np.array([dev]), ("x",))
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            compiled = targets.compile_for(fn, target, *args)
    except Exception as err:  # a refusal or a compiler error is a result too
        return {"implementation": name, "status": "failed", "reason": f"{type(err).__name__}: "
                f"{str(err).splitlines()[0][:300]}"}  # fmt: skip
    memory = targets.Memory.of(compiled)
    return {
        "implementation": name,
        "status": "ok",
        "kernels": targets.kernel_calls(compiled),
        "temp_bytes": memory.temp,
        "argument_bytes": memory.argument,
        "output_bytes": memory.output,
    }


def run(target_names) -> dict:
    n, v = LOGITS
    fn_, fd, fv = FUSED
    cases = {
        "logits": {"shape": {"N": n, "V": v}, "logits_bytes": n * v * 2},
        "fused": {"shape": {"N": fn_, "D": fd, "V": fv}, "logits_bytes": fn_ * fv * 2},
    }
    results = []
    for target in target_names:
        tpu = targets.kind(target) == "tpu"
        for case, programs in (("logits", logits_programs()), ("fused", fused_programs(tpu))):
            for name, program in programs.items():
                row = measure(name, target, program)
                row.update(target=target, case=case)
                if row["status"] == "ok":
                    row["temp_fraction"] = row["temp_bytes"] / cases[case]["logits_bytes"]
                results.append(row)
                print(json.dumps(row), flush=True)
    return {
        "benchmark": "compiled_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "versions": targets.versions(),
        "dtype": "bfloat16",
        "pass": "value_and_grad of the mean loss",
        "cases": cases,
        "goals_by_case": GOALS,
        "goals": goals(results),
        "results": results,
    }


def goals(results) -> list[dict]:
    """For each target and our implementation: the temporary memory's fraction of the logits
    against the goal (and the stretch goal)."""
    out = []
    for r in results:
        if not r["implementation"].startswith("jax_softmax_ce") or r["status"] != "ok":
            continue
        case = r["case"]
        out.append(
            {
                "target": r["target"],
                "case": case,
                "implementation": r["implementation"],
                "temp_fraction": r["temp_fraction"],
                "goal": GOALS[case],
                "met": r["temp_fraction"] <= GOALS[case],
                **(
                    {"stretch": STRETCH[case], "stretch_met": r["temp_fraction"] <= STRETCH[case]}
                    if case in STRETCH
                    else {}
                ),
            }
        )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(targets.TARGETS))
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "compiled_memory.json")
    args = parser.parse_args(argv)
    reason = targets.available()
    if reason is not None:
        raise SystemExit(f"cannot make the compile-only devices here: {reason}")
    record = run(args.targets)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    table = report.compiled_memory_table(record, f"benchmarks/results/{args.out.name}")
    args.out.with_suffix(".md").write_text(f"# Compiled memory\n\n{table}\n")
    report.compiled_memory_plot(record, args.out.with_suffix(".png"))
    print(table)
    for goal in record["goals"]:
        print(
            f"{goal['target']} {goal['case']} {goal['implementation']}: "
            f"{100 * goal['temp_fraction']:.2f}% of the logits, goal {100 * goal['goal']:.0f}%: "
            f"{'met' if goal['met'] else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
