"""The cost of ``return_aux=True`` (issue 17's goal), read straight from one run.

    python -m benchmarks.aux_goals cpu [--rounds R] [--repeats K] [--note TEXT]
    JAX_PLATFORMS=cpu python -m benchmarks.aux_goals targets [--targets v5e h100 ...]

``cpu``: bf16 and float32 logits ``[2048, 32768]`` with integer labels on this host,
``jit(value_and_grad)`` of the mean loss with the default implementation, three variants
interleaved in rounds (so that a busy machine slows each alike): ``plain`` (no
``return_aux``), ``aux`` (``return_aux=True``, the aux values returned beside the gradient) and
``aux+entropy`` (the mean entropy added to the objective with weight 0.01, so that the aux
gradient is formed too). Goals: the median time of ``aux`` at most 1.1x ``plain``'s, and its
compiled temporary memory at most ``plain``'s plus O(N) (64 bytes per row); ``aux+entropy`` is
reported beside them, and so is the entropy's reduction timed alone (`ENTROPY_PASS`), whose
cost bounds the time goal from below on this compiler (``floor_time_aux_vs_plain``).

``targets``: the temporary-memory goal for the programs of `benchmarks.compiled_memory`
(bf16 logits ``[8192, 128256]``, and the fused loss on ``[16384, 4096] x [4096, 128256]``),
for ``"xla"`` and ``"pallas"``, compiled ahead of time for TPU and GPU targets
(`benchmarks.targets`, which needs libtpu and the jax CUDA plugin), each also with half its
rows and with half its vocabulary (`target_shapes`). O(N) is read as ``ROW_BYTES`` per row
plus a constant ``FIXED_BYTES`` (`allowed_extra_bytes`) at every one of those shapes; each
result also gives the extra bytes per added row and the growth with the vocabulary.

Each writes raw JSON to ``benchmarks/results/`` (``aux_goals_cpu.json``,
``aux_goals_targets.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib

import jax
import jax.numpy as jnp
from jax_softmax_ce.kernels import _tile

from jax_softmax_ce import _benchmark, linear
from jax_softmax_ce import cross_entropy as ce

N, V = 2048, 32768
RESULTS = pathlib.Path(__file__).parent / "results"
ROW_BYTES = 64  # what "O(N)" allows per row: sixteen float32 values
# ... and once per program, in `targets`: compiled for a TPU, the "xla" programs with return_aux
# reserve 0.4 to 1.4 MiB more than without (XLA's buffers for copies of per-row vectors between
# memory spaces), the v5e's logits loss 0.5 to 0.7 MiB at 8192, 16384 and 32768 rows alike and
# at half the vocabulary: 78 bytes per row at 8192 rows and 17 at 32768, a constant.
FIXED_BYTES = 2**20
NOTE = (
    "Only ratios measured in the same run (interleaved rounds) are meaningful; say with --note "
    "whether anything else ran on the machine."
)
VARIANTS = ("plain", "aux", "aux+entropy")


def objective(variant: str, loss_fn, argnums=0):
    """``value_and_grad`` (with respect to ``argnums``) of the mean loss of
    ``loss_fn(*args, return_aux=...)`` for one of `VARIANTS`; the aux values come back as the
    auxiliary output."""

    def plain(*args):
        return loss_fn(*args, reduction="mean")

    def with_aux(*args):
        loss, aux = loss_fn(*args, reduction="mean", return_aux=True)
        if variant == "aux+entropy":
            loss = loss + 0.01 * jnp.mean(aux.entropy)
        return loss, aux

    if variant == "plain":
        return jax.value_and_grad(plain, argnums=argnums)
    return jax.value_and_grad(with_aux, argnums=argnums, has_aux=True)


# The entropy's own reduction, timed alone: `_tile.entropy_term` over the logits against a
# given row max. XLA's CPU compiler fuses no two reductions into one pass (their shared
# exp(z' - m) is materialised, and a variadic reduction that forms both is slower than two), so
# return_aux costs at least this pass on top of the loss: ``floor_time_aux_vs_plain`` is
# ``1 + entropy pass / plain``, a lower bound for any implementation built of XLA reductions.
ENTROPY_PASS = "entropy_pass"


def _entropy_pass(logits, m):
    return _tile.entropy_term(logits.astype(m.dtype), m)


def _with_row_max(logits):
    return logits, jnp.max(logits, axis=1, keepdims=True).astype(jnp.float32)


def _cpu_problems(dtype):
    nbytes = N * V * jnp.dtype(dtype).itemsize
    keys = jax.random.split(jax.random.key(0), _benchmark.copies_for(nbytes, at_most=4))
    return [_benchmark.random_problem(k, N, V, dtype) for k in keys]


def cpu(*, rounds: int, repeats: int, note: str) -> dict:
    load_before = os.getloadavg()[0]
    loss_fn = ce.softmax_cross_entropy_with_integer_labels
    measured = {}
    goals = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        name = jnp.dtype(dtype).name
        arg_sets = _cpu_problems(dtype)
        fns = {v: jax.jit(objective(v, loss_fn)) for v in VARIANTS}
        memory = {v: _benchmark.compiled_memory(objective(v, loss_fn), *arg_sets[0]) for v in fns}
        calls = {v: (fn, arg_sets) for v, fn in fns.items()}
        calls[ENTROPY_PASS] = (jax.jit(_entropy_pass), [_with_row_max(x) for x, _ in arg_sets])
        seconds: dict[str, list[float]] = {v: [] for v in calls}
        for _ in range(rounds):
            for v, (fn, args) in calls.items():
                seconds[v] += _benchmark.time_calls(fn, args, repeats=repeats).seconds
        times = {v: _benchmark.Timing(tuple(s)).as_dict() for v, s in seconds.items()}
        measured[name] = {"memory": memory, "times": times}
        ratio = times["aux"]["median_s"] / times["plain"]["median_s"]
        extra = memory["aux"]["temp_bytes"] - memory["plain"]["temp_bytes"]
        goals[f"{name}_time_aux_vs_plain"] = _goal(
            f"{name} [{N}, {V}] jit(value_and_grad(mean loss)) with return_aux=True: median "
            "time / without",
            ratio,
            1.1,
        )
        goals[f"{name}_extra_temp_bytes_per_row"] = _goal(
            f"{name} [{N}, {V}]: (temp bytes with return_aux - without) / N",
            extra / N,
            ROW_BYTES,
        )
        entropy = times["aux+entropy"]["median_s"] / times["plain"]["median_s"]
        measured[name]["time_aux+entropy_vs_plain"] = entropy
        lone = times[ENTROPY_PASS]["median_s"] / times["plain"]["median_s"]
        measured[name]["time_entropy_pass_vs_plain"] = lone
        measured[name]["floor_time_aux_vs_plain"] = 1.0 + lone
    return {
        **_benchmark.environment(),
        "date": _now(),
        "note": note,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "problem": {"n": N, "v": V, "labels": "integer", "reduction": "mean"},
        "implementation": "default (xla)",
        "variants": VARIANTS,
        "rounds": rounds,
        "repeats_per_round": repeats,
        "goals": goals,
        "measured": measured,
    }


def _goal(description, value, goal) -> dict:
    return {"description": description, "value": value, "goal": goal, "pass": value <= goal}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def target_programs(case: str, implementation: str, shape=None) -> dict:
    """``{variant: (fn, args)}`` at `benchmarks.compiled_memory`'s shapes, or at ``shape``
    (``(N, V)``, or ``(N, D, V)`` for the fused loss)."""
    from benchmarks import compiled_memory

    s = jax.ShapeDtypeStruct
    if case == "logits":
        n, v = shape or compiled_memory.LOGITS
        args = (s((n, v), jnp.bfloat16), s((n,), jnp.int32))

        def loss_fn(x, y, **kw):
            return ce.softmax_cross_entropy_with_integer_labels(
                x, y, implementation=implementation, **kw
            )

        return {variant: (objective(variant, loss_fn), args) for variant in VARIANTS[:2]}
    n, d, v = shape or compiled_memory.FUSED
    args = (s((n, d), jnp.bfloat16), s((d, v), jnp.bfloat16), s((n,), jnp.int32))

    def fused(x, w, y, **kw):
        return linear.linear_softmax_cross_entropy(x, w, y, implementation=implementation, **kw)

    return {variant: (objective(variant, fused, (0, 1)), args) for variant in VARIANTS[:2]}


def target_shapes(case: str) -> dict:
    """``{label: shape}``: `benchmarks.compiled_memory`'s shape for ``case``, the same with
    half its rows, and with half its vocabulary, so that what grows with ``N`` or ``V`` shows."""
    from benchmarks import compiled_memory

    full = compiled_memory.LOGITS if case == "logits" else compiled_memory.FUSED
    return {
        "full": full,
        "half_rows": (full[0] // 2, *full[1:]),
        "half_vocab": (*full[:-1], full[-1] // 2),
    }


def allowed_extra_bytes(rows: int) -> int:
    """What "O(N)" allows a program with ``rows`` rows: `ROW_BYTES` per row plus
    `FIXED_BYTES`."""
    return ROW_BYTES * rows + FIXED_BYTES


def targets(target_names) -> dict:
    from benchmarks import compiled_memory
    from benchmarks import targets as aot

    rows = []
    for target in target_names:
        for case in ("logits", "fused"):
            for implementation in ("xla", "pallas"):
                row = {"target": target, "case": case, "implementation": implementation}
                shapes = {}
                for label, shape in target_shapes(case).items():
                    measured = {}
                    for variant, program in target_programs(case, implementation, shape).items():
                        measured[variant] = compiled_memory.measure(variant, target, program)
                    entry = {"shape": shape, "rows": shape[0], "measured": measured}
                    plain, aux = measured["plain"], measured["aux"]
                    if plain["status"] == "ok" and aux["status"] == "ok":
                        extra = aux["temp_bytes"] - plain["temp_bytes"]
                        entry.update(extra_temp_bytes=extra, extra_per_row=extra / shape[0])
                        entry["allowed"] = allowed_extra_bytes(shape[0])
                    shapes[label] = entry
                row["shapes"] = shapes
                extras = [e.get("extra_temp_bytes") for e in shapes.values()]
                if None not in extras:
                    full, half = shapes["full"], shapes["half_rows"]
                    row["extra_bytes_per_added_row"] = (
                        full["extra_temp_bytes"] - half["extra_temp_bytes"]
                    ) / (full["rows"] - half["rows"])
                    row["extra_growth_with_vocab"] = (
                        full["extra_temp_bytes"] - shapes["half_vocab"]["extra_temp_bytes"]
                    )
                    within = [e["extra_temp_bytes"] <= e["allowed"] for e in shapes.values()]
                    row["pass"] = all(within)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {
        "benchmark": "aux_goals_targets",
        "date": _now(),
        "versions": aot.versions(),
        "dtype": "bfloat16",
        "goal": (
            f"at each shape: temp bytes with return_aux=True - without <= {ROW_BYTES} * N + "
            f"{FIXED_BYTES}"
        ),
        "shapes": {case: target_shapes(case) for case in ("logits", "fused")},
        "results": rows,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aux_goals", description=__doc__)
    parser.add_argument("what", choices=("cpu", "targets"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--targets", nargs="*", help="compile targets (default: all)")
    parser.add_argument("--note", default=NOTE, help="what to record about the conditions")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    if args.what == "cpu":
        result = cpu(rounds=args.rounds, repeats=args.repeats, note=args.note)
        out = args.out or RESULTS / f"aux_goals_{result['platform']}.json"
        for name, goal in result["goals"].items():
            verdict = "PASS" if goal["pass"] else "FAIL"
            print(f"{verdict}  {name}: {goal['value']:.6g} (goal <= {goal['goal']:g})")
    else:
        from benchmarks import targets as aot

        result = targets(args.targets or aot.TARGETS)
        out = args.out or RESULTS / "aux_goals_targets.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
