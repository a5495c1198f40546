"""The ``"pallas"`` implementation: vocabulary-tiled kernels around a ``custom_vjp``.

The forward kernel streams the logits once and writes the per-example loss, the float32
log-sum-exp and the total target weight ``sum_k w_k q_k``; the backward kernel streams them
once more and writes the gradient in the logits' dtype. Two schedules share the block math of
`kernels._blocks` (itself made of `kernels._tile`): ``"tpu"`` (Mosaic, a reduction grid axis
over the vocabulary) and ``"gpu"`` (Triton, an in-kernel loop over the vocabulary).

The schedule follows the default backend. On CPU the kernels run in Pallas' interpreter (the TPU
one with race detection, out-of-bounds reads raising and NaN for uninitialised memory), with the
schedule named by the environment variable ``JAX_SOFTMAX_CE_PALLAS_PLATFORM`` (``"tpu"``
unless set) or by `using`.

Transformations. ``vmap`` folds batch axes into rows (a ``custom_vmap`` around each kernel), so a
batched call is one kernel launch; a batched ``class_weights``, vocabulary mask or temperature,
which cannot be folded, runs the kernel once per batch element under ``lax.map``. ``grad`` runs
the backward kernel. ``grad`` of ``grad`` differentiates the ``"xla"`` implementation's
``custom_vjp``: each kernel is wrapped in a ``custom_vjp`` whose rule is the XLA computation
of the same quantity, so first derivatives come from the kernels and higher ones from XLA.

Decisions where the spec is silent:

- The per-example ``n_valid`` (label smoothing) and the counted-example mask are computed by
  XLA from the ``where`` mask before the kernels run; an ``[N, V]`` mask is read as int8.
- Integer labels are read as int32; the weight of each label (NaN when outside ``[0, V)``,
  computed from the original integers) travels beside them, so a label that does not fit in
  int32 still gives NaN.
- Zero examples return an empty result without launching a kernel.
- Inside ``shard_map`` each shard runs its own kernels (the outputs vary over the logits'
  manual axes). Arrays with an explicit sharding under ``jit`` raise `NotImplementedError`:
  a ``pallas_call`` needs manual axes, and an implicit all-gather would be a silent cost.
- The automatic choice (``implementation=None``) never picks this implementation until a
  platform has measured it faster than ``"xla"``; none has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _canonical, _xla
from jax_softmax_ce._options import Options
from jax_softmax_ce.kernels import _blocks, cross_entropy_gpu, cross_entropy_tpu
from jax_softmax_ce.kernels._blocks import BlockSizes
from jax_softmax_ce.kernels._tile import accumulation_dtype

SCHEDULES = {"tpu": cross_entropy_tpu, "gpu": cross_entropy_gpu}
PLATFORM_ENV = "JAX_SOFTMAX_CE_PALLAS_PLATFORM"

EXPLICIT_SHARDING = (
    'implementation="pallas" does not take arrays with an explicit sharding under jit; '
    'call it inside shard_map (per-shard kernels) or use implementation="xla"'
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How `cross_entropy` runs when the caller does not say.

    Attributes:
      platform: ``"tpu"`` or ``"gpu"`` schedule, or None for the default backend's (on CPU:
        ``$JAX_SOFTMAX_CE_PALLAS_PLATFORM``, else ``"tpu"``).
      block_sizes: None for `BlockSizes.get_default`.
      interpret: None to interpret exactly when the default backend is CPU.
    """

    platform: str | None = None
    block_sizes: BlockSizes | None = None
    interpret: bool | None = None


_settings = Settings()


@contextlib.contextmanager
def using(**settings):
    """Temporarily changes the `Settings` of ``implementation="pallas"`` (for tests and
    benchmarks); takes effect when a function is traced, not inside a jit cache hit."""
    global _settings
    previous = _settings
    _settings = dataclasses.replace(_settings, **settings)
    try:
        yield
    finally:
        _settings = previous


def trace_key() -> tuple:
    """What this module reads from the environment while a call is traced (the `Settings` and
    ``$JAX_SOFTMAX_CE_PALLAS_PLATFORM``), for a cache of traced calls to key on."""
    return _settings, os.environ.get(PLATFORM_ENV)


def default_platform() -> str:
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    platform = os.environ.get(PLATFORM_ENV, "tpu")
    if platform not in SCHEDULES:
        raise ValueError(f"${PLATFORM_ENV} must be one of {tuple(SCHEDULES)}, got {platform!r}")
    return platform


