"""Which Pallas kernel schedule the test machine's default backend compiles: on a GPU host the
"gpu" schedule runs compiled and the "tpu" one interpreted; on CPU both run interpreted."""

from __future__ import annotations

import jax


def native_platform() -> str | None:
    backend = jax.default_backend()
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(backend)


def interpret(schedule: str) -> bool:
    """Whether ``schedule`` ("tpu" or "gpu") runs in interpret mode here."""
    return schedule != native_platform()
