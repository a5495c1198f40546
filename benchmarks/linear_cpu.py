"""CPU benchmark of `linear_softmax_cross_entropy` against materialised logits.

Times a jitted ``value_and_grad`` (with respect to inputs and weight, ``reduction="mean"``) of:

- ``ours_xla``: ``linear_softmax_cross_entropy(..., implementation="xla")``;
- ``ours_xla_filter``: the same with ``gradient_filter_eps=2**-12`` (Cut Cross-Entropy's value);
- ``materialised_optax``: ``optax.softmax_cross_entropy_with_integer_labels`` on
  ``inputs @ weight``;
- ``torch_linear_cross_entropy``: ``torch.nn.functional.linear_cross_entropy`` forward and backward,
  when PyTorch is installed and has it (skipped otherwise).

For the JAX functions it also reports the compiled temporary memory
(``memory_analysis().temp_size_in_bytes``) and the logits' size for comparison. Each timing is one
warm-up call, then ``--repeats`` calls with ``block_until_ready``; the JSON keeps every repeat and
the median. Labels are drawn uniformly, or from a Zipf law (``--labels zipf``), which is closer to
text and is where gradient filtering can skip tiles.

For ``ours_xla_filter`` the record also holds what the filter did: the fraction of logits tiles
whose gradient matmuls it skipped, counted independently here in NumPy from float64 logits with
the same tiling and the same test (every ``|p - onehot|`` of the tile below eps), and the largest
gradient difference against the unfiltered ``ours_xla`` of the same run.

``goals`` in the JSON are the fused-linear issue's CPU goals, read from the measurements of the
``8192x512x32768`` shape when it was run: compiled temporary memory at most 5% of the logits,
and time at most 1.3x the materialised path's. ``loadavg`` is the 1-minute load average before
and after the run, so a reader can tell a quiet machine from a shared one.

Usage::

  python benchmarks/linear_cpu.py                      # both issue shapes, f32
  python benchmarks/linear_cpu.py --shapes 2048x512x8192 --repeats 3
  python benchmarks/linear_cpu.py --labels zipf --target-logit 12 --block-n 256 --block-v 512 \\
      --shapes 8192x512x32768 --methods ours_xla ours_xla_filter   # what filtering skips
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jax_softmax_ce as sce
from jax_softmax_ce import BlockSizes

DEFAULT_SHAPES = ("8192x1024x32768", "8192x512x32768")
GOAL_SHAPE = (8192, 512, 32768)
GOAL_MEMORY_FRACTION = 0.05
GOAL_TIME_RATIO = 1.3
FILTER_EPS = 2.0**-12  # Cut Cross-Entropy's default
NOTE = (
    "Memory is XLA's compiled temporary allocation (excluding arguments and outputs), not a "
    "measured peak; PyTorch memory is not measured. Compare methods within one run only."
)


def _timed(fn, repeats: int) -> list[float]:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _labels(rng, n: int, v: int, kind: str) -> np.ndarray:
    if kind == "zipf":
        return np.minimum(rng.zipf(1.1, size=n) - 1, v - 1).astype(np.int32)
    return rng.integers(0, v, size=n).astype(np.int32)


def _jax_entry(name, loss, x, w, repeats):
    """The timing record, and the ``(loss, (d_inputs, d_weight))`` of the last call."""
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = grad_fn.lower(x, w).compile()
    memory = compiled.memory_analysis()
    times = _timed(lambda: compiled(x, w), repeats)
    entry = {
        "method": name,
        "times_s": times,
        "median_s": statistics.median(times),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }
    return entry, compiled(x, w)


def filter_skip_fraction(x, w, y, eps: float, block_sizes: BlockSizes) -> tuple[float, int]:
    """``(skipped fraction, number of tiles)`` of the gradient filter, counted in NumPy.

    The tiling is the blockwise implementation's: ``min(block, size)`` tiles, the last one moved
    back to end at the edge. A tile is skipped when every ``|p - onehot|`` in it is below ``eps``,
    with ``p`` the float64 softmax of float64 logits (the mean reduction's gradient before the
    cotangent).
    """
    x, w, y = np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(y)
    (n, _), v = x.shape, w.shape[1]
    bn, bv = min(block_sizes.block_n, n), min(block_sizes.block_v, v)
    starts_v = [min(j * bv, v - bv) for j in range(-(-v // bv))]
    skipped = tiles = 0
    for i in range(-(-n // bn)):
        r0 = min(i * bn, n - bn)
        z = x[r0 : r0 + bn] @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(bn), y[r0 : r0 + bn]] -= 1.0
        g = np.abs(p)
        for c0 in starts_v:
            tiles += 1
            skipped += bool(g[:, c0 : c0 + bv].max() < eps)
    return skipped / tiles, tiles


def goals(runs) -> dict | None:
    """The CPU goals from the run of `GOAL_SHAPE`, or None when it was not run."""
    n, d, v = GOAL_SHAPE
    for run in runs:
        if (run["shape"]["N"], run["shape"]["D"], run["shape"]["V"]) != GOAL_SHAPE:
            continue
        by_method = {e["method"]: e for e in run["results"]}
        if not {"ours_xla", "materialised_optax"} <= by_method.keys():
            return None
        ours, materialised = by_method["ours_xla"], by_method["materialised_optax"]
        memory = ours["temp_bytes"] / run["logits_bytes"]
        time_ratio = ours["median_s"] / materialised["median_s"]
        return {
            "shape": {"N": n, "D": d, "V": v},
            "temp_memory_fraction_of_logits": memory,
            "temp_memory_goal": GOAL_MEMORY_FRACTION,
            "temp_memory_pass": memory <= GOAL_MEMORY_FRACTION,
            "time_ratio_to_materialised": time_ratio,
            "time_goal": GOAL_TIME_RATIO,
            "time_pass": time_ratio <= GOAL_TIME_RATIO,
        }
    return None


def _torch_entry(x, w, y, repeats):
    try:
        import torch
    except ImportError:
        return {"method": "torch_linear_cross_entropy", "skipped": "torch is not installed"}
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fn is None:
        return {
            "method": "torch_linear_cross_entropy",
            "skipped": f"torch {torch.__version__} has no nn.functional.linear_cross_entropy",
        }
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    tw = torch.tensor(np.asarray(w).T.copy(), requires_grad=True)  # [V, D], as nn.Linear stores it
    ty = torch.tensor(np.asarray(y), dtype=torch.long)

    def step():
        tx.grad = None
        tw.grad = None
        loss = fn(tx, tw, ty, reduction="mean")
        loss.backward()
        return loss.item()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "method": "torch_linear_cross_entropy",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "times_s": times,
        "median_s": statistics.median(times),
    }


def run_shape(
    n: int,
    d: int,
    v: int,
    *,
    repeats: int,
    labels: str,
    block_sizes,
    methods,
    logit_scale=1.0,
    target_logit=None,
):
    rng = np.random.default_rng(0)
    y_np = _labels(rng, n, v, labels)
    w_np = rng.normal(size=(d, v)) * (logit_scale / np.sqrt(d))
    x_np = rng.normal(size=(n, d))
    if target_logit is not None:
        # A model that has learnt its data: each input points along its label's column, with the
        # given target logit, so the softmax puts most of its mass on the label.
        columns = w_np[:, y_np].T
        x_np = x_np * 0.1 + columns * (target_logit / np.sum(columns**2, axis=1, keepdims=True))
    x = jnp.asarray(x_np, jnp.float32)
    w = jnp.asarray(w_np, jnp.float32)
    y = jnp.asarray(y_np)
    results = []

    def ours(eps):
        def loss(x, w):
            return sce.linear_softmax_cross_entropy(
                x,
                w,
                y,
                reduction="mean",
                implementation=sce.Xla(block_sizes),
                gradient_filter_eps=eps,
            )

        return loss

    def materialised(x, w):
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    exact = None
    if "ours_xla" in methods:
        entry, exact = _jax_entry("ours_xla", ours(None), x, w, repeats)
        results.append(entry)
    if "ours_xla_filter" in methods:
        entry, filtered = _jax_entry("ours_xla_filter", ours(FILTER_EPS), x, w, repeats)
        fraction, tiles = filter_skip_fraction(x, w, y, FILTER_EPS, block_sizes)
        entry["filter"] = {"eps": FILTER_EPS, "skipped_tile_fraction": fraction, "tiles": tiles}
        if exact is not None:
            for name, a, b in zip(("d_inputs", "d_weight"), exact[1], filtered[1], strict=True):
                scale = float(jnp.max(jnp.abs(a)))
                diff = float(jnp.max(jnp.abs(a - b)))
                entry["filter"][f"max_abs_diff_{name}"] = diff
                entry["filter"][f"max_abs_{name}"] = scale
        results.append(entry)
    if "materialised_optax" in methods:
        results.append(_jax_entry("materialised_optax", materialised, x, w, repeats)[0])
    if "torch_linear_cross_entropy" in methods:
        results.append(_torch_entry(x, w, y, repeats))
    for entry in results:
        print(f"N={n} D={d} V={v} {json.dumps(entry)}", flush=True)
    return {
        "shape": {"N": n, "D": d, "V": v, "dtype": "float32"},
        "labels": labels,
        "logits_bytes": n * v * 4,
        "results": results,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxDxV")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--labels", choices=("uniform", "zipf"), default="uniform")
    parser.add_argument("--block-n", type=int, default=None)
    parser.add_argument("--block-v", type=int, default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ours_xla", "ours_xla_filter", "materialised_optax", "torch_linear_cross_entropy"],
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    parser.add_argument("--note", default="", help="a note on the conditions, kept in the JSON")
    parser.add_argument(
        "--target-logit",
        type=float,
        default=None,
        help="align each input with its label's weight column so that its target logit is this: "
        "a peaked softmax, as a trained model has (where gradient filtering skips tiles)",
    )
    parser.add_argument(
        "--logit-scale",
        type=float,
        default=1.0,
        help="standard deviation of the logits; a trained model's are sharper than 1",
    )
    args = parser.parse_args(argv)
    default = BlockSizes.get_default("xla", num_rows=1, num_classes=1, dtype=None, hidden=1)
    block_sizes = BlockSizes(args.block_n or default.block_n, args.block_v or default.block_v)
    load_before = os.getloadavg()[0]
    runs = []
    for spec in args.shapes:
        n, d, v = (int(s) for s in spec.split("x"))
        runs.append(
            run_shape(
                n,
                d,
                v,
                repeats=args.repeats,
                labels=args.labels,
                block_sizes=block_sizes,
                methods=args.methods,
                logit_scale=args.logit_scale,
                target_logit=args.target_logit,
            )
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "linear_softmax_cross_entropy, jit(value_and_grad) wrt inputs and weight",
        "date_utc": now.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "block_sizes": {"block_n": block_sizes.block_n, "block_v": block_sizes.block_v},
        "repeats": args.repeats,
        "labels": args.labels,
        "logit_scale": args.logit_scale,
        "target_logit": args.target_logit,
        "note": " ".join(filter(None, [args.note, NOTE])),
        "loadavg": {"before": load_before, "after": os.getloadavg()[0]},
        "goals": goals(runs),
        "runs": runs,
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"linear_cpu_{now.strftime('%Y%m%dT%H%M%SZ')}.json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    if record["goals"] is not None:
        print(json.dumps({"goals": record["goals"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
