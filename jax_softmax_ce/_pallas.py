"""The ``"pallas"`` implementation: the vocabulary-tiled kernels of both losses, the schedule
chosen when lowering, and first derivatives from the kernels.

Forward, a kernel streams the logits once (or forms them tile by tile from ``inputs @ weight``)
and writes each row's float32 accumulators, from which XLA finishes the loss and the statistics
that the backward needs (`_tile.finish`, O(N)). Backward, a kernel streams them once more and
writes the gradient, from those statistics (`_tile.Stats`). Four schedules share the block math
of `kernels._blocks`: the logits losses' ``cross_entropy_tpu`` (Mosaic, a reduction grid axis
over the vocabulary) and ``cross_entropy_gpu`` (Triton, an in-kernel loop), and the fused loss's
``linear_tpu`` and ``linear_gpu``.

Which schedule runs is decided when the computation is lowered, by ``lax.platform_dependent``:
the Mosaic kernel when lowering for a TPU, the Triton kernel for a CUDA or ROCm GPU, and on a CPU
the GPU schedule in Pallas' interpreter (the generic one: the strict TPU interpreter orders its
host callbacks, an effect that a ``platform_dependent`` branch cannot carry when another branch
is lowered). A platform whose kernel cannot take the case (blocks off its tiling, float64 on a
TPU, a schedule named for another platform) gets a branch that raises ``NotImplementedError``
with the reason when, and only when, it is lowered: an explicit choice never falls back.
`Pallas.interpret` runs one schedule in the interpreter on every platform instead.

Derivatives (`with_kernels`): the loss is a ``custom_vjp`` whose first derivatives come from the
backward kernel; each kernel is itself wrapped in a ``custom_vjp`` whose rule differentiates the
``"xla"`` implementation, so that ``grad`` of ``grad`` is exact. ``vmap`` folds batch axes into
rows (a ``custom_vmap`` around each kernel), so a batched call is one kernel launch; a batched
operand that is not per row (class weights, a vocabulary mask, a temperature, the fused loss's
projection) makes the kernel run once per batch element under ``lax.map``.

Decisions where the spec is silent:

- Zero examples return an empty result without launching a kernel.
- Inside ``shard_map`` each shard runs its own kernels. Arrays with an explicit sharding under
  ``jit`` raise ``NotImplementedError``: a ``pallas_call`` needs manual axes, and an implicit
  all-gather would be a silent cost.
- The automatic choice (``implementation=None``) never picks this implementation until a
  platform has measured it faster than ``"xla"``; none has.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src import dispatch
from jax.extend import core as jex_core
from jax.interpreters import mlir

from jax_softmax_ce import _canonical, _sharding, _xla
from jax_softmax_ce._canonical import Linear, Problem
from jax_softmax_ce._options import BlockSizes, Options, Pallas, Xla
from jax_softmax_ce.kernels import (
    _blocks,
    _tile,
    cross_entropy_gpu,
    cross_entropy_tpu,
    linear_gpu,
    linear_tpu,
)

KERNELS = {
    (False, "tpu"): cross_entropy_tpu,
    (False, "gpu"): cross_entropy_gpu,
    (True, "tpu"): linear_tpu,
    (True, "gpu"): linear_gpu,
}
# The schedule each platform compiles; a CPU runs the GPU schedule in the interpreter.
NATIVE = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}
PLATFORMS = ("tpu", "cuda", "rocm", "cpu")

EXPLICIT_SHARDING = (
    'implementation="pallas" does not take arrays with an explicit sharding under jit; '
    'call it inside shard_map (per-shard kernels) or use implementation="xla"'
)


# ------------------------------------------------------------------------------ derivatives


def with_kernels(forward, backward, xla):
    """The per-example losses of ``xla(options, problem)``, computed by kernels.

    ``forward(options, config, problem)`` returns ``(losses, saved)`` and
    ``backward(options, config, problem, saved, ct)`` the problem's cotangent. First derivatives
    come from ``backward``; every higher one is ``xla``'s: each kernel call is a ``custom_vjp``
    whose rule differentiates ``xla``. The ``saved`` statistics (`_tile.Stats`) get a zero
    cotangent: they feed only ``backward``, whose rule recomputes them from the operands, so
    their whole influence reaches the operands' cotangent.
    """

    def xla_grads(options, problem, ct):
        """The cotangent of the operands that have one (as ``backward`` returns it)."""
        grads = jax.vjp(functools.partial(xla, options), problem)[1](ct)[0]
        labels = None if options.integer else grads.labels
        return Problem(grads.logits, labels, None, None, grads.temperature, None)

    kernel_forward = jax.custom_vjp(forward, nondiff_argnums=(0, 1))
    kernel_forward.defvjp(
        lambda options, config, problem: (kernel_forward(options, config, problem), problem),
        lambda options, config, problem, cts: (xla_grads(options, problem, cts[0]),),
    )

    kernel_backward = jax.custom_vjp(backward, nondiff_argnums=(0, 1))

    def backward_rule(options, config, residuals, cotangent):
        problem, saved, ct = residuals
        _, vjp = jax.vjp(functools.partial(xla_grads, options), problem, ct)
        d_problem, d_ct = vjp(cotangent)
        return d_problem, jax.tree.map(jnp.zeros_like, saved), d_ct

    kernel_backward.defvjp(
        lambda options, config, problem, saved, ct: (
            kernel_backward(options, config, problem, saved, ct),
            (problem, saved, ct),
        ),
        backward_rule,
    )

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
    def losses(options, config, problem):
        return forward(options, config, problem)[0]

    def losses_fwd(options, config, problem):
        out, saved = kernel_forward(options, config, problem)
        return out, (problem, saved)

    def losses_bwd(options, config, residuals, ct):
        problem, saved = residuals
        return (kernel_backward(options, config, problem, saved, ct),)

    losses.defvjp(losses_fwd, losses_bwd)
    return losses


# --------------------------------------------------------- operands, schedules and platforms


def _lower_kernel(ctx, *args, kernels, platform: str):
    """The lowering of `kernel_p` for ``platform``: its kernel's jaxpr, or the reason it has
    none raised as ``NotImplementedError``."""
    kernel = dict(kernels)[platform]
    if isinstance(kernel, str):
        raise NotImplementedError(f'implementation="pallas": {kernel}')
    return mlir.lower_fun(jex_core.jaxpr_as_fun(kernel), multiple_results=True)(ctx, *args)


# One kernel call whose body depends on the platform lowered for: ``kernels`` pairs each
# platform with its kernel's traced jaxpr, or with the reason it has none. Unlike
# lax.platform_dependent, whose branches are all lowered for every platform of a
# multi-platform lowering (so a TPU kernel would meet the CPU's lowering rule), each platform's
# lowering rule lowers that platform's jaxpr only: jax.export for several platforms works.
kernel_p = jex_core.Primitive("jax_softmax_ce_kernel")
kernel_p.multiple_results = True
kernel_p.def_impl(functools.partial(dispatch.apply_primitive, kernel_p))
kernel_p.def_abstract_eval(
    lambda *avals, kernels: next(k.out_avals for _, k in kernels if not isinstance(k, str))
)
for _platform in PLATFORMS:
    mlir.register_lowering(
        kernel_p, functools.partial(_lower_kernel, platform=_platform), platform=_platform
    )


def _blocks_for(config: Pallas, schedule: str, options: Options, ops) -> BlockSizes:
    """The configured blocks, or the schedule's default; the fused loss's hidden chunk is the
    default one where the configured blocks leave it None."""
    fused = ops.x is not None
    logits = ops.x if fused else ops.logits
    default = BlockSizes.get_default(
        schedule,
        num_rows=logits.shape[0],
        num_classes=ops.w.shape[0 if options.vd else 1] if fused else logits.shape[1],
        dtype=logits.dtype,
        hidden=logits.shape[1] if fused else None,
    )
    blocks = config.block_sizes or default
    if fused and blocks.block_d is None:
        blocks = BlockSizes(blocks.block_n, blocks.block_v, default.block_d)
    return blocks


def _interpreter(schedule: str):
    """What ``pallas_call`` takes to interpret ``schedule`` strictly: the TPU interpreter with
    race detection, or the generic one."""
    return cross_entropy_tpu.interpret_params() if schedule == "tpu" else True


def kernels(options: Options, config: Pallas, ops: _blocks.Operands, step: str) -> dict:
    """``{platform: kernel, or the reason it has none}`` (one entry, under the key None, when
    ``config.interpret``): ``step`` is ``"forward"`` or ``"backward"``."""
    fused = ops.x is not None

    def kernel(schedule, interpret):
        module = KERNELS[fused, schedule]
        blocks = _blocks_for(config, schedule, options, ops)
        return functools.partial(getattr(module, step), options, blocks=blocks, interpret=interpret)

    if config.interpret:
        schedule = config.schedule or "gpu"
        return {None: kernel(schedule, _interpreter(schedule))}
    out = {"cpu": kernel(config.schedule or "gpu", True)}
    for platform in ("tpu", "cuda", "rocm"):
        schedule = config.schedule or NATIVE[platform]
        if schedule != NATIVE[platform]:
            out[platform] = (
                f"the {schedule!r} schedule does not compile for a {platform!r} device; "
                f"pass Pallas(interpret=True) to run it in the interpreter"
            )
            continue
        blocks = _blocks_for(config, schedule, options, ops)
        reason = _blocks.compile_error(schedule, blocks, ops, options)
        out[platform] = reason or kernel(schedule, False)
    return out


def launch(options: Options, config: Pallas, ops: _blocks.Operands, step: str, *, rows_out=True):
    """``(call, leaves)``: ``call(*leaves)`` runs ``step`` of the kernels on ``ops``, the
    schedule chosen when lowering, with a ``vmap`` rule that folds batch axes into rows.

    With ``rows_out`` every output is per row too; a batched operand that is not per row, or an
    output that is not (``rows_out=False``, a gradient summed over rows), cannot be folded and
    makes the kernel run once per batch element."""
    table = kernels(options, config, ops, step)
    leaves, tree = jax.tree.flatten(ops)
    row_leaves = jax.tree.leaves(_blocks.per_row(ops, options))

    @jax.custom_batching.custom_vmap
    def call(*leaves):
        ops = jax.tree.unflatten(tree, leaves)
        if None in table:
            return table[None](ops)
        # Every platform's kernel is traced now, each lowered only for its own platform.
        traced = {
            platform: kernel
            if isinstance(kernel, str)
            else jax.make_jaxpr(kernel, return_shape=True)(ops)
            for platform, kernel in table.items()
        }
        out_tree = jax.tree.structure(traced["cpu"][1])
        jaxprs = tuple((p, k if isinstance(k, str) else k[0]) for p, k in traced.items())
        return jax.tree.unflatten(out_tree, kernel_p.bind(*leaves, kernels=jaxprs))

    @call.def_vmap
    def _rule(axis_size, in_batched, *leaves):
        pairs = list(zip(leaves, in_batched, row_leaves, strict=True))
        if not (rows_out and all(r or not b for _, b, r in pairs)):

            def one(xs):
                it = iter(xs)
                return call(*(next(it) if b else x for x, b, _ in pairs))

            out = jax.lax.map(one, [x for x, b, _ in pairs if b])
        else:
            folded = []
            for x, b, r in pairs:
                if r and not b:
                    x = jnp.broadcast_to(x, (axis_size, *x.shape))
                if r:
                    x = x.reshape(axis_size * x.shape[1], *x.shape[2:])
                folded.append(x)
            out = jax.tree.map(lambda y: y.reshape(axis_size, -1, *y.shape[1:]), call(*folded))
        return out, jax.tree.map(lambda _: True, out)

    return call, leaves


# ------------------------------------------------------------------------ forward, backward


def forward(options: Options, config: Pallas, problem: Problem):
    """``(losses [N], stats)``: the forward kernel's per-example losses (0 for examples that do
    not count), and what the backward kernel needs (`_tile.Stats`)."""
    if _canonical.explicit_mesh(problem) is not None:
        raise NotImplementedError(EXPLICIT_SHARDING)
    rows = problem.rows
    call, leaves = launch(options, config, _canonical.operands(options, problem), "forward")
    state = call(*leaves)
    if options.vocab_axis is not None:
        state = _sharding.combine(state, options.vocab_axis)
    loss, _, stats = _tile.finish(
        state,
        rows.label_weight,
        rows.n_valid,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    return jnp.where(rows.counted, loss, jnp.zeros((), loss.dtype))[:, 0], stats


def backward(options: Options, config: Pallas, problem: Problem, stats, ct) -> Problem:
    """The cotangent of ``problem`` (None where there is none) from the backward kernels."""
    rows = problem.rows
    dtype = stats.m.dtype
    ct = jnp.where(rows.counted, ct.astype(dtype)[:, None], jnp.zeros((), dtype))
    ops = _canonical.operands(options, problem, **stats._asdict(), ct=ct)
    logits = problem.logits
    fused = isinstance(logits, Linear)
    call, leaves = launch(options, config, ops, "backward", rows_out=not fused)
    if fused:
        d_inputs, d_weight, d_bias, t_terms = call(*leaves)
        d_inputs = _sharding.psum(d_inputs, options.vocab_axis)
        d_logits = Linear(
            d_inputs.astype(logits.inputs.dtype),
            _canonical.like_primal(d_weight.astype(logits.weight.dtype), logits.weight),
            None
            if d_bias is None
            else _canonical.like_primal(d_bias.astype(logits.bias.dtype), logits.bias),
            logits.vd,
        )
        d_labels = None
    else:
        d_logits, d_labels, t_terms = call(*leaves)
    d_temperature = None
    if problem.temperature is not None:
        lse = _tile.lse_of(stats.m, stats.r)
        terms = _sharding.psum(t_terms, options.vocab_axis)
        d_temperature = _canonical.temperature_gradient(terms, lse, ct, problem, options)
    return Problem(d_logits, d_labels, None, None, d_temperature, None)


def xla_losses(options: Options, problem: Problem) -> jax.Array:
    """The ``"xla"`` implementation's losses, whose derivatives the kernels' rules take."""
    return _xla.losses(options, Xla(), problem)


losses = with_kernels(forward, backward, xla_losses)