@dataclasses.dataclass(frozen=True)
class _Call:
    """Everything static about one call (a ``nondiff_argnums`` entry)."""

    options: Options
    integer: bool
    config: _blocks.Config
    platform: str
    blocks: BlockSizes
    interpret: bool


def cross_entropy(
    problem: _canonical.Problem,
    options: Options,
    *,
    integer: bool,
    block_sizes: BlockSizes | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-example losses ``[N]`` in the accumulation dtype, 0 for examples that do not count.

    Args:
      problem: The canonical ``[N, V]`` operands.
      options: The static options.
      integer: Whether ``problem.labels`` are integer labels.
      block_sizes: Kernel blocks; None for `Settings` or `BlockSizes.get_default`.
      platform: ``"tpu"`` or ``"gpu"`` schedule; None for `Settings` or the default backend.
      interpret: Run in Pallas' CPU interpreter; None for `Settings`, else on CPU only.

    Raises:
      NotImplementedError: blocks that do not fit the schedule, or a dtype or platform the
        schedule cannot run compiled.
    """
    settings = _settings
    platform = platform or settings.platform or default_platform()
    if platform not in SCHEDULES:
        raise ValueError(f"platform must be one of {tuple(SCHEDULES)}, got {platform!r}")
    if interpret is None:
        interpret = settings.interpret
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    logits = problem.logits
    n, v = logits.shape
    blocks = block_sizes or settings.block_sizes
    blocks = blocks or BlockSizes.get_default(n, v, logits.dtype, platform)
    _check(problem, integer, platform, blocks, interpret)
    if n == 0:
        return jnp.zeros((0,), accumulation_dtype(logits.dtype))
    where_kind = None
    if problem.where is not None:
        rows, cols = problem.where.shape
        where_kind = "row" if cols == 1 else "col" if rows == 1 else "full"
    config = _blocks.Config(
        integer=integer,
        where=where_kind,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
        softcap=options.logit_softcap,
        temperature=options.temperature,
    )
    call = _Call(options, integer, config, platform, blocks, bool(interpret))
    return _cross_entropy(call, *problem)


def _check(problem, integer: bool, platform: str, blocks: BlockSizes, interpret: bool) -> None:
    logits = problem.logits
    row_dtypes = [logits.dtype]
    if not integer:
        row_dtypes.append(problem.labels.dtype)
    if problem.where is not None and min(problem.where.shape) > 1:
        row_dtypes.append(np.int8)
    reason = _blocks.block_error(blocks, platform, row_dtypes)
    if reason is not None:
        raise NotImplementedError(f'implementation="pallas": {reason}')
    if _canonical.explicit_mesh(problem) is not None:
        raise NotImplementedError(EXPLICIT_SHARDING)
    backend = jax.default_backend()
    if not interpret:
        if backend == "cpu":
            raise NotImplementedError(
                'implementation="pallas" runs on CPU only in interpret mode (interpret=True)'
            )
        if (platform == "tpu") != (backend == "tpu"):
            raise NotImplementedError(
                f'implementation="pallas": the {platform!r} schedule cannot run compiled on '
                f"the {backend!r} backend; use interpret mode or the matching schedule"
            )
        if platform == "tpu" and any(np.dtype(d).itemsize > 4 for d in row_dtypes):
            raise NotImplementedError(
                f'implementation="pallas": the TPU has no float64 (logits {logits.dtype})'
            )


def _inputs(call: _Call, logits, labels, where, class_weights, temperature) -> _blocks.Inputs:
    n, v = logits.shape
    dtype = accumulation_dtype(logits.dtype)
    options = call.options
    label_weight = None
    if call.integer:
        label_weight = _canonical.label_weights(labels, class_weights, v, dtype)
        if options.ignore_index is not None:
            ignored = labels == options.ignore_index
            label_weight = jnp.where(ignored, jnp.zeros((), dtype), label_weight)
        label_weight = label_weight[:, None]
        labels = labels.astype(jnp.int32)[:, None]
    mask = None
    if where is not None:
        mask = where.astype(jnp.int8 if call.config.where == "full" else jnp.int32)
    n_valid = None
    if options.label_smoothing:
        n_valid = _canonical.valid_count(where, n, v, dtype)
    return _blocks.Inputs(
        logits=logits,
        labels=labels,
        label_weight=label_weight,
        where=mask,
        class_weights=None if class_weights is None else class_weights[None, :].astype(dtype),
        n_valid=n_valid,
        temperature=None if temperature is None else temperature.astype(dtype).reshape(1, 1),
    )


def _row_leaves(config: _blocks.Config, inputs: _blocks.Inputs) -> _blocks.Inputs:
    """Which forward operands are per row (foldable under vmap) and which are shared."""
    per_row_mask = config.where in ("row", "full")
    return _blocks.Inputs(
        logits=True,
        labels=True,
        label_weight=None if inputs.label_weight is None else True,
        where=None if inputs.where is None else per_row_mask,
        class_weights=None if inputs.class_weights is None else False,
        n_valid=None if inputs.n_valid is None else per_row_mask,
        temperature=None if inputs.temperature is None else False,
    )


def folding(kernel, row_leaves, *, rows_out: bool = True):
    """``kernel(*leaves)`` with a vmap rule that folds batch axes into rows.

    ``row_leaves`` says for each operand whether its leading axis is the row axis; with
    ``rows_out`` every output is row-leading too. A batched operand that is not per row, or an
    output that is not per row (``rows_out=False``, a gradient summed over rows), cannot be
    folded and makes the kernel run once per batch element.
    """

    @jax.custom_batching.custom_vmap
    def call(*leaves):
        return kernel(*leaves)

    @call.def_vmap
    def _rule(axis_size, in_batched, *leaves):
        foldable = rows_out and all(r or not b for b, r in zip(in_batched, row_leaves, strict=True))
        if not foldable:
            batched = [x for x, b in zip(leaves, in_batched, strict=True) if b]

            def one(xs):
                it = iter(xs)
                return call(
                    *(next(it) if b else x for x, b in zip(leaves, in_batched, strict=True))
                )

            out = jax.lax.map(one, batched)
        else:
            folded = []
            for x, b, r in zip(leaves, in_batched, row_leaves, strict=True):
                if r and not b:
                    x = jnp.broadcast_to(x, (axis_size, *x.shape))
                if r:
                    x = x.reshape(axis_size * x.shape[1], *x.shape[2:])
                folded.append(x)
            out = call(*folded)
            out = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), out)
        return out, jax.tree.map(lambda _: True, out)

    return call


def _run_forward(call: _Call, inputs: _blocks.Inputs):
    schedule = SCHEDULES[call.platform]
    leaves, tree = jax.tree.flatten(inputs)
    row_leaves = jax.tree.leaves(_row_leaves(call.config, inputs))

    def kernel(*leaves):
        return tuple(
            schedule.forward(
                call.config,
                jax.tree.unflatten(tree, leaves),
                blocks=call.blocks,
                interpret=call.interpret,
            )
        )

    return folding(kernel, row_leaves)(*leaves)


def _run_backward(call: _Call, inputs: _blocks.Inputs, residuals: _blocks.Residuals):
    schedule = SCHEDULES[call.platform]
    leaves, tree = jax.tree.flatten((inputs, residuals))
    row_leaves = [*jax.tree.leaves(_row_leaves(call.config, inputs)), True, True, True]

    def kernel(*leaves):
        inputs, residuals = jax.tree.unflatten(tree, leaves)
        grads = schedule.backward(
            call.config, inputs, residuals, blocks=call.blocks, interpret=call.interpret
        )
        return tuple(x for x in grads if x is not None)

    outs = list(folding(kernel, row_leaves)(*leaves))
    d_logits = outs.pop(0)
    d_labels = None if call.integer else outs.pop(0)
    t_row = None if call.config.temperature is not None else outs.pop(0)
    return d_logits, d_labels, t_row


def _xla_losses(call: _Call, logits, labels, where, class_weights, temperature):
    problem = _canonical.Problem(logits, labels, where, class_weights, temperature)
    return _xla.cross_entropy(problem, call.options, integer=call.integer)


def _counted(call: _Call, logits, labels, where, class_weights, temperature):
    problem = _canonical.Problem(logits, labels, where, class_weights, temperature)
    return _canonical.counted_rows(problem, call.options.ignore_index, call.integer)


# The loss: forward kernel, backward kernel. Its fwd and bwd call the two kernel functions
# below, each a custom_vjp whose own rule is XLA's, so that grad of grad is exact.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cross_entropy(call, logits, labels, where, class_weights, temperature):
    return _cross_entropy_fwd(call, logits, labels, where, class_weights, temperature)[0]


def _cross_entropy_fwd(call, logits, labels, where, class_weights, temperature):
    operands = (logits, labels, where, class_weights, temperature)
    loss, lse, w_total = _kernel_forward(call, *operands)
    counted = _counted(call, *operands)
    dtype = loss.dtype
    return jnp.where(counted, loss, jnp.zeros((), dtype)), (operands, lse, w_total, counted)


def _cross_entropy_bwd(call, residuals, cotangent):
    operands, lse, w_total, counted = residuals
    ct = jnp.where(counted, cotangent.astype(lse.dtype), jnp.zeros((), lse.dtype))
    d_logits, d_labels, d_temperature = _kernel_backward(call, *operands, lse, w_total, ct)
    return d_logits, d_labels, None, None, d_temperature


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_forward(call, logits, labels, where, class_weights, temperature):
    """``(loss, lse, w_total)``, each ``[N]``; the loss not yet zeroed where not counted."""
    inputs = _inputs(call, logits, labels, where, class_weights, temperature)
    loss, lse, w_total = _run_forward(call, inputs)
    return loss[:, 0], lse[:, 0], w_total[:, 0]


def _kernel_forward_fwd(call, *operands):
    return _kernel_forward(call, *operands), operands


def _kernel_forward_bwd(call, operands, cotangents):
    # lse and w_total only feed _kernel_backward, whose rule gives them a zero cotangent (it
    # recomputes them from the logits), so only the loss cotangent carries information.
    d_logits, d_labels, d_temperature = _xla_vjp(call, _xla_losses, operands, cotangents[0])
    return d_logits, d_labels, None, None, d_temperature


_kernel_forward.defvjp(_kernel_forward_fwd, _kernel_forward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_backward(call, logits, labels, where, class_weights, temperature, lse, w_total, ct):
    """``(d_logits, d_labels, d_temperature)`` from the backward kernel; None where absent."""
    inputs = _inputs(call, logits, labels, where, class_weights, temperature)
    residuals = _blocks.Residuals(lse[:, None], w_total[:, None], ct[:, None])
    d_logits, d_labels, t_row = _run_backward(call, inputs, residuals)
    d_temperature = None
    if temperature is not None:
        d_temperature = _canonical.temperature_gradient(
            t_row, lse, ct, temperature, call.options.z_loss
        )
    return d_logits, d_labels, d_temperature


def _kernel_backward_fwd(call, *operands):
    return _kernel_backward(call, *operands), operands


def _kernel_backward_bwd(call, operands, cotangents):
    # The rule differentiates XLA's first derivative, which recomputes lse and w_total from the
    # logits: their whole influence is in the logits' cotangent, and theirs is zero.
    logits, labels, where, class_weights, temperature, lse, w_total, ct = operands

    def grads(logits, labels, temperature, ct):
        operands = (logits, labels, where, class_weights, temperature)
        return _xla_vjp(call, _xla_losses, operands, ct)

    diff = (True, not call.integer, temperature is not None, True)
    primals = (logits, labels, temperature, ct)
    d_logits, d_labels, d_temperature, d_ct = vjp_some(grads, primals, diff, cotangents)
    zero = jnp.zeros_like
    return d_logits, d_labels, None, None, d_temperature, zero(lse), zero(w_total), d_ct


_kernel_backward.defvjp(_kernel_backward_fwd, _kernel_backward_bwd)


def vjp_some(fn, primals, differentiable, cotangent):
    """``jax.vjp`` of ``fn(*primals)`` with respect to the ``differentiable`` primals only;
    None for the others."""

    def partial_fn(*args):
        it = iter(args)
        return fn(*(next(it) if d else x for x, d in zip(primals, differentiable, strict=True)))

    chosen = [x for x, d in zip(primals, differentiable, strict=True) if d]
    _, vjp = jax.vjp(partial_fn, *chosen)
    grads = iter(vjp(cotangent))
    return tuple(next(grads) if d else None for d in differentiable)


def _xla_vjp(call: _Call, fn, operands, cotangent):
    """``(d_logits, d_labels, d_temperature)`` of ``fn(call, *operands)`` by XLA; None for
    integer labels and a Python temperature."""
    logits, labels, where, class_weights, temperature = operands

    def f(logits, labels, temperature):
        return fn(call, logits, labels, where, class_weights, temperature)

    diff = (True, not call.integer, temperature is not None)
    return vjp_some(f, (logits, labels, temperature), diff, cotangent)
