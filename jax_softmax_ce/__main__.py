"""The main job: ``python -m jax_softmax_ce``.

A self-check of the losses against a float64 NumPy reference and against optax (exit status 1 on
any failure), then a table that compares this library with optax on the local device: error
against float64, median forward+backward time of ``jit(value_and_grad(mean loss))`` and the
compiled temporary memory. The defaults finish within a minute on a two-core CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp

from jax_softmax_ce import _benchmark
from jax_softmax_ce import cross_entropy as ce

DTYPES = ("bfloat16", "float16", "float32", "float64")

# Self-check tolerances by logits dtype: the loss is accumulated in float32 (float64), so it is
# accurate to float32 precision whatever the input; the gradient comes back in the logits' dtype.
# The gradient's max per-entry relative error is reported beside them but not judged: with label
# smoothing or a z-loss an entry is a difference that may cancel to any size (issue 15's goals are
# asserted by tests/test_numerics.py and measured by benchmarks/numerics.py).
LOSS_RTOL = {"bfloat16": 1e-5, "float16": 1e-5, "float32": 1e-5, "float64": 1e-12}
GRAD_ATOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5, "float64": 1e-12}
OPTIONS = (
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"ignore_index": -100},
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jax_softmax_ce",
        description="Self-check jax_softmax_ce, then compare it with optax on this device.",
    )
    parser.add_argument("--n", type=int, default=1024, help="examples (rows of the logits)")
    parser.add_argument("--v", type=int, default=32768, help="classes (vocabulary size)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="logits dtype")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--skip-check", action="store_true", help="skip the self-check")
    return parser.parse_args(argv)


def _self_check(dtype: str) -> list[str]:
    """Failures of our implementations against float64 and optax on small problems."""
    failures: list[str] = []
    n, v = 64, 1000  # V not a multiple of any block size
    logits, labels = _benchmark.random_problem(jax.random.key(1), n, v, jnp.dtype(dtype))
    candidates = _benchmark.cross_entropy_candidates(backend="any")
    for options in OPTIONS:
        check_labels = labels
        if "ignore_index" in options:
            check_labels = labels.at[::5].set(options["ignore_index"])
        for name, loss in candidates.items():
            if name == "optax":
                continue
            per_example = functools.partial(loss, **options)
            try:
                errors = _benchmark.loss_errors(per_example, logits, check_labels, **options)
            except NotImplementedError as e:
                print(f"  skipped  {name} {options}: {e}")
                continue
            ok = (
                errors["loss_max_rel_error"] <= LOSS_RTOL[dtype]
                and errors["grad_max_abs_error"] <= GRAD_ATOL[dtype]
            )
            print(
                f"  {'ok' if ok else 'FAILED':7}  {name:26} {_describe(options):22} "
                f"loss rel err {errors['loss_max_rel_error']:.1e}  "
                f"grad abs err {errors['grad_max_abs_error']:.1e}  "
                f"grad rel err {errors['grad_max_rel_error']:.1e}"
            )
            if not ok:
                failures.append(f"{name} {options} against float64: {errors}")
    failures += _check_against_optax(candidates)
    return failures


def _describe(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "default options"


def _check_against_optax(candidates) -> list[str]:
    """Ours equals optax's on float32 problems it supports: integer labels, probability labels,
    and a ``where`` mask."""
    try:
        import optax
    except ImportError:
        print("  skipped  optax comparison: optax is not installed")
        return []
    key_logits, key_probs = jax.random.split(jax.random.key(2))
    logits, labels = _benchmark.random_problem(key_logits, 32, 257, jnp.float32)
    probs = jax.nn.softmax(jax.random.normal(key_probs, logits.shape))
    where = jnp.broadcast_to(jnp.arange(logits.shape[1]) % 7 != 0, logits.shape)
    cases = {
        "integer labels": (
            lambda impl: ce.softmax_cross_entropy_with_integer_labels(
                logits, labels, implementation=impl
            ),
            optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        ),
        "probability labels": (
            lambda impl: ce.softmax_cross_entropy(logits, probs, implementation=impl),
            optax.softmax_cross_entropy(logits, probs),
        ),
        "where mask": (
            lambda impl: ce.softmax_cross_entropy(logits, probs, where=where, implementation=impl),
            optax.softmax_cross_entropy(logits, probs, where=where),
        ),
    }
    failures = []
    for implementation in _benchmark.OUR_IMPLEMENTATIONS:
        for case, (ours, theirs) in cases.items():
            try:
                values = ours(implementation)
            except NotImplementedError as e:
                print(f"  skipped  {implementation} vs optax, {case}: {e}")
                continue
            error = _benchmark.max_relative_error(values, theirs)
            ok = error <= 1e-5
            print(
                f"  {'ok' if ok else 'FAILED':7}  jax_softmax_ce:{implementation:12} vs optax, "
                f"{case:19} float32 loss rel diff {error:.1e}"
            )
            if not ok:
                failures.append(f"{implementation} against optax, {case}: rel diff {error:.2e}")
    return failures


def _compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = jnp.dtype(args.dtype)
    nbytes = args.n * args.v * dtype.itemsize
    keys = jax.random.split(jax.random.key(0), _benchmark.copies_for(nbytes, at_most=4))
    arg_sets = [_benchmark.random_problem(k, args.n, args.v, dtype) for k in keys]
    rows = []
    for name, loss in _benchmark.cross_entropy_candidates().items():
        if isinstance(loss, str):
            rows.append({"name": name, "status": "skipped", "reason": loss})
            continue
        result = _benchmark.measure_loss(
            loss, arg_sets, backward=True, warmup=args.warmup, repeats=args.repeats
        )
        rows.append({"name": name, **result})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    """One line per implementation: errors, the median time with the fastest and slowest
    repeat (the spread a busy machine shows), and each against optax's."""
    optax_row = next((r for r in rows if r["name"] == "optax" and r["status"] == "ok"), None)
    lines = [
        "| implementation | loss max rel err | grad max abs err | grad max rel err "
        "| fwd+bwd ms: median [min, max] | time vs optax | temp MiB | temp vs optax |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['name']} | {row['status']}: {row['reason']} |||||||")
            continue
        time_s = row["time"]["median_s"]
        repeats = row["time"]["repeats_s"]
        temp = row["memory"]["temp_bytes"]
        time_ratio = temp_ratio = "-"
        if optax_row is not None:
            time_ratio = f"{time_s / optax_row['time']['median_s']:.2f}x"
            optax_temp = optax_row["memory"]["temp_bytes"]
            temp_ratio = f"{temp / optax_temp:.2f}x" if optax_temp else "-"
        errors = row["errors"]
        lines.append(
            f"| {row['name']} | {errors['loss_max_rel_error']:.1e} "
            f"| {errors['grad_max_abs_error']:.1e} | {errors['grad_max_rel_error']:.1e} "
            f"| {1e3 * time_s:.1f} [{1e3 * min(repeats):.1f}, {1e3 * max(repeats):.1f}] "
            f"| {time_ratio} | {temp / 2**20:.1f} | {temp_ratio} |"
        )
    return "\n".join(lines)


