"""Measuring tools shared by the main job (``python -m jax_softmax_ce``) and ``benchmarks/``.

Everything that turns a function into a number lives here, once: the median time of repeated
calls, the compiled temporary memory, a measured copy bandwidth and matmul FLOP/s to compare
against, and errors against a float64 NumPy reference. Nothing here asserts anything about time.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

# Inputs rotate among copies whose total size is at least this, so that no call finds its
# operands in a cache that the previous call warmed (the largest last-level caches are ~256 MiB).
CACHE_FLUSH_BYTES = 256 * 2**20
# Gradient entries smaller than this are not judged by relative error: XLA on the CPU flushes
# float32 subnormals to 0.
GRAD_SMALLEST = 1e-30


class Stopwatch(Protocol):
    """Times one call: ``start()`` before it, ``stop()`` after it returns seconds."""

    def start(self) -> None: ...

    def stop(self) -> float: ...


class WallClock:
    """`Stopwatch` on the host's monotonic clock; the caller synchronises before ``stop``."""

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


@dataclasses.dataclass(frozen=True)
class Timing:
    """Every timed repeat in seconds, in the order they ran (warm-up calls excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "repeats_s": list(self.seconds)}


def copies_for(nbytes: int, *, at_least: int = 2, at_most: int = 8) -> int:
    """How many input copies to rotate among so that they span `CACHE_FLUSH_BYTES`."""
    return max(at_least, min(at_most, math.ceil(CACHE_FLUSH_BYTES / max(nbytes, 1)) + 1))


def time_calls(
    fn: Callable[..., Any],
    arg_sets: Sequence[Sequence[Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[Any], Any] = jax.block_until_ready,
    stopwatch: Stopwatch | None = None,
) -> Timing:
    """Times ``fn(*args)`` call by call, rotating ``args`` over ``arg_sets``.

    Each call is synchronised with ``sync`` (``jax.block_until_ready`` by default) before the
    clock stops, so the time covers the whole computation and one call never overlaps the next.
    ``warmup`` untimed calls come first (compilation, autotuning, allocator growth).
    """
    if not arg_sets:
        raise ValueError("arg_sets must hold at least one set of arguments")
    clock = WallClock() if stopwatch is None else stopwatch
    for i in range(warmup):
        sync(fn(*arg_sets[i % len(arg_sets)]))
    seconds = []
    for i in range(repeats):
        args = arg_sets[(warmup + i) % len(arg_sets)]
        clock.start()
        sync(fn(*args))
        seconds.append(clock.stop())
    return Timing(tuple(seconds))


def compiled_memory(fn: Callable[..., Any], *args: Any) -> dict[str, int | None]:
    """XLA's buffer assignment for ``jit(fn)(*args)``: temporary, argument and output bytes.

    ``temp_bytes`` is what the compiled program allocates beyond its arguments and outputs: for a
    loss, the intermediates such as float32 copies of the logits. Fields a backend does not report
    are None.
    """
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    fields = {
        "temp_bytes": "temp_size_in_bytes",
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    return {key: _int_or_none(getattr(analysis, name, None)) for key, name in fields.items()}


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def device_memory_in_use(device: jax.Device | None = None) -> dict[str, int] | None:
    """``bytes_in_use`` and ``peak_bytes_in_use`` of the device allocator; None where the backend
    keeps no statistics (the CPU). The peak is process-wide and cannot be reset."""
    device = device or jax.devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_in_use" not in stats:
        return None
    return {
        "bytes_in_use": int(stats["bytes_in_use"]),
        "peak_bytes_in_use": int(stats.get("peak_bytes_in_use", stats["bytes_in_use"])),
    }


def copy_bandwidth(
    *, nbytes: int = 256 * 2**20, repeats: int = 10, device: jax.Device | None = None
) -> dict[str, Any]:
    """Measured device memory bandwidth of a jitted elementwise copy ``y = x + 1`` (float32).

    The copy reads and writes ``nbytes`` each, so the bandwidth is ``2 nbytes / median time``;
    this is the practical roofline that a memory-bound loss is compared against. The input is
    donated, so the output reuses its memory: a fresh output buffer would add the operating
    system's first-touch page faults (on CPU they cost more than the copy itself).
    """
    device = device or jax.devices()[0]
    n = max(1, nbytes // 4)
    xs = [
        jax.device_put(jnp.full((n,), float(i), jnp.float32), device)
        for i in range(copies_for(4 * n))
    ]
    add_one = jax.jit(lambda x: x + jnp.ones((), x.dtype), donate_argnums=0)

    def copy(i: int) -> jax.Array:
        xs[i] = add_one(xs[i])
        return xs[i]

    timing = time_calls(copy, [(i,) for i in range(len(xs))], warmup=2, repeats=repeats)
    moved = 2 * 4 * n
    return {
        "bytes_per_s": moved / timing.median,
        "bytes_moved": moved,
        "kernel": "jit(x + 1, donated), float32",
        **timing.as_dict(),
    }


def matmul_flops(
    *, size: int = 2048, dtype=jnp.float32, repeats: int = 10, device: jax.Device | None = None
) -> dict[str, Any]:
    """Measured FLOP/s of a jitted square matmul ``[size, size] @ [size, size]`` in ``dtype``."""
    device = device or jax.devices()[0]
    keys = jax.random.split(jax.random.key(0), 4)
    mats = [
        jax.device_put(jax.random.normal(k, (size, size), jnp.float32).astype(dtype), device)
        for k in keys
    ]
    matmul = jax.jit(jnp.matmul)
    pairs = [(mats[i], mats[(i + 1) % len(mats)]) for i in range(len(mats))]
    timing = time_calls(matmul, pairs, warmup=2, repeats=repeats)
    flops = 2 * size**3
    return {
        "flop_per_s": flops / timing.median,
        "flops": flops,
        "kernel": f"jit(matmul) [{size}, {size}] @ [{size}, {size}], {np.dtype(dtype).name}",
        **timing.as_dict(),
    }


def reference_cross_entropy(
    logits,
    labels,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-example losses ``[N]`` and gradient of their sum ``[N, V]``, integer labels.

    The loss is ``(1 - e)(lse - z_t) + e/V sum_k (lse - z_k) + z_loss lse**2``; its gradient is
    ``(1 + 2 z_loss lse) softmax(z) - q``. Rows labelled ``ignore_index`` have loss and gradient 0.

    With ``m`` the max logit and ``r = sum_{k != argmax} exp(z_k - m)`` the mass besides it, the
    loss's terms are ``log1p(r) - (z_k - m)`` and ``1 - p`` at the max is ``r / (1 + r)``: at a
    confident row (``r`` below float64's epsilon) neither cancels, so the gradient's entries keep
    relative accuracy, the target's included.
    """
    z = np.asarray(logits, np.float64)
    t = np.asarray(labels)
    n, v = z.shape
    rows = np.arange(n)
    top = z.argmax(axis=1)
    m = z[rows, top][:, None]
    exps = np.exp(z - m)
    exps_besides_top = exps.copy()
    exps_besides_top[rows, top] = 0.0
    r = exps_besides_top.sum(axis=1, keepdims=True)
    log_s = np.log1p(r)
    lse = m + log_s
    counted = np.ones(n, bool) if ignore_index is None else t != ignore_index
    t_safe = np.where(counted, t, 0)
    q = np.zeros((n, v))
    q[rows, t_safe] = 1.0 - label_smoothing
    q += label_smoothing / v
    loss = np.sum(q * (log_s - (z - m)), axis=1) + z_loss * lse[:, 0] ** 2
    p = exps / (1.0 + r)
    c = 1.0 + 2.0 * z_loss * lse
    grad = c * p - q
    # At the max, c p - q = (c - 1) p - q (1 - p) + (1 - q) p, with 1 - p = r / (1 + r).
    p_top, q_top = p[rows, top], q[rows, top]
    q_besides_top = np.where(np.arange(v) == top[:, None], 0.0, q).sum(axis=1)
    grad[rows, top] = (c[:, 0] - 1.0) * p_top - q_top * (r[:, 0] / (1.0 + r[:, 0]))
    grad[rows, top] += q_besides_top * p_top
    return np.where(counted, loss, 0.0), np.where(counted[:, None], grad, 0.0)


