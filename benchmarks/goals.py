"""The measured GPU goals of the Pallas and fused-linear issues, read straight from harness JSON.

    python -m benchmarks.goals                     # results/ce_gpu.json and results/linear_gpu.json
    python -m benchmarks.goals --ce X.json --linear Y.json --out Z.json

Nothing is measured here: every number comes from a harness run (``python -m benchmarks.run``),
and the output names the files it read. A goal whose measurements are missing (a skipped or
failed implementation, or a file not there) is reported with ``"pass": null`` and the reason.

Goals (bf16, forward and backward):

- ``ce`` at N=8192, V=128256, for ``implementation="pallas"`` (and, for comparison, ``"xla"``
  and the Mosaic GPU probe of `benchmarks.mosaic_gpu_probe`, which measures the backend choice):
  achieved bandwidth at least 80% of the measured copy over the floor of ``3 N V 2`` bytes; at
  least 2x faster than optax under ``jit``; no slower than Liger's cross-entropy; extra device
  memory at most the gradient plus O(N) floats, taken here as 16 float32 per row. The extra
  memory is the allocator's peak during the case when the harness has it, else the compiled
  temporaries plus outputs.
- ``linear`` at N=16384, D=4096, V=128256, for the fused loss (``"pallas"`` and ``"xla"``): time
  within 1.15x of the materialised XLA path (``optax:x@w``); compiled temporary memory at most
  2% of that path's; faster than Liger's fused linear cross-entropy.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

RESULTS = pathlib.Path(__file__).parent / "results"
CE_SHAPE = {"n": 8192, "v": 128256}
LINEAR_SHAPE = {"n": 16384, "d": 4096, "v": 128256}
DTYPE, PASS = "bfloat16", "forward_backward"
ROW_FLOATS = 16  # the "O(N) floats" of the memory goal: float32 values per row


def _load(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _cases(record: dict, shape: dict) -> dict[str, dict]:
    """The results of the goal's case, by implementation name."""
    found = {}
    for result in record["results"]:
        if result["dtype"] != DTYPE or result["pass"] != PASS:
            continue
        if all(result.get(key) == value for key, value in shape.items()):
            found[result["implementation"]] = result
    return found


def _median(result: dict | None) -> float | None:
    if result is None or result.get("status") != "ok":
        return None
    return result["time"]["median_s"]


def _why_missing(cases: dict[str, dict], *names: str) -> str:
    reasons = []
    for name in names:
        result = cases.get(name)
        if result is None:
            reasons.append(f"{name}: not in the run")
        elif result["status"] != "ok":
            reasons.append(f"{name}: {result['status']}: {result.get('reason', '')}"[:300])
    return "; ".join(reasons)


