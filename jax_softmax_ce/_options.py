"""The validated, hashable option set that every implementation receives.

The public layer turns the caller's keyword arguments into one `Options` (static, hashable: it is a
`nondiff_argnums` entry of the `custom_vjp` and a `jit` cache key) plus a few array operands
(`class_weights`, an array `temperature`). Implementations never validate anything again.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

REDUCTIONS = ("none", "sum", "mean")
IMPLEMENTATIONS = ("xla", "pallas", "reference")


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
    """

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    temperature: float | None = 1.0
    ignore_index: int | None = None


def _python_float(name: str, value) -> float:
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
    temperature_is_array: bool = False,
) -> Options:
    """Validates the scalar options and returns them as one hashable `Options`."""
    label_smoothing = _python_float("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    z_loss = _python_float("z_loss", z_loss)
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if logit_softcap is not None:
        logit_softcap = _python_float("logit_softcap", logit_softcap)
        if not 0.0 < logit_softcap < math.inf:
            raise ValueError(f"logit_softcap must be > 0 and finite, or None, got {logit_softcap}")
    if temperature_is_array:
        temperature = None
    else:
        temperature = _python_float("temperature", temperature)
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be a Python int or None, got {ignore_index!r}")
        ignore_index = int(ignore_index)
    return Options(
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
        ignore_index=ignore_index,
    )


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_implementation(implementation: str | None) -> str | None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    return implementation
