"""What the harness measures: ours, optax, PyTorch, Liger and cut cross-entropy, each as an
`Implementation` whose ``build(case)`` returns a runner or raises `Skip` with the reason.

A runner takes the JAX input copies of one case and returns ``time``, ``memory`` and ``errors``.
JAX runners use `jax_softmax_ce._benchmark.measure_loss`; PyTorch runners take the same arrays
through DLPack and time with the same `time_calls` (CUDA events on the GPU).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _benchmark

OURS = ("xla", "reference", "pallas")
CHECK_ROWS = 256


class Skip(Exception):
    """This implementation cannot run this case here; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    build: Callable[[dict[str, Any]], Callable[..., dict[str, Any]]]


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # an installed peer may fail to import without its GPU
        return f"{module} is not importable: {type(e).__name__}: {e}"


_PEERS: dict[str, Any] = {}


def import_peers(device: str) -> None:
    """Imports the optional peers once, so that their versions land in the environment record."""
    for module in ("optax", "torch"):
        _PEERS[module] = _optional(module)
    for module in ("liger_kernel.transformers", "cut_cross_entropy"):
        _PEERS[module] = (
            _optional(module) if device == "gpu" else f"{module} runs on GPU only (Triton)"
        )


def _peer(module: str):
    if module not in _PEERS:
        _PEERS[module] = _optional(module)
    found = _PEERS[module]
    if isinstance(found, str):
        raise Skip(found)
    return found


# ----------------------------------------------------------------------------- JAX, logits


def _jax_ce(per_example_or_reason):
    def build(case):
        if isinstance(per_example_or_reason, str):
            raise Skip(per_example_or_reason)

        def run(inputs, *, warmup, repeats):
            result = _benchmark.measure_loss(
                per_example_or_reason,
                inputs,
                backward=case["pass"] == "forward_backward",
                warmup=warmup,
                repeats=repeats,
                check_rows=CHECK_ROWS,
            )
            if result["status"] == "skipped":
                raise NotImplementedError(result["reason"])
            del result["status"]
            return result

        return run

    return build


def _mosaic_gpu_probe(case):
    """`benchmarks.mosaic_gpu_probe`, the Mosaic GPU candidate for the GPU kernel's backend."""
    if case["device"] != "gpu":
        raise Skip("the Mosaic GPU probe runs on an NVIDIA GPU only (tests interpret it on CPU)")
    from benchmarks import mosaic_gpu_probe

    return _jax_ce(mosaic_gpu_probe.per_example)(case)


# ----------------------------------------------------------------------------- JAX, linear


def _optax_linear(x, w, y):
    optax = _peer("optax")
    logits = x @ w
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _ours_linear(implementation):
    def per_example(x, w, y):
        import jax_softmax_ce

        return jax_softmax_ce.linear_softmax_cross_entropy(x, w, y, implementation=implementation)

    return per_example


def _has_linear() -> None:
    import jax_softmax_ce

    if not hasattr(jax_softmax_ce, "linear_softmax_cross_entropy"):
        raise Skip("this jax_softmax_ce has no linear_softmax_cross_entropy")


def _linear_errors(per_example, x, w, y) -> dict[str, float]:
    """Errors on the first rows: losses against float64 logits ``x @ w``, and the gradient with
    respect to ``x`` (which is ``(softmax - onehot) @ w.T`` row by row)."""
    rows = min(CHECK_ROWS, x.shape[0])
    ref_loss, ref_dx = _linear_reference((x, w, y))
    x, y = x[:rows], y[:rows]
    values = jax.jit(per_example)(x, w, y)
    dx = jax.jit(jax.grad(lambda x, w, y: jnp.sum(per_example(x, w, y))))(x, w, y)
    values = np.asarray(values).astype(np.float64)
    return {
        "loss_max_rel_error": _benchmark.max_relative_error(values, ref_loss),
        "mean_loss_rel_error": _benchmark.max_relative_error(
            values.mean(keepdims=True), ref_loss.mean(keepdims=True)
        ),
        "grad_inputs_max_abs_error": _benchmark.max_abs_error(
            np.asarray(dx).astype(np.float64), ref_dx
        ),
    }


def _jax_linear(per_example, *, needs: str | None = None):
    def build(case):
        if needs is None:
            _has_linear()
        else:
            _peer(needs)
        backward = case["pass"] == "forward_backward"

        def mean_loss(x, w, y):
            return jnp.mean(per_example(x, w, y))

        fn = jax.value_and_grad(mean_loss, argnums=(0, 1)) if backward else mean_loss

        def run(inputs, *, warmup, repeats):
            memory = _benchmark.compiled_memory(fn, *inputs[0])
            timing = _benchmark.time_calls(jax.jit(fn), inputs, warmup=warmup, repeats=repeats)
            errors = _linear_errors(per_example, *inputs[0])
            return {"time": timing.as_dict(), "memory": memory, "errors": errors}

        return run

    return build


