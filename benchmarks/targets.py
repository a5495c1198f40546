"""Compile for TPUs and NVIDIA GPUs that this host does not have (ahead of time, compile only).

TPU devices come from libtpu (``pip install "jax[tpu]==<jax version>"``), GPU devices from the jax
CUDA plugin (``pip install jax-cuda12-plugin==<v> jax-cuda12-pjrt==<v>``; no CUDA libraries are
needed) and a ``GpuTargetConfigProto`` in text form (`target_configs/`). The plugin registers
only when ``JAX_PLATFORMS=cpu`` is set before jax starts. `compile_for` lowers a function for a
device with its arguments placed there and runs the target's compiler (Mosaic, Triton, XLA's
backends), which is what lowering alone does not; `kernel_calls` counts the Pallas kernels in the
compiled program, so that an interpreted kernel never passes for a compiled one.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import warnings

import jax
import numpy as np
from jax.experimental import topologies

CONFIGS = pathlib.Path(__file__).parent / "target_configs"
TPUS = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v5p": "v5p:1x1x1"}
GPUS = {"h100": "h100.txtpb", "h200": "h200.txtpb"}
# Four devices of a target, for sharded programs: a TPU slice and its chips per host, or a
# GPU host's ``slices x hosts x devices``.
FOUR = {"v5e": ("v5e:2x2", (2, 2, 1)), "h100": "1x1x4", "h200": "1x1x4"}
TARGETS = (*TPUS, *GPUS)
KERNEL_CALLS = {
    "tpu": 'custom_call_target="tpu_custom_call"',
    "gpu": 'custom_call_target="__gpu$xla.gpu.triton"',
}


def kind(target: str) -> str:
    """``"tpu"`` or ``"gpu"``."""
    return "tpu" if target in TPUS else "gpu"


@functools.cache
def devices(target: str, count: int = 1) -> tuple[jax.Device, ...]:
    """``count`` compile-only devices of ``target`` (a name in `TARGETS`): one, or four of a
    target in `FOUR`."""
    if target in TPUS:
        name, bounds = (TPUS[target], (1, 1, 1)) if count == 1 else FOUR[target]
        topology = topologies.get_topology_desc(
            topology_name=name, platform="tpu", chips_per_host_bounds=bounds
        )
    else:
        config = (CONFIGS / GPUS[target]).read_text()
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=config, topology="1x1x1" if count == 1 else FOUR[target]
        )
    assert len(topology.devices) == count, (target, count)
    return tuple(topology.devices)


def device(target: str) -> jax.Device:
    """A compile-only device for ``target`` (a name in `TARGETS`)."""
    return devices(target)[0]


def mesh(target: str, shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    """A mesh of four compile-only devices of ``target`` (a name in `FOUR`), its axes
    automatic."""
    grid = np.array(devices(target, 4)).reshape(shape)
    return jax.sharding.Mesh(grid, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def available() -> str | None:
    """None when every target can be made here, else why not."""
    try:
        for target in TARGETS:
            device(target)
    except Exception as err:  # no libtpu, no CUDA plugin, or JAX_PLATFORMS unset
        return f"{type(err).__name__}: {err}"
    return None


def compile_for(fn, target: str, *args):
    """``jax.jit(fn)`` compiled for ``target``, with the ``jax.ShapeDtypeStruct`` (or None)
    ``args`` placed on its device, those with a ``sharding`` (on devices of `mesh`) left there.
    Some Pallas lowerings read the default device, hence ``jax.default_device``."""
    sharded = [a.sharding for a in args if a is not None and a.sharding is not None]
    dev = min(sharded[0].device_set, key=lambda d: d.id) if sharded else device(target)
    single = jax.sharding.SingleDeviceSharding(dev)
    placed = [
        a
        if a is None or a.sharding is not None
        else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single)
        for a in args
    ]
    with jax.default_device(dev), warnings.catch_warnings():
        # jax >= 0.11 deprecates Pallas' Triton backend with a warning at every lowering.
        warnings.filterwarnings("ignore", message=".*Triton backend is deprecated")
        return jax.jit(fn).lower(*placed).compile()


def kernel_calls(compiled) -> dict[str, int]:
    """The number of compiled Pallas kernels of each kind in a compiled program."""
    text = compiled.as_text()
    return {name: text.count(call) for name, call in KERNEL_CALLS.items()}


@dataclasses.dataclass(frozen=True)
class Memory:
    """A compiled program's device memory, in bytes."""

    temp: int
    argument: int
    output: int

    @classmethod
    def of(cls, compiled) -> Memory:
        m = compiled.memory_analysis()
        return cls(
            int(m.temp_size_in_bytes), int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
        )


def versions() -> dict[str, str]:
    """jax, jaxlib, libtpu and the CUDA plugin's versions (those installed)."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
