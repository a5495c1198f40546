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
- Inside ``shard_map`` each shard runs its own kernels; with ``vocab_axis_name`` the shards of
  the classes combine their rows' forward state (`_sharding`).
- Under ``jit`` every kernel call is a `custom_partitioning` (`_partition`): each device runs
  the kernels on its rows and its classes of the logits (of the inputs and the projection),
  with the labels (and the backward's argmax) moved to its classes' ids; across the classes'
  shards the forward's row states (with ``return_aux``, its statistics too) are combined
  (`_sharding.combine`, ``[N, k]`` floats) and the per-row sums summed, and across the rows'
  shards the projection's gradient is summed. So nothing of the logits' size is gathered,
  and the gradients come back sharded like their operands. A class axis that does not split
  evenly is gathered (a padded shard's classes would join the sums), and so is the hidden
  axis of the fused loss. Arrays with an explicit sharding run under
  `jax.sharding.auto_axes` (`_sharding.explicit_as_auto`), which hands them to that rule.
  libtpu has no partitioner for `custom_partitioning` (jax-ml/jax#38196): a ``jit`` over more
  than one TPU chip does not compile; ``shard_map`` with ``vocab_axis_name`` does.
  The strict TPU interpreter (``Pallas(interpret=True)``) is not partitioned: its callbacks
  are effects that a partitioned call cannot carry.
- The automatic choice (``implementation=None``) never picks this implementation until a
  platform has measured it faster than ``"xla"``; none has.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend import core as jex_core
from jax.interpreters import mlir
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_softmax_ce import _canonical, _sharding, _xla
from jax_softmax_ce._canonical import Linear, Problem
from jax_softmax_ce._options import BlockSizes, Options, Pallas, Xla
from jax_softmax_ce.kernels import (
    _blocks,
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
        grads = jax.vjp(functools.partial(xla, options), problem)[1](_with_argmax(ct))[0]
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
        return (kernel_backward(options, config, problem, saved, _without_argmax(ct)),)

    losses.defvjp(losses_fwd, losses_bwd)
    return losses


def _without_argmax(ct):
    """A cotangent of ``(losses, aux)`` without the argmax's (float0) part, so that it can be
    differentiated; a cotangent of the losses alone as it is."""
    if not isinstance(ct, tuple):
        return ct
    losses, aux = ct
    return losses, aux._replace(argmax=None)


def _with_argmax(ct):
    """The inverse of `_without_argmax`: the argmax's cotangent restored as float0 zeros."""
    if not isinstance(ct, tuple) or ct[1].argmax is not None:
        return ct
    losses, aux = ct
    return losses, aux._replace(argmax=np.zeros(losses.shape, jax.dtypes.float0))


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
        extra = {}
        if module is linear_gpu and step == "backward":
            extra["accumulator_bytes"] = config.accumulator_bytes
        return functools.partial(
            getattr(module, step), options, blocks=blocks, interpret=interpret, **extra
        )

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


# -------------------------------------------------------------------- partitioning under jit


@dataclasses.dataclass(frozen=True)
class _Call:
    """The statics of one kernel call (`_kernel_call`, `_partitioned`)."""

    options: Options
    config: Pallas
    step: str  # "forward" or "backward"
    tree: Any  # the structure of the `_blocks.Operands`


def _kernel_call(call: _Call, *leaves):
    """``call.step`` of the kernels on the operands ``leaves``, the schedule chosen when
    lowering."""
    ops = jax.tree.unflatten(call.tree, leaves)
    table = kernels(call.options, call.config, ops, call.step)
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


def _split(mesh, entry, size: int):
    """A spec ``entry`` of an axis of ``size``, or None where it does not split evenly: a padded
    shard's classes would join its rows' sums."""
    if entry is None:
        return None
    names = entry if isinstance(entry, tuple) else (entry,)
    return None if size % math.prod(mesh.shape[a] for a in names) else entry


def _mesh_axes(call: _Call, mesh, arg_shapes):
    """``(rows, classes)``: the mesh axes (each None, a name or a tuple of names) of the rows
    of the logits (of the fused loss's inputs) and of the classes of the logits (of its
    projection)."""
    ops = jax.tree.unflatten(call.tree, arg_shapes)
    if ops.logits is not None:
        rows, classes = (*ops.logits.sharding.spec, None, None)[:2]
        return _split(mesh, rows, ops.logits.shape[0]), _split(mesh, classes, ops.logits.shape[1])
    rows = (*ops.x.sharding.spec, None)[0]
    col = 0 if call.options.vd else 1
    classes = (*ops.w.sharding.spec, None, None)[col]
    return _split(mesh, rows, ops.x.shape[0]), _split(mesh, classes, ops.w.shape[col])


def _shardings(call: _Call, mesh, arg_shapes, result_shape):
    """``(result_shardings, arg_shardings)`` of a call: every operand split like the logits
    along its rows and classes (`_blocks.axes`; the hidden axis whole), the row states and the
    inputs' gradient along the rows, the logits' gradients along both, the projection's along
    its classes, and what is summed over the rows (a temperature's sum) whole."""
    rows, classes = _mesh_axes(call, mesh, arg_shapes)
    ops = jax.tree.unflatten(call.tree, arg_shapes)

    def spec(row, col):
        return NamedSharding(mesh, P(rows if row == 0 else None, classes if col == 1 else None))

    def operand(name):
        if name == "w" and call.options.vd:  # [V, D]: the classes lead
            return NamedSharding(mesh, P(classes, None))
        return spec(*_blocks.axes(name, call.options))

    args = tuple(operand(n) for n, x in zip(ops._fields, ops, strict=True) if x is not None)
    if call.step == "forward":
        return jax.tree.map(lambda _: spec(0, None), result_shape), args
    if ops.logits is not None:
        specs = (spec(0, 1), spec(0, 1), spec(0, None))
    else:
        specs = (
            spec(0, None),
            operand("w"),
            NamedSharding(mesh, P(classes)),
            NamedSharding(mesh, P()),
        )
    results = [sp for r, sp in zip(result_shape, specs, strict=True) if r is not None]
    return jax.tree.unflatten(jax.tree.structure(result_shape), results), args


def _partition(call: _Call, mesh, arg_shapes, result_shape):
    """Each device runs the kernel on its rows and classes, as for ``vocab_axis_name``
    (`_sharding`): the integer labels and the backward's argmax moved to its classes' ids;
    across the classes' shards, the forward's row states combined, and the per-row sums (the
    inputs' gradient, a temperature's terms) summed; across the rows' shards, the sums over
    rows (the projection's gradient)."""
    results, args = _shardings(call, mesh, arg_shapes, result_shape)
    rows, classes = _mesh_axes(call, mesh, arg_shapes)

    # Traced with every axis automatic, whatever mesh the caller set (jax >= 0.11 would type
    # the per-device values with an explicit one's shardings).
    auto = jax.sharding.AbstractMesh(
        mesh.axis_sizes, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)
    )

    def lower(*leaves):
        with jax.sharding.use_abstract_mesh(auto):
            return per_device(*leaves)

    def per_device(*leaves):
        ops = jax.tree.unflatten(call.tree, leaves)
        fused = ops.logits is None
        if classes is not None:
            v = ops.w.shape[0 if call.options.vd else 1] if fused else ops.logits.shape[1]
            ids = {"labels": ops.labels} if call.options.integer else {}
            if ops.argmax is not None:
                ids["argmax"] = ops.argmax
            ops = ops._replace(**{k: _sharding.local_ids(x, classes, v) for k, x in ids.items()})
        out = _kernel_call(call, *jax.tree.leaves(ops))
        if call.step == "forward":
            return out if classes is None else _sharding.combine(out, classes, v, typed=False)
        if not fused:
            d_logits, d_labels, t_row = out
            return d_logits, d_labels, _sharding.psum(t_row, classes)
        d_inputs, d_weight, d_bias, t_sum = out
        return type(out)(
            _sharding.psum(d_inputs, classes),
            _sharding.psum(d_weight, rows),
            _sharding.psum(d_bias, rows),
            _sharding.psum(_sharding.psum(t_sum, rows), classes),
        )

    return mesh, lower, results, args


def _infer(call: _Call, mesh, arg_shapes, result_shape):
    return _shardings(call, mesh, arg_shapes, result_shape)[0]


def _sharding_rule(call: _Call, mesh, operand_types, result_types):
    """Shardy's rule of a call: factor ``n`` for the rows, ``v`` for the classes, ``d`` for the
    fused loss's hidden axis (kept whole), one factor of its own for every other axis."""
    del mesh, operand_types
    ops = jax.tree.unflatten(call.tree, range(call.tree.num_leaves))
    alone = (f"s{i}" for i in range(1000))

    def dims(name):
        if name == "x":
            return "n d"
        if name == "w":
            return "v d" if call.options.vd else "d v"
        row, col = _blocks.axes(name, call.options)
        return f"{'n' if row == 0 else next(alone)} {'v' if col == 1 else next(alone)}"

    operands = [dims(name) for name, x in zip(ops._fields, ops, strict=True) if x is not None]
    fused = ops.logits is None
    if call.step == "forward":
        results = [f"n {next(alone)}" for _ in result_types]
    elif not fused:
        results = [dims("logits")] * (1 + (not call.options.integer))
        results += [f"n {next(alone)}"] * (call.options.temperature is None)
    else:
        results = ["n d", dims("w")] + ["v"] * (ops.bias is not None)
        results += [""] * (call.options.temperature is None)
    factors = {"need_replication_factors": ("d",)} if fused else {}
    if call.step == "forward":
        factors["reduction_factors"] = ("d", "v") if fused else ("v",)  # in order of appearance
        factors.pop("need_replication_factors", None)
    return f"{', '.join(operands)} -> {', '.join(results)}", factors


_partitioned = custom_partitioning(_kernel_call, static_argnums=(0,))
_partitioned.def_partition(
    partition=_partition, infer_sharding_from_operands=_infer, sharding_rule=_sharding_rule
)


def launch(options: Options, config: Pallas, ops: _blocks.Operands, step: str, *, rows_out=True):
    """``(call, leaves)``: ``call(*leaves)`` runs ``step`` of the kernels on ``ops``, the
    schedule chosen when lowering, with a ``vmap`` rule that folds batch axes into rows.

    With ``rows_out`` every output is per row too; a batched operand that is not per row, or an
    output that is not (``rows_out=False``, a gradient summed over rows), cannot be folded and
    makes the kernel run once per batch element."""
    leaves, tree = jax.tree.flatten(ops)
    row_leaves = jax.tree.leaves(_blocks.per_row(ops, options))
    # The kernels are partitioned under jit (`_partition`); not the strict TPU interpreter,
    # whose callbacks are effects that a partitioned call cannot carry.
    partitioned = not config.interpret
    call = jax.custom_batching.custom_vmap(
        functools.partial(
            _partitioned if partitioned else _kernel_call, _Call(options, config, step, tree)
        )
    )

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
    not count), and what the backward kernel needs (`_tile.Stats`); with ``options.aux`` the
    `CrossEntropyAux` values too (`_canonical.finish_rows`)."""
    call, leaves = launch(options, config, _canonical.operands(options, problem), "forward")
    state = call(*leaves)
    if options.vocab_axis is not None:
        state = _sharding.combine(state, options.vocab_axis, problem.num_classes)
    return _canonical.finish_rows(options, problem, state)


def backward(options: Options, config: Pallas, problem: Problem, saved, ct) -> Problem:
    """The cotangent of ``problem`` (None where there is none) from the backward kernels;
    ``saved`` and ``ct`` as `forward` returns them and their cotangent (without the argmax's)."""
    rows = problem.rows
    stats, ct, aux_grad = _canonical.unpack_saved(options, problem, saved, ct)
    dtype = stats.m.dtype
    ct = jnp.where(rows.counted, ct.astype(dtype)[:, None], jnp.zeros((), dtype))
    ops = _canonical.operands(
        options, problem, **stats._asdict(), ct=ct, **_canonical.aux_operands(aux_grad)
    )
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
    terms = _sharding.psum(t_terms, options.vocab_axis)
    d_temperature = _canonical.temperature_cotangent(terms, stats, ct, problem, options, aux_grad)
    return Problem(d_logits, d_labels, None, None, d_temperature, None)


def xla_losses(options: Options, problem: Problem) -> jax.Array:
    """The ``"xla"`` implementation's losses, whose derivatives the kernels' rules take."""
    return _xla.losses(options, Xla(), problem)


losses = with_kernels(forward, backward, xla_losses)