def max_abs_error(values, reference) -> float:
    """``max |values - reference|``, compared in float64."""
    diff = np.abs(np.asarray(values, np.float64) - np.asarray(reference, np.float64))
    return float(diff.max(initial=0.0))


def max_relative_error(values, reference, *, smallest: float = 0.0) -> float:
    """``max |values - reference| / |reference|`` over entries where the reference is nonzero
    and at least ``smallest`` in magnitude."""
    values = np.asarray(values, np.float64)
    reference = np.asarray(reference, np.float64)
    judged = (reference != 0) & (np.abs(reference) >= smallest)
    diff = np.abs(values - reference)[judged] / np.abs(reference[judged])
    return float(diff.max(initial=0.0))


def random_problem(
    key: jax.Array, n: int, v: int, dtype, *, scale: float = 4.0
) -> tuple[jax.Array, jax.Array]:
    """Logits ``[n, v]`` of standard deviation ``scale`` in ``dtype`` and labels ``[n]`` in
    ``[0, v)``. A scale of a few units gives a softmax that is neither flat nor one-hot."""
    k_logits, k_labels = jax.random.split(key)
    logits = (scale * jax.random.normal(k_logits, (n, v), jnp.float32)).astype(dtype)
    labels = jax.random.randint(k_labels, (n,), 0, v, jnp.int32)
    return logits, labels


