"""The measured goals of the core library (issue 2), read straight from one run.

    python -m benchmarks.core_goals [--repeats K] [--rounds R] [--out PATH]

(a) bf16 logits [2048, 32768], ``jit(value_and_grad(mean loss))``: our compiled temporary memory
    at most half of optax's.
(b) float32 logits [2048, 32768] on the CPU, the same function: our median time at most 1.1x
    optax's, both measured in this run, interleaved in rounds so that a busy machine slows both.
(c) bf16 logits [2048, 32768]: the max relative error of our per-example losses against float64
    at most 1e-5 (optax's is reported beside it).

"Ours" is the default dispatch (``implementation=None``), what a user gets; ``"xla"`` is
measured beside it. The JSON holds every repeat, the goals and pass or fail.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import optax

from jax_softmax_ce import _benchmark
from jax_softmax_ce import cross_entropy as ce

N, V = 2048, 32768
RESULTS = pathlib.Path(__file__).parent / "results"
NOTE = (
    "Only ratios measured in the same run (interleaved rounds) are meaningful; say with --note "
    "whether anything else ran on the machine."
)


def _candidates():
    return {
        "optax": optax.softmax_cross_entropy_with_integer_labels,
        "jax_softmax_ce:default": ce.softmax_cross_entropy_with_integer_labels,
        "jax_softmax_ce:xla": functools.partial(
            ce.softmax_cross_entropy_with_integer_labels, implementation="xla"
        ),
    }


def _value_and_grad_of_mean(per_example):
    return jax.value_and_grad(lambda x, y: jnp.mean(per_example(x, y)))


def _arg_sets(dtype):
    nbytes = N * V * jnp.dtype(dtype).itemsize
    keys = jax.random.split(jax.random.key(0), _benchmark.copies_for(nbytes, at_most=4))
    return [_benchmark.random_problem(k, N, V, dtype) for k in keys]


def _memory(dtype) -> dict:
    logits, labels = _arg_sets(dtype)[0]
    return {
        name: _benchmark.compiled_memory(_value_and_grad_of_mean(loss), logits, labels)
        for name, loss in _candidates().items()
    }


def _times(dtype, *, rounds: int, repeats: int) -> dict:
    arg_sets = _arg_sets(dtype)
    jitted = {name: jax.jit(_value_and_grad_of_mean(loss)) for name, loss in _candidates().items()}
    seconds: dict[str, list[float]] = {name: [] for name in jitted}
    for _ in range(rounds):
        for name, fn in jitted.items():
            timing = _benchmark.time_calls(fn, arg_sets, warmup=1, repeats=repeats)
            seconds[name] += timing.seconds
    return {name: _benchmark.Timing(tuple(s)).as_dict() for name, s in seconds.items()}


def _errors(dtype) -> dict:
    logits, labels = _arg_sets(dtype)[0]
    return {
        name: _benchmark.loss_errors(loss, logits, labels) for name, loss in _candidates().items()
    }


def _goal(description, value, goal, *, measured) -> dict:
    """A goal of the form ``value <= goal``."""
    passed = value <= goal
    return {
        "description": description,
        "value": value,
        "goal": goal,
        "pass": bool(passed),
        "measured": measured,
    }


def measure(*, rounds: int, repeats: int, note: str = NOTE) -> dict:
    memory = _memory(jnp.bfloat16)
    times = _times(jnp.float32, rounds=rounds, repeats=repeats)
    errors = _errors(jnp.bfloat16)
    ours = "jax_softmax_ce:default"
    goals = {
        "a_bf16_temp_memory_vs_optax": _goal(
            f"bf16 [{N}, {V}] jit(value_and_grad(mean loss)): compiled temp bytes, ours / optax",
            memory[ours]["temp_bytes"] / memory["optax"]["temp_bytes"],
            0.5,
            measured=memory,
        ),
        "b_cpu_f32_time_vs_optax": _goal(
            f"float32 [{N}, {V}] jit(value_and_grad(mean loss)) on "
            f"{jax.devices()[0].platform}: median time, ours / optax",
            times[ours]["median_s"] / times["optax"]["median_s"],
            1.1,
            measured=times,
        ),
        "c_bf16_loss_rel_error": _goal(
            f"bf16 [{N}, {V}]: max relative error of the per-example losses against float64 "
            "(ours; optax's is in measured)",
            errors[ours]["loss_max_rel_error"],
            1e-5,
            measured=errors,
        ),
    }
    return {
        **_benchmark.environment(),
        "note": note,
        "problem": {"n": N, "v": V, "labels": "integer", "reduction": "mean"},
        "rounds": rounds,
        "repeats_per_round": repeats,
        "goals": goals,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.core_goals", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    parser.add_argument("--out", type=pathlib.Path, help="JSON path (default: results/)")
    parser.add_argument("--note", default=NOTE, help="what to record about the conditions")
    args = parser.parse_args(argv)
    result = measure(rounds=args.rounds, repeats=args.repeats, note=args.note)
    out = args.out or RESULTS / f"core_goals_{result['platform']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, goal in result["goals"].items():
        verdict = "PASS" if goal["pass"] else "FAIL"
        print(f"{verdict}  {name}: {goal['value']:.6g} (goal <= {goal['goal']:g})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