# ----------------------------------------------------------------------------- PyTorch


class _CudaEvents:
    """`_benchmark.Stopwatch` on CUDA events: the GPU's own clock, no host overhead."""

    def __init__(self, torch):
        self._torch = torch

    def start(self) -> None:
        self._start = self._torch.cuda.Event(enable_timing=True)
        self._stop = self._torch.cuda.Event(enable_timing=True)
        self._start.record()

    def stop(self) -> float:
        self._stop.record()
        self._stop.synchronize()
        return self._start.elapsed_time(self._stop) / 1e3


def _to_torch(torch, array):
    try:
        return torch.from_dlpack(array)
    except Exception:  # a backend without DLPack for this dtype: copy through the host
        host = np.asarray(array)
        if host.dtype.name == "bfloat16":
            return torch.from_numpy(host.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(host)


def _torch_errors(torch, loss_fn, tensors, grad_index, want) -> dict[str, float]:
    """Errors on the first rows against ``want``, the float64 ``(losses, gradient)``; the first
    and last tensors are per-row (inputs and labels)."""
    rows = min(CHECK_ROWS, tensors[0].shape[0])
    per_row = {0, len(tensors) - 1}
    sliced = [(t[:rows] if i in per_row else t).detach().clone() for i, t in enumerate(tensors)]
    if sliced[grad_index].is_floating_point():
        sliced[grad_index].requires_grad_(True)
    losses = loss_fn(*sliced, reduction="none")
    losses.sum().backward()
    values = losses.detach().float().cpu().numpy().astype(np.float64)
    grad = sliced[grad_index].grad.float().cpu().numpy().astype(np.float64)
    ref_loss, ref_grad = want
    return {
        "loss_max_rel_error": _benchmark.max_relative_error(values, ref_loss),
        "mean_loss_rel_error": _benchmark.max_relative_error(
            values.mean(keepdims=True), ref_loss.mean(keepdims=True)
        ),
        "grad_max_abs_error": _benchmark.max_abs_error(grad, ref_grad),
    }


def _torch_runner(case, loss_fn, to_tensors, grad_indices, reference):
    """A runner for a PyTorch loss ``loss_fn(*tensors, reduction=...)``."""
    torch = _peer("torch")
    gpu = case.get("device") == "gpu"
    if gpu and not torch.cuda.is_available():
        raise Skip("torch has no CUDA device")
    backward = case["pass"] == "forward_backward"

    def call(*tensors):
        for i in grad_indices:
            tensors[i].grad = None
        if not backward:
            with torch.no_grad():
                return loss_fn(*tensors, reduction="mean")
        loss = loss_fn(*tensors, reduction="mean")
        loss.backward()
        return loss

    def sync(_):
        if gpu:
            torch.cuda.synchronize()

    def run(inputs, *, warmup, repeats):
        sets = []
        for arrays in inputs:
            tensors = to_tensors(torch, arrays)
            for i in grad_indices:
                tensors[i] = tensors[i].detach().requires_grad_(backward)
            sets.append(tensors)
        memory: dict[str, Any] = {"temp_bytes": None}
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call(*sets[0])
            torch.cuda.synchronize()
            memory["device_peak_bytes"] = torch.cuda.max_memory_allocated() - before
        timing = _benchmark.time_calls(
            call,
            sets,
            warmup=warmup,
            repeats=repeats,
            sync=sync,
            stopwatch=_CudaEvents(torch) if gpu else None,
        )
        try:
            want = reference(inputs[0])
            errors = _torch_errors(torch, loss_fn, sets[0], grad_indices[0], want)
        except Exception as e:  # e.g. a peer without reduction="none": keep its timing
            errors = {"unavailable": f"{type(e).__name__}: {e}"}
        return {"time": timing.as_dict(), "memory": memory, "errors": errors}

    return run


def _ce_reference(arrays):
    """float64 losses and logits gradient of the first rows of a case's JAX arrays."""
    logits, labels = arrays
    rows = min(CHECK_ROWS, logits.shape[0])
    z = np.asarray(logits[:rows]).astype(np.float64)
    return _benchmark.reference_cross_entropy(z, np.asarray(labels[:rows]).astype(np.int64))


_LINEAR_REFERENCE: list = []  # one slot: [(x, w, y), result], for the case being measured


def _linear_reference(arrays):
    """float64 losses and inputs gradient of the first rows of a case's JAX arrays ``(x [N, D],
    w [D, V], y)``. Every implementation of a case is checked against the same result, which is
    computed once per case: at D=4096, V=128256 it is a 4 GiB float64 weight and two matmuls."""
    if _LINEAR_REFERENCE and all(a is b for a, b in zip(_LINEAR_REFERENCE[0], arrays, strict=True)):
        return _LINEAR_REFERENCE[1]
    x, w, y = arrays
    rows = min(CHECK_ROWS, x.shape[0])
    x64, w64 = np.asarray(x[:rows]).astype(np.float64), np.asarray(w).astype(np.float64)
    loss, dlogits = _benchmark.reference_cross_entropy(
        x64 @ w64, np.asarray(y[:rows]).astype(np.int64)
    )
    result = (loss, dlogits @ w64.T)
    _LINEAR_REFERENCE[:] = [tuple(arrays), result]
    return result


def _torch_ce_tensors(torch, arrays):
    logits, labels = arrays
    return [_to_torch(torch, logits), _to_torch(torch, labels).long()]


def _torch_linear_tensors(torch, arrays):
    x, w, labels = arrays  # PyTorch's linear weight is [V, D]
    return [
        _to_torch(torch, x),
        _to_torch(torch, w).T.contiguous(),
        _to_torch(torch, labels).long(),
    ]


def _torch_cross_entropy(case):
    torch = _peer("torch")
    return _torch_runner(
        case, torch.nn.functional.cross_entropy, _torch_ce_tensors, [0], _ce_reference
    )


def _torch_linear_cross_entropy(case):
    torch = _peer("torch")
    fused = getattr(torch.nn.functional, "linear_cross_entropy", None)
    if fused is None:
        raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy")
    return _torch_runner(case, fused, _torch_linear_tensors, [0, 1], _linear_reference)


def _torch_matmul_cross_entropy(case):
    torch = _peer("torch")

    def loss_fn(x, w, y, *, reduction):
        return torch.nn.functional.cross_entropy(x @ w.T, y, reduction=reduction)

    return _torch_runner(case, loss_fn, _torch_linear_tensors, [0, 1], _linear_reference)


def _liger_cross_entropy(case):
    liger = _peer("liger_kernel.transformers")
    _peer("torch")

    def loss_fn(logits, labels, *, reduction):
        return liger.LigerCrossEntropyLoss(reduction=reduction)(logits, labels)

    return _torch_runner(case, loss_fn, _torch_ce_tensors, [0], _ce_reference)


def _liger_linear_cross_entropy(case):
    liger = _peer("liger_kernel.transformers")
    _peer("torch")

    def loss_fn(x, w, y, *, reduction):
        return liger.LigerFusedLinearCrossEntropyLoss(reduction=reduction)(w, x, y)

    return _torch_runner(case, loss_fn, _torch_linear_tensors, [0, 1], _linear_reference)


def _cut_cross_entropy(case):
    cce = _peer("cut_cross_entropy")
    _peer("torch")

    def loss_fn(x, w, y, *, reduction):
        return cce.linear_cross_entropy(x, w, y, reduction=reduction)

    return _torch_runner(case, loss_fn, _torch_linear_tensors, [0, 1], _linear_reference)


def _on_device(device: str, build):
    """Tags each case with the device, which the PyTorch runners need."""

    def wrapped(case):
        return build({**case, "device": device})

    return wrapped


def implementations(suite: str, device: str) -> list[Implementation]:
    """Everything measured in ``suite`` on ``device``, in the order of the tables."""
    if suite == "ce":
        candidates = _benchmark.cross_entropy_candidates(OURS, backend=device)
        found = [Implementation(name, _jax_ce(fn)) for name, fn in candidates.items()]
        found.append(Implementation("torch:F.cross_entropy", _torch_cross_entropy))
        found.append(Implementation("liger:LigerCrossEntropyLoss", _liger_cross_entropy))
        # Last in each case: a kernel never run on hardware fails, or at worst hangs, only after
        # everything else of the case is measured.
        found.append(Implementation("probe:mosaic_gpu", _mosaic_gpu_probe))
    else:
        found = [Implementation("optax:x@w", _jax_linear(_optax_linear, needs="optax"))]
        for implementation in OURS:
            per_example = _ours_linear(implementation)
            found.append(
                Implementation(f"jax_softmax_ce.linear:{implementation}", _jax_linear(per_example))
            )
        found += [
            Implementation("torch:x@w.T+F.cross_entropy", _torch_matmul_cross_entropy),
            Implementation("torch:F.linear_cross_entropy", _torch_linear_cross_entropy),
            Implementation("liger:LigerFusedLinearCrossEntropyLoss", _liger_linear_cross_entropy),
            Implementation("cce:linear_cross_entropy", _cut_cross_entropy),
        ]
    return [dataclasses.replace(i, build=_on_device(device, i.build)) for i in found]
