"""The validated, hashable statics of one loss call, and the implementation values.

The public layer turns the caller's keyword arguments into one `Options` (static, hashable: it is
a ``nondiff_argnums`` entry of every ``custom_vjp`` and part of a ``jit`` cache key), and the
``implementation`` argument into one configuration value (`Xla`, `Pallas` or `Reference`).
Implementations never validate anything again.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

REDUCTIONS = ("none", "sum", "mean")
IMPLEMENTATIONS = ("xla", "pallas", "reference")
SCHEDULES = ("tpu", "gpu")
MASKS = (None, "row", "col", "full")


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of one loss call.

    Attributes:
      label_smoothing: ``e`` in ``q = (1 - e) q + e / V_valid``, in ``[0, 1)``.
      z_loss: coefficient of ``lse**2``, ``>= 0``; exactly 0 skips the term.
      logit_softcap: ``c`` in ``c * tanh(z / c)``, ``> 0``, or None for no capping.
      temperature: a Python float ``T > 0``, or None when an array temperature travels as an
        operand beside the logits.
      ignore_index: integer label whose examples do not count, or None.
      integer: whether the labels are integer class ids (else probabilities).
      mask: how the ``where`` mask is laid out, decided once from its canonical shape: None (no
        mask), ``"row"`` (``[N, 1]``, whole examples), ``"col"`` (``[1, V]``, one vocabulary
        mask for every example) or ``"full"`` (``[N, V]``).
      filter_eps: the fused loss's gradient filter threshold (0 for exact gradients).
      vd: the fused loss's projection is ``[V, D]`` (tied embeddings) rather than ``[D, V]``.
      aux: ``return_aux=True``: the implementation also returns the per-example
        `monitoring.CrossEntropyAux`, from the same pass.
      vocab_axis: the ``shard_map`` axis (a name or a tuple of names) over which the class axis
        is split (`jax_softmax_ce._sharding`), or None.
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    temperature: float | None = 1.0
    ignore_index: int | None = None
    integer: bool = True
    mask: str | None = None
    filter_eps: float = 0.0
    vd: bool = False
    aux: bool = False
    vocab_axis: str | tuple[str, ...] | None = None


def python_float(name: str, value) -> float:
    """``value`` as a Python float; a TypeError naming ``name`` for what is not a number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            value = float(value)
        except Exception as err:
            raise TypeError(
                f"{name} must be a Python number (it is static under jit), got {value!r}"
            ) from err
    return float(value)


