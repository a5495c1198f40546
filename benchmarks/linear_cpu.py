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

Usage::

  python benchmarks/linear_cpu.py                      # both issue shapes, f32
  python benchmarks/linear_cpu.py --shapes 2048x512x8192 --repeats 3
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
from jax_softmax_ce.kernels.linear import BlockSizes

import jax_softmax_ce as sce

DEFAULT_SHAPES = ("8192x1024x32768", "8192x512x32768")
NOTE = (
    "CPU timings on a 2-core machine shared with other processes (other sessions' test runs), so "
    "they are noisy; compare methods within one run only. Memory is XLA's compiled temporary "
    "allocation (excluding arguments and outputs), not a measured peak; PyTorch memory is not "
    "measured."
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
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = grad_fn.lower(x, w).compile()
    memory = compiled.memory_analysis()
    times = _timed(lambda: compiled(x, w), repeats)
    return {
        "method": name,
        "times_s": times,
        "median_s": statistics.median(times),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }


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


def run_shape(n: int, d: int, v: int, *, repeats: int, labels: str, block_sizes, methods):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    y = jnp.asarray(_labels(rng, n, v, labels))
    results = []

    def ours(eps):
        def loss(x, w):
            return sce.linear_softmax_cross_entropy(
                x,
                w,
                y,
                reduction="mean",
                implementation="xla",
                gradient_filter_eps=eps,
                block_sizes=block_sizes,
            )

        return loss

    def materialised(x, w):
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if "ours_xla" in methods:
        results.append(_jax_entry("ours_xla", ours(None), x, w, repeats))
    if "ours_xla_filter" in methods:
        results.append(_jax_entry("ours_xla_filter", ours(2.0**-12), x, w, repeats))
    if "materialised_optax" in methods:
        results.append(_jax_entry("materialised_optax", materialised, x, w, repeats))
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
    args = parser.parse_args(argv)
    default = BlockSizes.get_default("xla")
    block_sizes = BlockSizes(args.block_n or default.block_n, args.block_v or default.block_v)
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
        "note": NOTE,
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
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
