"""Test-wide settings: float64 available, strict dtype promotion, warnings are errors, and four
virtual CPU devices for the sharding tests. They are set before any test module touches JAX.

The ``mesh`` fixture is a one-axis ("d") mesh over four devices of the default backend, or over
all of them where there are fewer (one GPU), so that the sharding tests also run, compiled, on an
accelerator host."""

import contextlib
import warnings

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # jax >= 0.11 deprecates Pallas' Triton backend, which the GPU schedules use on purpose
        # (see kernels/cross_entropy_gpu.py); every other warning stays an error.
        warnings.filterwarnings(
            "ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning
        )
        yield


@pytest.fixture
def mesh():
    return jax.make_mesh((min(4, len(jax.devices())),), ("d",))


@pytest.fixture
def lowering_target():
    """``lowering_target(schedule)``: a context to lower a kernel for its real backend in. Triton
    lowering on jax >= 0.11 reads the GPU's compute capability, so a host without a GPU names an
    H100 through an abstract mesh; the TPU schedule needs nothing."""

    def target(schedule: str):
        if schedule != "gpu" or jax.default_backend() == "gpu":
            return contextlib.nullcontext()
        h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh(
            (1,), ("i",), axis_types=jax.sharding.AxisType.Auto, abstract_device=h100
        )
        return jax.sharding.use_abstract_mesh(mesh)

    return target


_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_kwargs: (
        _COMPILES.append(event) if event.endswith("backend_compile_duration") else None
    )
)


@pytest.fixture
def compilations():
    """``compilations()``: how many XLA compilations this process ran since the test began (a
    listener on jax.monitoring's compile events)."""
    start = len(_COMPILES)
    return lambda: len(_COMPILES) - start
