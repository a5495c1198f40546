"""Every kernel compiled for real TPUs (v5e, v6e, v5p) and GPUs (H100, H200) from this CPU host,
through the public API, with the number of compiled kernels asserted.

Lowering does not run Mosaic's or Triton's compilers; this does (`benchmarks.targets`). The cases
cover both logits losses and the fused loss; forward, ``value_and_grad`` and grad of grad; every
option (class weights, smoothing, z-loss, softcap, array temperature, ``ignore_index``, each
``where`` kind, probability labels and their gradient); float32, bfloat16 and float16; a bias in
float32 and bfloat16; both weight layouts; ``jax_enable_x64`` on and off; small shapes and the
LLM shapes of the compiled-memory benchmark. They run where libtpu and the jax CUDA plugin are
installed and ``JAX_PLATFORMS=cpu`` is set (the compile step of ``.ci/run``), and are skipped
elsewhere.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax_softmax_ce.kernels import linear_gpu

import jax_softmax_ce as sce
from benchmarks import collectives, targets

UNAVAILABLE = targets.available()
if UNAVAILABLE is not None and os.environ.get("REQUIRE_COMPILE_TARGETS"):
    raise RuntimeError(f"REQUIRE_COMPILE_TARGETS is set, and: {UNAVAILABLE}")
pytestmark = pytest.mark.skipif(
    UNAVAILABLE is not None,
    reason=f"compiling for TPU and GPU targets needs libtpu and the jax CUDA plugin, with "
    f"JAX_PLATFORMS=cpu ({UNAVAILABLE})",
)

S = jax.ShapeDtypeStruct
ALL_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0)


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str  # "integer", "probability" or "fused"
    dtype: str
    shape: tuple[int, ...]  # (N, V), or (N, D, V) for the fused loss
    transform: str = "value_and_grad"  # or "forward", "grad_of_grad"
    where: str | None = None  # "row", "col" or "full"
    options: tuple = ()  # keyword arguments, as pairs
    class_weights: bool = False
    array_temperature: bool = False
    x64: bool = False
    layout: str = "dv"
    bias: str | None = None  # the fused loss's bias dtype
    implementation: str = "pallas"
    aux: bool = False  # return_aux=True, the mean entropy and lse added to the loss

    @property
    def id(self) -> str:
        parts = [self.loss, self.dtype, "x".join(map(str, self.shape)), self.transform]
        parts += [f"where={self.where}"] if self.where else []
        parts += [k for k, _ in self.options]
        parts += ["class_weights"] * self.class_weights + ["array_T"] * self.array_temperature
        parts += ["x64"] * self.x64
        if self.loss == "fused":
            parts += [self.layout, f"bias={self.bias}"]
        parts += ["aux"] * self.aux
        return "-".join([*parts, self.implementation])

    def kernels(self, kind: str) -> int:
        """How many compiled kernels the program holds on a ``kind`` ("tpu", "gpu") target."""
        if self.implementation != "pallas":
            return 0
        if self.transform == "forward":
            return 1
        if self.loss != "fused":
            return 2
        # The fused loss's TPU backward is two kernels (d_inputs, then d_weight and d_bias); its
        # GPU backward is one, or two passes where the float32 accumulators would not fit.
        n, d, v = self.shape
        fits = 4 * d * (n + v) <= linear_gpu.ACCUMULATOR_BYTES
        return 2 if kind == "gpu" and fits else 3


SMALL, LLM = (64, 1000), (8192, 128256)
SMALL_FUSED, LLM_FUSED = (512, 256, 1000), (16384, 4096, 128256)
CASES = [
    Case("integer", "float32", SMALL),
    Case("integer", "float32", SMALL, "forward", options=(("label_smoothing", 0.1),), x64=True),
    Case(
        "integer",
        "bfloat16",
        SMALL,
        where="col",
        options=tuple(ALL_OPTIONS.items()),
        class_weights=True,
        x64=True,
    ),
    Case(
        "integer",
        "float16",
        SMALL,
        where="row",
        options=(("ignore_index", -100),),
        array_temperature=True,
    ),
    Case(
        "integer",
        "bfloat16",
        SMALL,
        "grad_of_grad",
        where="full",
        options=(*ALL_OPTIONS.items(), ("ignore_index", -100)),
        class_weights=True,
        array_temperature=True,
        x64=True,
    ),
    Case(
        "probability", "float32", SMALL, where="full", options=tuple(ALL_OPTIONS.items()), x64=True
    ),
    Case(
        "probability",
        "bfloat16",
        SMALL,
        where="col",
        options=(("logit_softcap", 30.0),),
        class_weights=True,
        array_temperature=True,
    ),
    Case("probability", "float16", SMALL, "grad_of_grad", where="row", x64=True),
    Case("fused", "bfloat16", SMALL_FUSED, bias="bfloat16"),
    Case(
        "fused",
        "bfloat16",
        SMALL_FUSED,
        where="full",
        options=(*ALL_OPTIONS.items(), ("ignore_index", -100)),
        class_weights=True,
        array_temperature=True,
        x64=True,
        layout="vd",
        bias="float32",
    ),
    Case(
        "fused",
        "float32",
        SMALL_FUSED,
        where="col",
        options=(("gradient_filter_eps", 2.0**-12),),
    ),
    Case("fused", "float16", SMALL_FUSED, "forward", where="row", x64=True, layout="vd"),
    Case("fused", "bfloat16", SMALL_FUSED, "grad_of_grad", bias="bfloat16", layout="vd"),
    Case("integer", "bfloat16", LLM),
    Case("integer", "bfloat16", LLM, implementation="xla"),
    Case("fused", "bfloat16", LLM_FUSED),
    Case("fused", "bfloat16", LLM_FUSED, layout="vd", bias="bfloat16"),
    Case(
        "integer",
        "bfloat16",
        SMALL,
        where="full",
        options=(*ALL_OPTIONS.items(), ("ignore_index", -100)),
        class_weights=True,
        array_temperature=True,
        aux=True,
    ),
    Case("probability", "float32", SMALL, where="col", aux=True),
    Case(
        "fused",
        "bfloat16",
        SMALL_FUSED,
        where="row",
        options=tuple(ALL_OPTIONS.items()),
        array_temperature=True,
        bias="float32",
        aux=True,
    ),
    Case("integer", "bfloat16", LLM, aux=True),
    # The XLA path's return_aux: the max and argmax over chunks on a GPU, two passes on a TPU.
    Case("integer", "bfloat16", LLM, implementation="xla", aux=True),
    Case("fused", "bfloat16", LLM_FUSED, aux=True),
]


def with_aux(case: Case, loss):
    """``loss``, or with ``case.aux`` the loss plus the mean entropy and lse of
    ``return_aux=True``, so that their gradient is compiled too."""
    if not case.aux:
        return loss

    def total(*args):
        value, aux = loss(*args, return_aux=True)
        return value + 0.01 * jnp.mean(aux.entropy) + 0.01 * jnp.mean(aux.lse)

    return total


def program(case: Case):
    """``(fn, args, logits_bytes)``: the function to compile and its abstract arguments."""
    dtype = jnp.dtype(case.dtype)
    options = dict(case.options)
    implementation = case.implementation
    if case.loss == "fused":
        n, d, v = case.shape
        weight = S((v, d) if case.layout == "vd" else (d, v), dtype)
        logits = (n, v)
        args = [S((n, d), dtype), weight, None if case.bias is None else S((v,), case.bias)]
        labels = S((n,), jnp.int32)

        def loss(x, w, b, y, where, class_weights, temperature, **aux):
            return sce.linear_softmax_cross_entropy(
                x,
                w,
                y,
                bias=b,
                where=where,
                class_weights=class_weights,
                temperature=1.0 if temperature is None else temperature,
                weight_layout=case.layout,
                implementation=implementation,
                reduction="mean",
                **options,
                **aux,
            )

    else:
        n, v = logits = case.shape
        integer = case.loss == "integer"
        args = [S(logits, dtype)]
        labels = S((n,), jnp.int32) if integer else S(logits, dtype)
        public = (
            sce.softmax_cross_entropy_with_integer_labels if integer else sce.softmax_cross_entropy
        )

        def loss(x, y, where, class_weights, temperature, **aux):
            return public(
                x,
                y,
                where=where,
                class_weights=class_weights,
                temperature=1.0 if temperature is None else temperature,
                implementation=implementation,
                reduction="mean",
                **options,
                **aux,
            )

    loss = with_aux(case, loss)

    where = {None: None, "row": (n,), "col": (1, v), "full": (n, v)}[case.where]
    args += [
        labels,
        None if where is None else S(where, jnp.bool_),
        S((v,), jnp.float32) if case.class_weights else None,
        S((), jnp.float32) if case.array_temperature else None,
    ]
    # What is differentiated: the logits (or inputs and weight), the probability labels and an
    # array temperature.
    wrt = (0, 1) if case.loss in ("fused", "probability") else (0,)
    wrt += (len(args) - 1,) if case.array_temperature else ()
    if case.transform == "forward":
        fn = loss
    elif case.transform == "value_and_grad":
        fn = jax.value_and_grad(loss, argnums=wrt)
    else:

        def first(*args):
            grads = jax.grad(loss, argnums=wrt)(*args)
            return sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in grads)

        fn = jax.value_and_grad(first, argnums=wrt)
    return fn, args, logits[0] * logits[1] * dtype.itemsize


@pytest.mark.parametrize("target", targets.TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_compiles_with_the_kernels_of_the_target(case, target):
    """The kernels compile, the right number of them, and no program holds the logits. A TPU
    takes no float16 kernel: lowering for it raises with the reason instead."""
    fn, args, logits_bytes = program(case)
    kind = targets.kind(target)
    if kind == "tpu" and case.dtype == "float16" and case.implementation == "pallas":
        with jax.enable_x64(case.x64), pytest.raises(NotImplementedError, match="not float16"):
            targets.compile_for(fn, target, *args)
        return
    with jax.enable_x64(case.x64):
        compiled = targets.compile_for(fn, target, *args)
    calls = targets.kernel_calls(compiled)
    other = {"tpu": "gpu", "gpu": "tpu"}[kind]
    assert calls == {kind: case.kernels(kind), other: 0}, calls
    if case.shape in (LLM, LLM_FUSED):  # no program holds the logits
        assert targets.Memory.of(compiled).temp < logits_bytes


def test_refusals_are_raised_when_compiling_for_a_tpu():
    """float64 has no TPU kernel: lowering for a TPU raises with the reason, and for a GPU the
    kernel compiles."""
    fn, args, _ = program(Case("integer", "float64", SMALL, x64=True))
    with jax.enable_x64(True):
        with pytest.raises(NotImplementedError, match="not float64"):
            targets.compile_for(fn, "v5e", *args)
        compiled = targets.compile_for(fn, "h100", *args)
    assert targets.kernel_calls(compiled)["gpu"] == 2


@pytest.mark.parametrize("case", ["logits", "fused"])
def test_the_kernels_per_row_values_take_no_padded_arrays_on_a_v5p(case):
    """Compiled for a v5p at the compiled-memory benchmark's shapes, ``"pallas"``'s program
    takes at most what O(N) allows of HBM temporaries (64 bytes per row and 1 MiB,
    `benchmarks.aux_goals.allowed_extra_bytes`), and ``return_aux=True`` adds at most as much
    again. A v5p keeps per-row arrays between kernels in HBM, where an ``[N, 1]`` float32
    array takes 512 bytes per row; the kernels' per-row operands and outputs run along lanes
    (`_blocks.pack_rows`). When each was its own ``[N, 1]`` array, the programs took 1.5 KiB
    per row, and ``return_aux`` 2 KiB per row more of the fused loss's."""
    from benchmarks import aux_goals

    temp = {}
    for variant, (fn, args) in aux_goals.target_programs(case, "pallas").items():
        temp[variant] = targets.Memory.of(targets.compile_for(fn, "v5p", *args)).temp
    allowed = aux_goals.allowed_extra_bytes(args[0].shape[0])
    assert temp["plain"] <= allowed, (temp, allowed)
    assert temp["aux"] - temp["plain"] <= allowed, (temp, allowed)


