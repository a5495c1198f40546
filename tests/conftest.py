"""Test-wide settings: float64 available, strict dtype promotion, warnings are errors, float32
matmuls at float32 precision, and four virtual CPU devices for the sharding tests. They are set
before any test module touches JAX.

The ``mesh`` fixture is a one-axis ("d") mesh over four devices of the default backend, or over
all of them where there are fewer (one GPU), so that the sharding tests also run, compiled, on an
accelerator host."""

import contextlib
import os
import threading
import traceback
import warnings

import jax
import pytest
from jax.experimental import pallas as pl

import jax_softmax_ce

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


@pytest.fixture(autouse=True)
def _float32_matmuls(request):
    """The fused loss's matmuls follow JAX's matmul precision, whose default multiplies float32
    operands in TF32 on a GPU and in bfloat16 passes on a TPU (no change on a CPU): the tests
    compare with float64, so they ask for float32 products. The compile-target tests keep the
    default, which is what users compile."""
    if request.module.__name__.endswith("test_compile_targets"):
        yield
        return
    with jax.default_matmul_precision("float32"):
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


# Each program compiled, in order: (the thread that compiled it, its name), except those that
# Pallas' interpreters compile for themselves. Kernels run in Pallas' TPU interpreter call back
# into Python, mostly on other threads (once seen counted in a later test), and compile helpers
# of their own at any time (jit(multiply), jit(add): seen on the test's own thread in a second
# call); those are jax's, not this package's. A test's own calls compile on its thread.
_COMPILES: list[tuple[int, str]] = []
_INTERPRETERS = (
    os.path.join("pallas", "mosaic", "interpret"),
    os.path.join("pallas", "hlo_interpreter"),
)


def _record_compile(event, _secs, **kwargs):
    if not event.endswith("backend_compile_duration"):
        return
    if any(part in frame.filename for frame in traceback.extract_stack() for part in _INTERPRETERS):
        return
    _COMPILES.append((threading.get_ident(), str(kwargs.get("fun_name"))))


jax.monitoring.register_event_duration_secs_listener(_record_compile)


class Compilations:
    """``compilations()``: how many XLA compilations the test's thread ran since the test began
    (a listener on jax.monitoring's compile events); ``compilations.names(since)``: the names of
    the programs it compiled after the first ``since`` of them."""

    def __init__(self):
        self.start = len(_COMPILES)
        self.thread = threading.get_ident()

    def names(self, since: int = 0) -> list[str]:
        return [name for thread, name in _COMPILES[self.start :] if thread == self.thread][since:]

    def __call__(self) -> int:
        return len(self.names())


@pytest.fixture
def compilations():
    return Compilations()


@pytest.fixture
def kernel_paths(monkeypatch):
    """``{kernel body name: the names of this package's frames on the stack while it was first
    traced, ending with the body itself}``, filled as Pallas kernels are traced (through a
    stand-in for ``pallas_call``, whose frames are not the package's)."""
    package = tuple(
        os.path.dirname(module.__file__) for module in (jax_softmax_ce, jax_softmax_ce.kernels)
    )
    paths = {}
    pallas_call = pl.pallas_call

    def recording(kernel, *args, **kwargs):
        name = getattr(kernel, "func", kernel).__name__

        def traced(*refs, **kw):
            frames = traceback.extract_stack()[:-1]  # without this stand-in's own frame
            ours = [f.name for f in frames if f.filename.startswith(package)]
            paths.setdefault(name, [*ours, name])
            return kernel(*refs, **kw)

        return pallas_call(traced, *args, **kwargs)

    monkeypatch.setattr(pl, "pallas_call", recording)
    return paths