def environment(device: jax.Device | None = None) -> dict[str, Any]:
    """What a result needs to be read later: device, versions, date and command line."""
    device = device or jax.devices()[0]
    import jaxlib

    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
    }
    for name in ("optax", "torch", "triton", "liger_kernel", "cut_cross_entropy"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "host": {"machine": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count()},
        "versions": versions,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loss_errors(
    per_example: Callable[[jax.Array, jax.Array], jax.Array], logits, labels, **reference_options
) -> dict[str, float]:
    """Errors of ``per_example(logits, labels)`` (losses ``[N]``) and of the gradient of their sum,
    against `reference_cross_entropy` on the same, already rounded, logits.

    Returns the max relative error of the per-example losses, the relative error of their mean,
    the max absolute error of the gradient (whose entries ``softmax - onehot`` lie in [-1, 1]) and
    its max relative error per entry, over entries of magnitude at least `GRAD_SMALLEST` (XLA on
    the CPU flushes float32 subnormals). With label smoothing or a z-loss an entry is a difference
    ``c p_k - q_k`` that may cancel, where no float32 result keeps relative accuracy.
    Losses are independent per row, so a caller may pass the first rows of a large problem.
    """
    values = jax.jit(per_example)(logits, labels)
    grads = jax.jit(jax.grad(lambda x, y: jnp.sum(per_example(x, y))))(logits, labels)
    ref_loss, ref_grad = reference_cross_entropy(
        np.asarray(logits).astype(np.float64), np.asarray(labels), **reference_options
    )
    values = np.asarray(values).astype(np.float64)
    grads = np.asarray(grads).astype(np.float64)
    return {
        "loss_max_rel_error": max_relative_error(values, ref_loss),
        "mean_loss_rel_error": max_relative_error(
            values.mean(keepdims=True), ref_loss.mean(keepdims=True)
        ),
        "grad_max_abs_error": max_abs_error(grads, ref_grad),
        "grad_max_rel_error": max_relative_error(grads, ref_grad, smallest=GRAD_SMALLEST),
    }


def measure_loss(
    per_example: Callable[[jax.Array, jax.Array], jax.Array],
    arg_sets: Sequence[tuple[jax.Array, jax.Array]],
    *,
    backward: bool,
    warmup: int = 1,
    repeats: int = 5,
    check_rows: int = 256,
) -> dict[str, Any]:
    """Time, compiled memory and errors of one JAX loss on one problem.

    The timed function is ``jit(value_and_grad(mean loss))`` with ``backward``, else
    ``jit(mean loss)``, called on each ``(logits, labels)`` of ``arg_sets`` in turn. Errors are
    measured on the first ``check_rows`` rows. A loss that raises ``NotImplementedError`` while
    tracing is reported as ``{"status": "skipped", "reason": ...}``.
    """

    def mean_loss(logits, labels):
        return jnp.mean(per_example(logits, labels))

    fn = jax.value_and_grad(mean_loss) if backward else mean_loss
    logits, labels = arg_sets[0]
    try:
        memory = compiled_memory(fn, logits, labels)
    except NotImplementedError as e:
        return {"status": "skipped", "reason": f"NotImplementedError: {e}"}
    device_before = device_memory_in_use()
    timing = time_calls(jax.jit(fn), arg_sets, warmup=warmup, repeats=repeats)
    device_after = device_memory_in_use()
    if device_before is not None and device_after is not None:
        grew = device_after["peak_bytes_in_use"] > device_before["peak_bytes_in_use"]
        memory["device_peak_bytes"] = (
            device_after["peak_bytes_in_use"] - device_before["bytes_in_use"] if grew else None
        )
    rows = min(check_rows, logits.shape[0])
    errors = loss_errors(per_example, logits[:rows], labels[:rows])
    return {"status": "ok", "time": timing.as_dict(), "memory": memory, "errors": errors}


OUR_IMPLEMENTATIONS = ("xla", "reference", "pallas")


def cross_entropy_candidates(
    implementations: Sequence[str] = OUR_IMPLEMENTATIONS, *, backend: str | None = None
) -> dict[str, Callable[[jax.Array, jax.Array], jax.Array] | str]:
    """Per-example integer-label losses to compare, by name; a string instead of a function is
    the reason that candidate is skipped.

    ``"optax"`` is optax's loss (skipped when optax is not installed), ``"jax_softmax_ce:<impl>"``
    is ours with ``implementation=<impl>``. On the CPU, Pallas runs only in interpret mode, a
    correctness mode that is not worth timing, so ``pallas`` is skipped there.
    """
    from jax_softmax_ce import cross_entropy

    backend = backend or jax.devices()[0].platform
    candidates: dict[str, Callable[[jax.Array, jax.Array], jax.Array] | str] = {}
    try:
        import optax
    except ImportError:
        candidates["optax"] = "optax is not installed (pip install optax)"
    else:
        candidates["optax"] = optax.softmax_cross_entropy_with_integer_labels
    for implementation in implementations:
        name = f"jax_softmax_ce:{implementation}"
        if implementation == "pallas" and backend == "cpu":
            candidates[name] = "Pallas runs only in interpret mode on CPU; not timed"
            continue
        candidates[name] = functools.partial(
            cross_entropy.softmax_cross_entropy_with_integer_labels, implementation=implementation
        )
    return candidates