SHARDED = {"vocab": P(None, "model"), "both": P("data", "model")}


def sharded_program(mesh, spec):
    """``value_and_grad`` of the mean ``"pallas"`` loss of integer labels, on bfloat16 logits
    ``[256, 4096]`` sharded ``spec`` over ``mesh``: its function and abstract arguments."""

    def loss(x, y):
        return sce.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="mean", implementation="pallas"
        )

    n, v = 256, 4096
    logits = S((n, v), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    labels = S((n,), jnp.int32, sharding=NamedSharding(mesh, P(spec[0])))
    return jax.value_and_grad(loss), (logits, labels)


@pytest.mark.parametrize("sharding", SHARDED)
@pytest.mark.parametrize("target", ["h100", "h200"])
def test_sharded_logits_compile_with_the_kernels_on_each_gpu(target, sharding):
    """Under ``jit`` with logits sharded over four GPUs' automatic axes, the partitioning rule
    of the kernels compiles: the forward and backward kernels run on each device's shard, and
    no all-gather (or all-to-all) moves as much as a device's shard of the logits."""
    mesh = targets.mesh(target, (2, 2), ("data", "model"))
    fn, args = sharded_program(mesh, SHARDED[sharding])
    compiled = targets.compile_for(fn, target, *args)
    assert targets.kernel_calls(compiled) == {"gpu": 2, "tpu": 0}
    shard_elements = args[0].size // 4 if sharding == "both" else args[0].size // 2
    assert collectives.largest_gather(compiled.as_text(), 4) < shard_elements / 100


@pytest.mark.xfail(
    raises=jax.errors.JaxRuntimeError,
    strict=True,
    reason="libtpu registers no partitioner for custom_partitioning's calls (no PJRT custom "
    "partitioner extension), on compile-only devices and TPU hosts alike: jax-ml/jax#38196",
)
@pytest.mark.parametrize("sharding", SHARDED)
def test_sharded_logits_compile_with_the_kernels_on_a_tpu_slice(sharding):
    """The same on a v5e:2x2 slice; XLA's TPU compiler rejects the partitioned call ("Custom
    emitter for CustomSPMDPartitioning not found") until libtpu registers partitioners."""
    mesh = targets.mesh("v5e", (2, 2), ("data", "model"))
    fn, args = sharded_program(mesh, SHARDED[sharding])
    compiled = targets.compile_for(fn, "v5e", *args)
    assert targets.kernel_calls(compiled) == {"tpu": 2, "gpu": 0}
    shard_elements = args[0].size // 4 if sharding == "both" else args[0].size // 2
    assert collectives.largest_gather(compiled.as_text(), 4) < shard_elements / 100
