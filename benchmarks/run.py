"""The benchmark harness: ours against optax, PyTorch, Liger and cut cross-entropy, in one run.

    python -m benchmarks.run --suite ce|linear|all --device cpu|gpu [--quick]

Writes raw JSON (every repeat), a Markdown table and PNG plots to ``benchmarks/results/``. A peer
that is not installed, or one of ours that is absent or raises ``NotImplementedError``, is
recorded as skipped with the reason; any other error is recorded as failed and the run goes on.
See ``benchmarks/README.md`` for how to read the results.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

# JAX must not take most of the GPU up front: PyTorch measures in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from benchmarks import peers, report
from jax_softmax_ce import _benchmark

RESULTS = pathlib.Path(__file__).parent / "results"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
PASSES = ("forward", "forward_backward")
NOTE_CPU = (
    "CPU timings on a small machine are noisy: compare implementations within one run only. "
    "Memory numbers are exact."
)

# Problem grids. ce: logits [n, v]; linear: inputs [n, d] @ weight [d, v].
GRIDS = {
    ("ce", "cpu"): {"n": 2048, "v": [4096, 8192, 16384, 32768]},
    ("ce", "gpu"): {"n": 8192, "v": [32000, 128256, 256000]},
    ("linear", "cpu"): {"n": 512, "d": 256, "v": [4096, 8192, 16384, 32768]},
    ("linear", "gpu"): {"n": 16384, "d": 4096, "v": [32000, 128256, 256000]},
}
QUICK = {"ce": {"n": 256, "v": [1024, 4096]}, "linear": {"n": 128, "d": 64, "v": [1024, 4096]}}


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--suite", choices=("ce", "linear", "all"), default="all")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="a small grid, a few repeats")
    parser.add_argument("--n", type=int, help="override the grid's rows")
    parser.add_argument("--d", type=int, help="override the linear grid's hidden size")
    parser.add_argument("--v", type=int, nargs="+", help="override the grid's vocabulary sizes")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--repeats", type=int, help="timed repeats (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="run only implementations with these names")
    parser.add_argument(
        "--first-v",
        type=int,
        help="measure the cases with this V before all others (across suites, in --dtypes order)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        help="start no measurement after this many seconds; the rest are recorded as skipped",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    parser.add_argument(
        "--note", default="", help="a sentence to record with the run (e.g. what else ran)"
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    return args


def _grid(suite: str, args: argparse.Namespace) -> dict[str, Any]:
    grid = dict(QUICK[suite] if args.quick else GRIDS[(suite, args.device)])
    for key in ("n", "d", "v"):
        if getattr(args, key) is not None and (key != "d" or suite == "linear"):
            grid[key] = getattr(args, key)
    return grid


def _cases(suite: str, grid: dict[str, Any], args) -> Iterator[dict[str, Any]]:
    for dtype in args.dtypes:
        for v in grid["v"]:
            for pass_ in args.passes:
                case = {"suite": suite, "n": grid["n"], "v": v, "dtype": dtype, "pass": pass_}
                if suite == "linear":
                    case["d"] = grid["d"]
                yield case


def _jax_inputs(case) -> list[tuple]:
    """Input copies to rotate among, generated on the device."""
    dtype = DTYPES[case["dtype"]]
    n, v = case["n"], case["v"]
    itemsize = jnp.dtype(dtype).itemsize
    if case["suite"] == "ce":
        keys = jax.random.split(jax.random.key(0), _benchmark.copies_for(n * v * itemsize))
        return [_benchmark.random_problem(k, n, v, dtype) for k in keys]
    d = case["d"]
    nbytes = (n * d + d * v) * itemsize
    sets = []
    for k in jax.random.split(jax.random.key(0), _benchmark.copies_for(nbytes)):
        k_x, k_w, k_y = jax.random.split(k, 3)
        x = jax.random.normal(k_x, (n, d), jnp.float32).astype(dtype)
        w = (jax.random.normal(k_w, (d, v), jnp.float32) * (4.0 / d**0.5)).astype(dtype)
        sets.append((x, w, jax.random.randint(k_y, (n,), 0, v, jnp.int32)))
    return sets


def _throughput(case, median_s: float, copy_bw: float, matmul: dict[str, float]) -> dict:
    """Achieved bandwidth (ce) or FLOP/s (linear) against the measured copy and matmul.

    ce moves at least the logits once forward, and reads them again and writes the gradient
    backward: ``N V b`` and ``3 N V b`` bytes. linear does ``2 N D V`` FLOPs forward and
    ``6 N D V`` forward and backward (the logits, and the gradients of inputs and weight).
    """
    n, v = case["n"], case["v"]
    if case["suite"] == "ce":
        nbytes = n * v * jnp.dtype(DTYPES[case["dtype"]]).itemsize
        nbytes *= 1 if case["pass"] == "forward" else 3
        achieved = nbytes / median_s
        return {
            "bytes_floor": nbytes,
            "bytes_per_s": achieved,
            "fraction_of_copy": achieved / copy_bw,
        }
    flops = 2 * n * case["d"] * v * (1 if case["pass"] == "forward" else 3)
    achieved = flops / median_s
    return {
        "flops": flops,
        "flop_per_s": achieved,
        "fraction_of_matmul": achieved / matmul[case["dtype"]],
    }


def _measure_one(impl: peers.Implementation, case, inputs, args) -> dict[str, Any]:
    try:
        runner = impl.build(case)
    except peers.Skip as e:
        return {"status": "skipped", "reason": str(e)}
    except NotImplementedError as e:
        return {"status": "skipped", "reason": f"NotImplementedError: {e}"}
    try:
        return {"status": "ok", **runner(inputs, warmup=args.warmup, repeats=args.repeats)}
    except NotImplementedError as e:
        return {"status": "skipped", "reason": f"NotImplementedError: {e}"}
    except Exception as e:  # one failing peer must not end the run
        return {
            "status": "failed",
            "reason": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(limit=5),
        }


def _plan(suites, args) -> list[tuple[str, dict[str, Any]]]:
    """Every ``(suite, case)`` to measure, in order: with ``--first-v``, the cases with that V
    (by dtype in ``--dtypes`` order, suite by suite) come before all others, so that a run cut
    short by its budget or its caller has measured them."""
    plan = [(suite, case) for suite in suites for case in _cases(suite, _grid(suite, args), args)]
    if args.first_v is not None:

        def rank(item) -> int:
            case = item[1]
            first = case["v"] == args.first_v
            return args.dtypes.index(case["dtype"]) if first else len(args.dtypes)

        plan.sort(key=rank)  # stable: the order within a rank stays
    return plan


def _implementations(suite: str, args) -> list[peers.Implementation]:
    implementations = peers.implementations(suite, args.device)
    if args.only:
        implementations = [i for i in implementations if i.name in args.only]
    return implementations


def _measure(impl, case, inputs, args, calibration) -> dict[str, Any]:
    """One implementation on one case, with its throughput against the calibration."""
    result = _measure_one(impl, case, inputs, args)
    if result["status"] == "ok":
        result["throughput"] = _throughput(
            case,
            result["time"]["median_s"],
            calibration["copy"]["bytes_per_s"],
            {k: m["flop_per_s"] for k, m in calibration["matmul"].items()},
        )
    return result


def _calibrate(args) -> dict[str, Any]:
    gpu = args.device == "gpu"
    size = 512 if args.quick else (8192 if gpu else 2048)
    mib = 64 if args.quick else (1024 if gpu else 256)
    return {
        "copy": _benchmark.copy_bandwidth(nbytes=mib * 2**20, repeats=args.repeats),
        "matmul": {
            name: _benchmark.matmul_flops(size=size, dtype=dtype, repeats=args.repeats)
            for name, dtype in DTYPES.items()
            if name in args.dtypes
        },
    }


def main(argv=None) -> list[pathlib.Path]:
    args = _parse(argv)
    platform = jax.devices()[0].platform
    if (args.device == "gpu") != (platform == "gpu"):
        raise SystemExit(f"--device {args.device} asked, but JAX's default device is {platform}")
    suites = ("ce", "linear") if args.suite == "all" else (args.suite,)
    peers.import_peers(args.device)
    calibration = _calibrate(args)
    env = _benchmark.environment()
    args.out.mkdir(parents=True, exist_ok=True)
    stems = {
        s: args.out / (f"{s}_{args.device}" + ("_quick" if args.quick else "")) for s in suites
    }
    records = {}
    for suite in suites:
        records[suite] = {
            **env,
            "suite": suite,
            "device_arg": args.device,
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "budget_s": args.budget_s,
            "calibration": calibration,
            "grid": _grid(suite, args),
            "results": [],
        }
        note = " ".join(filter(None, [NOTE_CPU if args.device == "cpu" else "", args.note]))
        if note:
            records[suite]["note"] = note
        records[suite]["loadavg_1min_before"] = os.getloadavg()[0]
    implementations = {suite: _implementations(suite, args) for suite in suites}
    plan = _plan(suites, args)
    started = time.perf_counter()
    with tqdm(total=sum(len(implementations[s]) for s, _ in plan), unit="case") as progress:
        for suite, case in plan:
            inputs = None
            for impl in implementations[suite]:
                progress.set_description(f"{suite} {case['dtype']} V={case['v']} {impl.name}")
                spent = time.perf_counter() - started
                if args.budget_s is not None and spent > args.budget_s:
                    reason = f"the run's time budget of {args.budget_s:g} s was spent before it"
                    result = {"status": "skipped", "reason": reason}
                else:
                    inputs = _jax_inputs(case) if inputs is None else inputs
                    result = _measure(impl, case, inputs, args, calibration)
                records[suite]["results"].append({"implementation": impl.name, **case, **result})
                _write_json(stems[suite].with_suffix(".json"), records[suite])
                progress.update()
            del inputs
    written = []
    for suite in suites:
        record, stem = records[suite], stems[suite]
        record["loadavg_1min_after"] = os.getloadavg()[0]
        _write_json(stem.with_suffix(".json"), record)
        md_path = stem.with_suffix(".md")
        md_path.write_text(report.markdown(record))
        written += [stem.with_suffix(".json"), md_path]
        if not args.no_plots:
            written += report.plots(record, stem)
    for path in written:
        print(f"wrote {path}")
    return written


def _write_json(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Rewrites ``path`` after every measurement, so that a run killed from outside keeps what
    it measured (the temporary file and rename keep the file whole at every moment)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


Runner = Callable[..., dict[str, Any]]

if __name__ == "__main__":
    main()
