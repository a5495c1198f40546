"""Block sizes of the GPU (Triton) kernels, timed on the GPU: the data for their defaults.

`BlockSizes.get_default`'s GPU blocks were reasoned, not measured. This sweep times, on one GPU
call with a deadline, forward+backward of

- the logits loss (``"pallas"``, integer labels, mean) at ``[N, V]`` over ``(block_n, block_v)``
  and the kernels' warp count, bfloat16 first (the goal case), then float32;
- the fused loss (``linear_softmax_cross_entropy``, ``"pallas"``) at ``[N, D] x [D, V]`` over
  ``(block_n, block_v, block_d)`` tiles and both backward schedules (one kernel with whole
  float32 accumulators, or the two passes of chunks that `Pallas.accumulator_bytes` bounds),

each against optax on the same inputs, and writes every measurement to ``--out`` as it goes
(a cut run keeps what it measured). A failed configuration (one Triton cannot compile, say) is
recorded with its error, not raised.

    python -m benchmarks.gpu_tune --out benchmarks/results/gpu_tune_gpu.json --deadline-s 200

``--quick`` runs a handful of small cases anywhere (on a CPU, interpreted), to check the
plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental.pallas import triton as pltriton
from jax_softmax_ce.kernels import cross_entropy_gpu, linear_gpu

import jax_softmax_ce as sce
from benchmarks import run
from jax_softmax_ce import _benchmark


@contextlib.contextmanager
def _warps(module, num_warps: int | None):
    """The kernels of ``module`` compiled with ``num_warps`` (None: the module's own rule)."""
    if num_warps is None:
        yield
        return
    own = module._compiler_params

    def params(*args):
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=own(*args).num_stages)

    module._compiler_params = params
    try:
        yield
    finally:
        module._compiler_params = own


def _ce_step(implementation):
    def loss(logits, labels):
        if implementation is None:
            per_example = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), labels
            )
        else:
            per_example = sce.softmax_cross_entropy_with_integer_labels(
                logits, labels, implementation=implementation
            )
        return jnp.mean(per_example)

    return jax.jit(jax.value_and_grad(loss))


def _linear_step(implementation):
    def loss(x, w, y):
        if implementation is None:
            logits = (x @ w).astype(jnp.float32)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        return sce.linear_softmax_cross_entropy(
            x, w, y, reduction="mean", implementation=implementation
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _plan(quick: bool) -> list[dict[str, Any]]:
    """The cases, most wanted first (bfloat16 logits loss, the fused loss, warp counts,
    float32): each ``{"suite", "dtype", shape..., "blocks", ...}``; ``blocks`` None is optax."""
    if quick:
        shape, linear_shape = dict(n=8, v=300), dict(n=16, d=32, v=200)
        blocks, warps, tiles, accs = [(4, 128), (8, 64)], [((4, 128), 2)], [(16, 32, 16)], [1]
    else:
        shape, linear_shape = dict(n=8192, v=128256), dict(n=4096, d=4096, v=128256)
        blocks = [
            (bn, bv)
            for bn in (1, 2, 4, 8, 16, 32)
            for bv in (512, 1024, 2048, 4096, 8192)
            if 2048 <= bn * bv <= 65536
        ]
        warps = [(b, w) for b in ((4, 2048), (8, 2048), (16, 1024)) for w in (4, 16)]
        tiles = [(64, 128, 64), (128, 128, 64), (128, 256, 64), (64, 256, 64), (128, 128, 32)]
        tiles += [(256, 128, 64), (128, 256, 32)]
        accs = [1 << 33]

    def ce(dtype, grid):
        return [dict(suite="ce", dtype=dtype, **shape, blocks=None)] + [
            dict(suite="ce", dtype=dtype, **shape, blocks=list(b), num_warps=w) for b, w in grid
        ]

    linear = [dict(suite="linear", dtype="bfloat16", **linear_shape, blocks=None)]
    for acc in (None, *accs):
        linear += [
            dict(
                suite="linear",
                dtype="bfloat16",
                **linear_shape,
                blocks=list(t),
                accumulator_bytes=acc,
            )
            for t in tiles
        ]
    bf16 = ce("bfloat16", [(b, None) for b in blocks])
    return bf16 + linear + ce("bfloat16", warps)[1:] + ce("float32", [(b, None) for b in blocks])


def _run(case, inputs, *, interpret: bool, repeats: int) -> dict[str, Any]:
    if case["blocks"] is None:
        implementation = None
    else:
        implementation = sce.Pallas(
            block_sizes=sce.BlockSizes(*case["blocks"]),
            interpret=interpret,
            accumulator_bytes=case.get("accumulator_bytes"),
        )
    module = cross_entropy_gpu if case["suite"] == "ce" else linear_gpu
    step = (_ce_step if case["suite"] == "ce" else _linear_step)(implementation)
    with _warps(module, case.get("num_warps")):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*inputs[0]))
        compile_s = time.perf_counter() - t0
        timing = _benchmark.time_calls(step, inputs, warmup=1, repeats=repeats)
    return {"compile_s": compile_s, **timing.as_dict()}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    interpret = jax.default_backend() != "gpu"
    record = {**_benchmark.environment(), "interpret": interpret, "results": []}
    inputs: dict[tuple, list] = {}
    for case in _plan(args.quick):
        left = args.deadline_s - (time.perf_counter() - start)
        if left < 5:
            record["results"].append({**case, "skipped": "deadline"})
            continue
        key = (case["suite"], case["dtype"], case["n"], case.get("d"), case["v"])
        if key not in inputs:
            inputs.clear()  # one shape's copies on the device at a time
            inputs[key] = run._jax_inputs(case)  # the harness's inputs, copies to rotate among
        try:
            result = _run(case, inputs[key], interpret=interpret, repeats=args.repeats)
        except Exception as error:
            result = {"error": "".join(traceback.format_exception_only(error)).strip()[-800:]}
        record["results"].append({**case, **result})
        ms = result.get("median_s")
        print(
            case["suite"],
            case["dtype"],
            case["blocks"],
            case.get("num_warps"),
            case.get("accumulator_bytes"),
            f"{ms * 1e3:.3f} ms" if ms is not None else result["error"][:200],
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