def make_options(
    *,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    temperature=1.0,
    ignore_index=None,
    integer: bool = True,
    gradient_filter_eps=None,
    temperature_is_array: bool = False,
    return_aux: bool = False,
    vocab_axis_name=None,
) -> Options:
    """Validates the scalar options and returns them as one hashable `Options` (its ``mask``
    and ``vd`` are set when the problem is canonicalised)."""
    label_smoothing = python_float("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    z_loss = python_float("z_loss", z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if logit_softcap is not None:
        logit_softcap = python_float("logit_softcap", logit_softcap)
        if not 0.0 < logit_softcap < math.inf:
            raise ValueError(f"logit_softcap must be > 0 and finite, or None, got {logit_softcap}")
    if temperature_is_array:
        temperature = None
    else:
        temperature = python_float("temperature", temperature)
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be a Python int or None, got {ignore_index!r}")
        ignore_index = int(ignore_index)
    filter_eps = 0.0
    if gradient_filter_eps is not None:
        if isinstance(gradient_filter_eps, bool) or not isinstance(
            gradient_filter_eps, numbers.Real
        ):
            raise TypeError(
                f"gradient_filter_eps must be a Python float or None, got {gradient_filter_eps!r}"
            )
        filter_eps = float(gradient_filter_eps)
        if not 0.0 <= filter_eps < 1.0:
            raise ValueError(f"gradient_filter_eps must be in [0, 1), got {gradient_filter_eps}")
    if not isinstance(return_aux, (bool, np.bool_)):
        raise TypeError(f"return_aux must be a Python bool (it is static), got {return_aux!r}")
    return Options(
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
        ignore_index=ignore_index,
        integer=bool(integer),
        filter_eps=filter_eps,
        aux=bool(return_aux),
        vocab_axis=vocab_axis(vocab_axis_name),
    )


def vocab_axis(name) -> str | tuple[str, ...] | None:
    """``vocab_axis_name`` validated: None, a mesh axis name, or a tuple of names."""
    if name is None or isinstance(name, str):
        return name
    if isinstance(name, (tuple, list)) and name and all(isinstance(a, str) for a in name):
        return tuple(name)
    raise TypeError(
        f"vocab_axis_name must be None, a mesh axis name or a tuple of names, got {name!r}"
    )


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def pow2_ceil(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows (tokens), vocabulary columns and hidden chunk of one block of logits.

    Attributes:
      block_n: rows per block.
      block_v: vocabulary entries per block.
      block_d: hidden entries per matmul step of the fused loss's Pallas kernels, which form each
        tile of logits as a sum over ``block_d`` chunks of ``D`` so that no block spans the
        hidden size; None for the schedule's default. The logits losses and the fused loss's
        XLA loops (which contract all of ``D`` at once) do not use it.

    What each schedule needs when it compiles (checked where it is lowered, with the reason):
    the TPU (Mosaic) blocks respect the ``(8, 128)`` tiling (``block_n`` a multiple of the
    sublane count of every row-blocked operand's dtype, 8 for 32-bit and 16 for 16-bit values,
    ``block_v`` and ``block_d`` multiples of 128, or each the whole axis); the GPU (Triton)
    blocks are powers of two, and at least 16 in the fused loss (``tl.dot``'s minimum).
    """

    block_n: int
    block_v: int
    block_d: int | None = None

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if name == "block_d" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

    @classmethod
    def get_default(
        cls, schedule: str, *, num_rows: int, num_classes: int, dtype, hidden: int | None = None
    ) -> BlockSizes:
        """The default blocks of ``schedule`` (``"tpu"``, ``"gpu"``, or ``"xla"`` for the fused
        loss's loops) for ``[num_rows, num_classes]`` logits of ``dtype``; ``hidden`` is the
        fused loss's ``D`` (None for the logits losses). The GPU blocks are the fastest that
        `benchmarks.gpu_tune` timed on an H200 (`benchmarks/results/gpu_tune_gpu.json`); the
        TPU and XLA ones are reasoned, not yet tuned on a device.

        - Logits losses: on TPU, up to 128 rows (a multiple of 32, the sublanes of every
          operand's dtype) by up to 2048 columns; on GPU, one row of 8 KiB of logits (4096
          16-bit or 2048 32-bit values): forward+backward at ``[8192, 128256]`` took 3.2 ms in
          bfloat16 and 4.1 ms in float32 there, against 4.7 and 5.3 ms with the earlier 4 rows
          of 16 KiB; more rows per program were slower still.
        - Fused loss: ``(1024, 2048)`` tiles for XLA; ``(256, 512)`` tiles in 512-wide hidden
          chunks on TPU (multiples of the ``(8, 128)`` tiling and of the MXU's 128 or 256); on
          GPU ``(128, 256)`` tiles in 32-wide hidden chunks for 16-bit operands (232-244 ms
          against 338-589 ms for ``(64, 128, 64)`` at ``N=4096, D=4096, V=128256`` in
          bfloat16, with either backward; wider chunks of that tile exceed the shared memory
          of the one-kernel backward), and ``(64, 128)`` in 64-wide chunks for wider operands,
          whose tiles take twice the shared memory.
        """
        if schedule not in (*SCHEDULES, "xla"):
            raise ValueError(f"schedule must be one of {(*SCHEDULES, 'xla')}, got {schedule!r}")
        if hidden is not None:
            narrow = dtype is not None and np.dtype(dtype).itemsize <= 2
            return {
                "xla": cls(1024, 2048),
                "tpu": cls(256, 512, 512),
                "gpu": cls(128, 256, 32) if narrow else cls(64, 128, 64),
            }[schedule]
        if schedule == "tpu":
            rows = 32 * max(1, -(-min(num_rows, 128) // 32))
            return cls(rows, min(2048, 128 * max(1, -(-num_classes // 128))))
        if schedule == "gpu":
            return cls(1, min(pow2_ceil(num_classes), 8192 // np.dtype(dtype).itemsize))
        raise ValueError(
            "the logits losses' XLA implementation works on whole rows and has no blocks"
        )


@dataclasses.dataclass(frozen=True)
class Xla:
    """``implementation=Xla(...)``: the JAX implementation with a ``custom_vjp`` (what
    ``"xla"`` means).

    Attributes:
      block_sizes: the ``[block_n, block_v]`` tiles of the fused loss's blockwise loops; None
        for `BlockSizes.get_default`. The logits losses work on whole rows and take none.
    """

    block_sizes: BlockSizes | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise TypeError(f"block_sizes must be a BlockSizes or None, got {self.block_sizes!r}")


@dataclasses.dataclass(frozen=True)
class Pallas:
    """``implementation=Pallas(...)``: the vocabulary-tiled Pallas kernels (what ``"pallas"``
    means), with their configuration.

    Which kernel runs is decided when the computation is lowered, from the platform lowered
    for, not from the default backend: so ``jax.jit(f).lower(...)`` for a TPU or a GPU from a
    host without one, and ``jax.export`` for several platforms, get the compiled kernels.

    Attributes:
      block_sizes: the kernels' blocks; None for `BlockSizes.get_default` of the schedule that
        is lowered. Blocks that a schedule cannot compile raise ``NotImplementedError`` with the
        reason when the computation is lowered for that schedule's platform.
      schedule: None for the platform's own kernels: Mosaic on a TPU, Triton on an NVIDIA or AMD
        GPU, and on a CPU, which compiles neither, the GPU schedule in Pallas' interpreter.
        ``"tpu"`` or ``"gpu"`` runs that schedule on every platform: compiled on its own, in the
        interpreter on a CPU, and elsewhere it raises ``NotImplementedError`` when lowered
        unless ``interpret`` is True.
      interpret: run the kernels in Pallas' interpreter on every platform (the TPU schedule in
        the strict TPU interpreter: races detected, out-of-bounds reads raising, uninitialised
        memory as NaN), for tests and debugging.
      accumulator_bytes: the most bytes of float32 gradient accumulators that the fused loss's
        GPU backward keeps (None: 32 MiB). Where ``d_inputs`` and ``d_weight`` fit together it
        runs one kernel; otherwise two passes of chunks, which form the logits twice.
    """

    block_sizes: BlockSizes | None = None
    schedule: str | None = None
    interpret: bool = False
    accumulator_bytes: int | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise TypeError(f"block_sizes must be a BlockSizes or None, got {self.block_sizes!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.interpret, bool):
            raise TypeError(f"interpret must be a bool, got {self.interpret!r}")
        bytes_ = self.accumulator_bytes
        if bytes_ is not None and (
            isinstance(bytes_, bool) or not isinstance(bytes_, numbers.Integral) or bytes_ < 1
        ):
            raise ValueError(f"accumulator_bytes must be None or a positive int, got {bytes_!r}")


@dataclasses.dataclass(frozen=True)
class Reference:
    """``implementation="reference"``: the plain formula, autodiff only."""


Implementation = Xla | Pallas | Reference


def check_implementation(implementation) -> Implementation | None:
    """The configuration value of ``implementation`` (None stays None: the automatic choice)."""
    if implementation is None or isinstance(implementation, (Xla, Pallas, Reference)):
        return implementation
    if isinstance(implementation, str) and implementation in IMPLEMENTATIONS:
        return {"xla": Xla, "pallas": Pallas, "reference": Reference}[implementation]()
    raise ValueError(
        f"implementation must be None or one of {IMPLEMENTATIONS}, or a jax_softmax_ce.Xla or "
        f"jax_softmax_ce.Pallas configuration, got {implementation!r}"
    )