def _goal(description: str, value, goal: float, at_most: bool, missing: str) -> dict[str, Any]:
    if value is None:
        return {"description": description, "value": None, "goal": goal, "pass": None,
                "reason": missing or "not measured"}  # fmt: skip
    passed = value <= goal if at_most else value >= goal
    return {"description": description, "value": value, "goal": goal, "pass": bool(passed)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def ce_goals(record: dict, shape: dict = CE_SHAPE) -> dict[str, Any]:
    cases = _cases(record, shape)
    optax, liger = cases.get("optax"), cases.get("liger:LigerCrossEntropyLoss")
    n, v = shape["n"], shape["v"]
    bound = n * v * 2 + ROW_FLOATS * n * 4
    goals = {}
    for name in ("jax_softmax_ce:pallas", "jax_softmax_ce:xla", "probe:mosaic_gpu"):
        ours = cases.get(name)
        ok = ours is not None and ours["status"] == "ok"
        memory = ours["memory"] if ok else {}
        peak = memory.get("device_peak_bytes")
        extra = peak
        if extra is None and ok:
            extra = memory["temp_bytes"] + memory["output_bytes"]
        goals[name] = {
            "bandwidth_fraction_of_copy": _goal(
                "achieved bandwidth over 3 N V 2 bytes / measured copy bandwidth",
                ours["throughput"]["fraction_of_copy"] if ok else None,
                0.8,
                False,
                _why_missing(cases, name),
            ),
            "speedup_vs_optax": _goal(
                "optax median time / ours",
                _ratio(_median(optax), _median(ours)),
                2.0,
                False,
                _why_missing(cases, name, "optax"),
            ),
            "time_vs_liger": _goal(
                "ours median time / Liger's",
                _ratio(_median(ours), _median(liger)),
                1.0,
                True,
                _why_missing(cases, name, "liger:LigerCrossEntropyLoss"),
            ),
            "extra_memory_vs_gradient_plus_rows": _goal(
                f"extra device memory ({'allocator peak' if peak is not None else 'temp + output'}"
                f" bytes) / (gradient bytes + {ROW_FLOATS} float32 per row)",
                None if extra is None else extra / bound,
                1.0,
                True,
                _why_missing(cases, name),
            ),
        }
    return goals


def linear_goals(record: dict, shape: dict = LINEAR_SHAPE) -> dict[str, Any]:
    cases = _cases(record, shape)
    base = cases.get("optax:x@w")
    liger = cases.get("liger:LigerFusedLinearCrossEntropyLoss")
    goals = {}
    for name in ("jax_softmax_ce.linear:pallas", "jax_softmax_ce.linear:xla"):
        ours = cases.get(name)
        both = ours is not None and base is not None and "ok" == ours["status"] == base["status"]
        goals[name] = {
            "time_vs_materialised": _goal(
                "ours median time / materialised logits + optax",
                _ratio(_median(ours), _median(base)),
                1.15,
                True,
                _why_missing(cases, name, "optax:x@w"),
            ),
            "temp_memory_vs_materialised": _goal(
                "ours compiled temporary bytes / materialised path's",
                _ratio(ours["memory"]["temp_bytes"], base["memory"]["temp_bytes"])
                if both
                else None,
                0.02,
                True,
                _why_missing(cases, name, "optax:x@w"),
            ),
            "time_vs_liger": _goal(
                "ours median time / Liger's fused linear cross-entropy",
                _ratio(_median(ours), _median(liger)),
                1.0,
                True,
                _why_missing(cases, name, "liger:LigerFusedLinearCrossEntropyLoss"),
            ),
        }
    return goals


def _source(path: pathlib.Path, record: dict | None) -> dict[str, Any]:
    if record is None:
        return {"path": str(path), "missing": True}
    keys = ("date", "command", "device_kind", "versions", "note")
    return {"path": str(path), **{k: record.get(k) for k in keys}}


def summarise(ce_path, linear_path, *, ce_shape=CE_SHAPE, linear_shape=LINEAR_SHAPE) -> dict:
    ce, linear = _load(ce_path), _load(linear_path)
    return {
        "sources": {"ce": _source(ce_path, ce), "linear": _source(linear_path, linear)},
        "case": {"dtype": DTYPE, "pass": PASS, "ce": ce_shape, "linear": linear_shape},
        "ce": None if ce is None else ce_goals(ce, ce_shape),
        "linear": None if linear is None else linear_goals(linear, linear_shape),
    }


def markdown(summary: dict) -> str:
    lines = [
        "| suite | implementation | goal | value | target | pass |",
        "|---|---|---|---:|---:|---|",
    ]
    for suite in ("ce", "linear"):
        for name, goals in (summary[suite] or {}).items():
            for key, goal in goals.items():
                value = "-" if goal["value"] is None else f"{goal['value']:.3g}"
                verdict = {True: "PASS", False: "FAIL", None: "unmeasured"}[goal["pass"]]
                lines.append(f"| {suite} | {name} | {key} | {value} | {goal['goal']} | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ce", type=pathlib.Path, default=RESULTS / "ce_gpu.json")
    parser.add_argument("--linear", type=pathlib.Path, default=RESULTS / "linear_gpu.json")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "goals_gpu.json")
    parser.add_argument("--ce-shape", type=int, nargs=2, metavar=("N", "V"))
    parser.add_argument("--linear-shape", type=int, nargs=3, metavar=("N", "D", "V"))
    args = parser.parse_args(argv)
    ce_shape = dict(zip(("n", "v"), args.ce_shape, strict=True)) if args.ce_shape else CE_SHAPE
    linear_shape = LINEAR_SHAPE
    if args.linear_shape:
        linear_shape = dict(zip(("n", "d", "v"), args.linear_shape, strict=True))
    summary = summarise(args.ce, args.linear, ce_shape=ce_shape, linear_shape=linear_shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