def _load_note(load: tuple[float, float]) -> str | None:
    """A warning when the machine was busy: the 1-minute load average before and after the
    timings, against the number of cores."""
    cores = os.cpu_count() or 1
    if max(load) <= 0.5 * cores:
        return None
    return (
        f"Note: the 1-minute load average was {load[0]:.1f} before and {load[1]:.1f} after the "
        f"timings, on {cores} cores: other work shared the machine, so the times are noisy "
        f"(compare the [min, max] spreads)."
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    env = _benchmark.environment()
    print(
        f"jax_softmax_ce on {env['platform']} ({env['device_kind']}, {env['host']['cpu']}), "
        f"jax {env['versions']['jax']}"
    )
    failures: list[str] = []
    if not args.skip_check:
        print(f"Self-check, {args.dtype} logits [64, 1000], against float64 NumPy and optax:")
        failures = _self_check(args.dtype)
    print(
        f"\nlogits [{args.n}, {args.v}] {args.dtype}, integer labels, jit(value_and_grad(mean "
        f"loss)), median of {args.repeats}; errors on the first 256 rows against float64:\n"
    )
    load_before = os.getloadavg()[0]
    rows = _compare(args)
    load = (load_before, os.getloadavg()[0])
    print(_table(rows))
    note = _load_note(load)
    if note:
        print(f"\n{note}")
    if args.json:
        record = {**env, "args": vars(args), "load_average_1min": load, "rows": rows}
        with open(args.json, "w") as f:
            json.dump({**record, "self_check_failures": failures}, f)
            f.write("\n")
    if failures:
        print("\nSelf-check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("\nSelf-check passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
