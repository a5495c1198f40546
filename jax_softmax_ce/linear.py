"""Fused linear softmax cross-entropy: the loss of ``inputs @ weight (+ bias)`` without the logits.

Data flow: the public function validates and canonicalises once (``inputs`` ``[N, D]``, integer
labels ``[N]``, the ``where`` mask as ``[N, 1]``, ``[1, V]`` or ``[N, V]``), then one
implementation returns per-example losses ``[N]``, and `_canonical.reduce_losses` reduces them.

``"xla"`` is blockwise JAX with a ``custom_vjp``. The forward pass loops over row blocks and,
inside, over vocabulary blocks (``lax.fori_loop``); each step forms one ``[block_n, block_v]`` tile
with a matmul and merges it into a running log-sum-exp and target sum in float32 (`kernels.linear`
tile steps, built on `kernels._tile`). Only the per-example ``lse`` (float32 ``[N]``) is saved
beside the inputs. The backward pass loops over vocabulary blocks and, inside, over row blocks: it
recomputes each tile, forms its gradient block, and accumulates ``d_inputs`` (``[N, D]``, float32)
and one ``[D, block_v]`` block of ``d_weight`` (float32) before writing it out in the weight's
dtype. Temporary memory is therefore O(block_n·block_v + N·D + D·block_v), plus a float32 ``[N, D]``
and the ``[D, V]`` output, and never O(N·V). A ragged last block is moved back to end at the array's
edge and ignores the rows or columns an earlier block covered, so nothing is padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_softmax_ce import _canonical, _options, _reference
from jax_softmax_ce._options import Options
from jax_softmax_ce._pallas import EXPLICIT_SHARDING, folding, vjp_some
from jax_softmax_ce.kernels import _tile
from jax_softmax_ce.kernels import linear as _kernels
from jax_softmax_ce.kernels.linear import BlockSizes

WEIGHT_LAYOUTS = ("dv", "vd")
LOGITS = "logits inputs @ weight"  # how errors name the logits the caller never passed
PALLAS_BACKENDS = ("tpu", "gpu")


class LinearProblem(NamedTuple):
    """Canonical operands of one fused loss call (a pytree; absent operands are None).

    Attributes:
      inputs: ``[N, D]`` floating inputs.
      weight: ``[D, V]``, or ``[V, D]`` for the ``"vd"`` layout, in the inputs' dtype.
      bias: None or ``[V]``.
      labels: ``[N]`` integer labels.
      where: None, or a boolean mask ``[N, 1]``, ``[1, V]`` or ``[N, V]``.
      class_weights: None or ``[V]`` in the accumulation dtype.
      temperature: None, or a scalar array (a Python temperature lives in `Options`).
    """

    inputs: jax.Array
    weight: jax.Array
    bias: jax.Array | None
    labels: jax.Array
    where: jax.Array | None
    class_weights: jax.Array | None
    temperature: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of the blockwise implementations (hashable, a ``jit`` cache key)."""

    num_classes: int
    vd: bool
    block_sizes: BlockSizes
    filter_eps: float
    engine: str  # "xla" or "pallas"
    pallas_backend: str | None = None
    interpret: bool = False


class Rows(NamedTuple):
    """Per-row operands derived from the labels and the mask, all in the accumulation dtype."""

    labels: jax.Array  # [N, 1] int32, -1 where the label is outside [0, V)
    label_weight: jax.Array  # [N, 1] w_t; 0 for ignored rows, NaN for labels outside [0, V)
    n_valid: jax.Array  # [N, 1] or [1, 1] number of valid classes
    total_weight: jax.Array  # [N, 1] W = sum_k a_k after smoothing
    counted: jax.Array  # [N] bool


def _logits_stand_in(problem: LinearProblem, num_classes: int) -> _canonical.Problem:
    """A `_canonical.Problem` whose ``logits`` is only a shape, for the shared row and reduction
    helpers, which read nothing of the logits but their shape."""
    n = problem.inputs.shape[0]
    logits = jax.ShapeDtypeStruct((n, num_classes), problem.inputs.dtype)
    return _canonical.Problem(
        logits, problem.labels, problem.where, problem.class_weights, problem.temperature
    )


def _rows(options: Options, problem: LinearProblem, num_classes: int) -> Rows:
    labels, where, class_weights = problem.labels, problem.where, problem.class_weights
    n = labels.shape[0]
    dtype = _tile.accumulation_dtype(problem.inputs.dtype)
    weight = _canonical.label_weights(labels, class_weights, num_classes, dtype)
    if options.ignore_index is not None:
        weight = jnp.where(labels == options.ignore_index, jnp.zeros((), dtype), weight)
    in_range = (labels >= 0) & (labels < num_classes)
    labels32 = jnp.where(in_range, labels, -1).astype(jnp.int32)
    n_valid = _canonical.valid_count(where, n, num_classes, dtype)
    total = weight[:, None]
    if options.label_smoothing:
        w = jnp.ones((1, num_classes), dtype) if class_weights is None else class_weights[None]
        if where is None:
            smooth_total = jnp.sum(w, axis=1, keepdims=True)
        elif where.shape[1] == 1:
            smooth_total = jnp.where(where, jnp.sum(w, axis=1, keepdims=True), 0)
        else:
            smooth_total = jnp.sum(jnp.where(where, w, 0), axis=1, keepdims=True)
        total = _tile.mix(options.label_smoothing, n_valid, total, smooth_total)
    stand_in = _logits_stand_in(problem, num_classes)
    counted = _canonical.counted_rows(stand_in, options.ignore_index, integer=True)
    return Rows(
        labels32[:, None], weight[:, None], n_valid, jnp.broadcast_to(total, (n, 1)), counted
    )


def _temperature(options: Options, temperature, dtype):
    return options.temperature if temperature is None else temperature.astype(dtype)


def _slice(x, start, size: int, axis: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _where_tile(where, r0, c0, bn: int, bv: int):
    if where is None:
        return None
    if where.shape[0] != 1:
        where = _slice(where, r0, bn, 0)
    if where.shape[1] != 1:
        where = _slice(where, c0, bv, 1)
    return where


def _valid(ok, where_tile):
    return ok if where_tile is None else ok & where_tile


def _weight_block(weight, c0, bv: int, vd: bool):
    return _slice(weight, c0, bv, 0 if vd else 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _manual_axes(problem: LinearProblem) -> tuple[str, ...]:
    """The ``shard_map`` axes over which some operand varies (empty outside ``shard_map``)."""
    axes = frozenset().union(*(_canonical.varying_axes(x) for x in problem if x is not None))
    return tuple(sorted(axes))


def _varying(tree, axes: tuple[str, ...]):
    """Loop carries built from constants, made to vary like the operands that update them (inside
    ``shard_map`` a loop's carry must keep its type)."""
    if not axes:
        return tree
    return jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), tree)


def _forward_xla(options: Options, config: Config, problem: LinearProblem, rows: Rows):
    """``RowState`` of ``[N, 1]`` accumulators, looping over row blocks, then vocabulary blocks."""
    x, weight = problem.inputs, problem.weight
    n, v = x.shape[0], config.num_classes
    bn, bv = min(config.block_sizes.block_n, n), min(config.block_sizes.block_v, v)
    dtype = _tile.accumulation_dtype(x.dtype)
    t = _temperature(options, problem.temperature, dtype)
    smoothing = bool(options.label_smoothing)
    bias = None if problem.bias is None else problem.bias[None, :]
    cw = None if problem.class_weights is None else problem.class_weights[None, :]
    axes = _manual_axes(problem)

    def row_block(i, state):
        r0 = _kernels.block_start(i, bn, n)
        x_blk = _slice(x, r0, bn, 0)
        labels = _slice(rows.labels, r0, bn, 0)
        label_weight = _slice(rows.label_weight, r0, bn, 0)

        def vocab_block(j, acc):
            c0 = _kernels.block_start(j, bv, v)
            z_raw = _kernels.logits_tile(
                x_blk,
                _weight_block(weight, c0, bv, config.vd),
                None if bias is None else _slice(bias, c0, bv, 1),
                vd=config.vd,
            )
            tile = _kernels.target_tile(
                z_raw,
                labels,
                label_weight,
                _where_tile(problem.where, r0, c0, bn, bv),
                None if cw is None else _slice(cw, c0, bv, 1),
                t,
                col0=c0,
                lo=j * bv,
                num_classes=v,
                options=options,
            )
            return _kernels.forward_tile(acc, tile)

        init = _varying(_kernels.row_state_init(bn, dtype, smoothing), axes)
        block = jax.lax.fori_loop(0, _cdiv(v, bv), vocab_block, init)
        fresh = _kernels.rows_ok(r0, i * bn, bn, n)

        def write(full, new):
            old = _slice(full, r0, bn, 0)
            return jax.lax.dynamic_update_slice_in_dim(full, jnp.where(fresh, new, old), r0, 0)

        return jax.tree.map(write, state, block)

    init = _varying(_kernels.row_state_init(n, dtype, smoothing), axes)
    return jax.lax.fori_loop(0, _cdiv(n, bn), row_block, init)


def _backward_xla(options, config, problem: LinearProblem, rows: Rows, lse, ct):
    """``(d_inputs, d_weight, d_bias, temperature_sum)``: loops over vocabulary blocks, then row
    blocks. ``lse`` and ``ct`` (the cotangent, 0 for rows that do not count) are ``[N, 1]``."""
    x, weight = problem.inputs, problem.weight
    n, d = x.shape
    v = config.num_classes
    bn, bv = min(config.block_sizes.block_n, n), min(config.block_sizes.block_v, v)
    dtype = _tile.accumulation_dtype(x.dtype)
    t = _temperature(options, problem.temperature, dtype)
    bias = None if problem.bias is None else problem.bias[None, :]
    cw = None if problem.class_weights is None else problem.class_weights[None, :]
    n_valid = jnp.broadcast_to(rows.n_valid, (n, 1))
    axes = _manual_axes(problem)

    def vocab_block(j, carry):
        dx, dw, db, t_sum = carry
        c0 = _kernels.block_start(j, bv, v)
        w_blk = _weight_block(weight, c0, bv, config.vd)
        b_blk = None if bias is None else _slice(bias, c0, bv, 1)
        cw_blk = None if cw is None else _slice(cw, c0, bv, 1)

        def row_block(i, inner):
            dx, dw_blk, db_blk, t_sum = inner
            r0 = _kernels.block_start(i, bn, n)
            x_blk = _slice(x, r0, bn, 0)
            fresh = _kernels.rows_ok(r0, i * bn, bn, n)
            z_raw = _kernels.logits_tile(x_blk, w_blk, b_blk, vd=config.vd)
            target = _kernels.target_tile(
                z_raw,
                _slice(rows.labels, r0, bn, 0),
                _slice(rows.label_weight, r0, bn, 0),
                _where_tile(problem.where, r0, c0, bn, bv),
                cw_blk,
                t,
                col0=c0,
                lo=j * bv,
                num_classes=v,
                options=options,
            )
            tile = _kernels.backward_tile(
                z_raw,
                target,
                _slice(n_valid, r0, bn, 0),
                _slice(rows.total_weight, r0, bn, 0),
                _slice(lse, r0, bn, 0),
                jnp.where(fresh, _slice(ct, r0, bn, 0), 0),
                t,
                options=options,
                filter_eps=config.filter_eps,
                array_temperature=problem.temperature is not None,
            )
            if tile.temperature_row is not None:
                t_sum = t_sum + jnp.sum(tile.temperature_row)

            def accumulate(acc):
                dx, dw_blk, db_blk = acc
                rows_dx = _slice(dx, r0, bn, 0) + _kernels.input_grad(tile.dz, w_blk, vd=config.vd)
                dx = jax.lax.dynamic_update_slice_in_dim(dx, rows_dx, r0, 0)
                dw_blk = dw_blk + _kernels.weight_grad(x_blk, tile.dz, vd=config.vd)
                if db_blk is not None:
                    db_blk = db_blk + jnp.sum(tile.dz, axis=0, keepdims=True)
                return dx, dw_blk, db_blk

            return (*_kernels.when_kept(tile.keep, accumulate, (dx, dw_blk, db_blk)), t_sum)

        dw_init = _varying(jnp.zeros((bv, d) if config.vd else (d, bv), dtype), axes)
        db_init = None if bias is None else _varying(jnp.zeros((1, bv), dtype), axes)
        dx, dw_blk, db_blk, t_sum = jax.lax.fori_loop(
            0, _cdiv(n, bn), row_block, (dx, dw_init, db_init, t_sum)
        )
        ok = _kernels.columns_ok(c0, j * bv, bv, v)
        axis = 0 if config.vd else 1
        new = jnp.where(
            ok.T if config.vd else ok, dw_blk.astype(dw.dtype), _slice(dw, c0, bv, axis)
        )
        dw = jax.lax.dynamic_update_slice_in_dim(dw, new, c0, axis)
        if db is not None:
            new = jnp.where(ok, db_blk, _slice(db, c0, bv, 1))
            db = jax.lax.dynamic_update_slice_in_dim(db, new, c0, 1)
        return dx, dw, db, t_sum

    init = _varying(
        (
            jnp.zeros((n, d), dtype),
            jnp.zeros(weight.shape, weight.dtype),
            None if bias is None else jnp.zeros((1, v), dtype),
            jnp.zeros((), dtype),
        ),
        axes,
    )
    dx, dw, db, t_sum = jax.lax.fori_loop(0, _cdiv(v, bv), vocab_block, init)
    return dx, dw, None if db is None else db[0], t_sum


def _forward_engine(config: Config):
    if config.engine == "xla":
        return _forward_xla
    return _forward_pallas


def _backward_engine(config: Config):
    if config.engine == "xla":
        return _backward_xla
    return _backward_pallas


def _row_leaves(problem: LinearProblem, rows: Rows, *residuals) -> list[bool]:
    """For each array leaf of ``(problem, rows, *residuals)``: whether its leading axis is the
    row axis (per token) rather than shared by all rows (the projection, a per-class mask)."""
    n = problem.inputs.shape[0]
    where = problem.where

    def flag(x, per_row):
        return None if x is None else per_row

    tree = (
        LinearProblem(
            True,
            False,
            flag(problem.bias, False),
            True,
            flag(where, where is not None and where.shape[0] == n),
            flag(problem.class_weights, False),
            flag(problem.temperature, False),
        ),
        Rows(True, True, rows.n_valid.shape[0] == n, True, True),
        *(True for _ in residuals),
    )
    return jax.tree.leaves(tree)


def _forward_pallas(options: Options, config: Config, problem: LinearProblem, rows: Rows):
    """The Pallas forward kernel; under ``vmap`` the batch axes are folded into rows (one
    kernel over all tokens, as for the cross-entropy kernels), since Pallas' batching of the
    TPU grid does not reach the TPU interpreter's grid semantics."""
    leaves, tree = jax.tree.flatten((problem, rows))

    def kernel(*leaves):
        return _kernels.forward_pallas(options, config, *jax.tree.unflatten(tree, leaves))

    return folding(kernel, _row_leaves(problem, rows))(*leaves)


def _backward_pallas(options: Options, config: Config, problem, rows, lse, ct):
    """The Pallas backward kernels; under ``vmap`` they run once per batch element, since the
    projection's gradient is a sum over rows that folding would merge across the batch."""
    leaves, tree = jax.tree.flatten((problem, rows, lse, ct))

    def kernel(*leaves):
        return _kernels.backward_pallas(options, config, *jax.tree.unflatten(tree, leaves))

    return folding(kernel, _row_leaves(problem, rows, lse, ct), rows_out=False)(*leaves)


def _losses(options: Options, config: Config, problem: LinearProblem):
    """``(losses [N], lse [N])`` in the accumulation dtype."""
    rows = _rows(options, problem, config.num_classes)
    state = _forward_engine(config)(options, config, problem, rows)
    loss, lse = _tile.row_loss(
        state.lse,
        state.target,
        state.smoothing,
        rows.n_valid,
        label_smoothing=options.label_smoothing,
        z_loss=options.z_loss,
    )
    loss = jnp.where(jnp.isnan(rows.label_weight), np.nan, loss)[:, 0]
    return jnp.where(rows.counted, loss, 0), lse[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(options, config, inputs, weight, bias, labels, where, class_weights, temperature):
    problem = LinearProblem(inputs, weight, bias, labels, where, class_weights, temperature)
    return _losses(options, config, problem)[0]


def _fused_fwd(options, config, *operands):
    if config.engine == "pallas":
        loss, lse = _kernel_losses(options, config, operands)
    else:
        loss, lse = _losses(options, config, LinearProblem(*operands))
    return loss, (*operands, lse)


def _fused_bwd(options, config, residuals, cotangent):
    *operands, lse = residuals
    grads = _kernel_grads if config.engine == "pallas" else _operand_grads
    return grads(options, config, tuple(operands), lse, cotangent)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _operand_grads(options, config, operands, lse, cotangent):
    """The gradients for every operand of `_fused` (None where there is none), from the saved
    ``lse`` and the losses' cotangent."""
    problem = LinearProblem(*operands)
    rows = _rows(options, problem, config.num_classes)
    dtype = lse.dtype
    ct = jnp.where(rows.counted, cotangent.astype(dtype), 0)[:, None]
    dx, dw, db, t_sum = _backward_engine(config)(options, config, problem, rows, lse[:, None], ct)
    d_temperature = None
    if problem.temperature is not None:
        d_temperature = _canonical.temperature_gradient(
            t_sum, lse, ct[:, 0], problem.temperature, options.z_loss
        )
    grads = (
        dx.astype(problem.inputs.dtype),
        dw.astype(problem.weight.dtype),
        None if db is None else db.astype(problem.bias.dtype),
        None,
        None,
        None,
        d_temperature,
    )
    return tuple(
        None if g is None else _canonical.like_primal(g, primal)
        for g, primal in zip(grads, operands, strict=True)
    )


# The Pallas kernels have no derivative rules of their own. As in the cross-entropy's "pallas"
# implementation, each is wrapped in a custom_vjp whose rule is XLA's: the forward's is the
# derivative of the XLA losses, the backward's the derivative of XLA's first derivative, which
# recomputes lse from the operands (so lse gets a zero cotangent). grad of grad is then exact.
_DIFFERENTIABLE = (True, True, True, False, False, False, True)  # inputs, weight, bias, T


def _xla_grads(options, config, operands, cotangent):
    """`_fused`'s gradients for ``operands`` and the losses' ``cotangent``, by the XLA engine."""
    config = dataclasses.replace(
        config, engine="xla", block_sizes=BlockSizes.get_default("xla"), interpret=False
    )

    def losses(*operands):
        return _fused(options, config, *operands)

    return vjp_some(losses, operands, _differentiable(operands), cotangent)


def _differentiable(operands) -> tuple[bool, ...]:
    return tuple(x is not None and d for x, d in zip(operands, _DIFFERENTIABLE, strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_losses(options, config, operands):
    """``(losses, lse)`` by the Pallas forward kernel."""
    return _losses(options, config, LinearProblem(*operands))


def _kernel_losses_fwd(options, config, operands):
    return _kernel_losses(options, config, operands), operands


def _kernel_losses_bwd(options, config, operands, cotangents):
    # lse feeds only _kernel_grads, whose rule gives it a zero cotangent.
    return (_xla_grads(options, config, operands, cotangents[0]),)


_kernel_losses.defvjp(_kernel_losses_fwd, _kernel_losses_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_grads(options, config, operands, lse, cotangent):
    """`_operand_grads` by the Pallas backward kernels."""
    return _operand_grads(options, config, operands, lse, cotangent)


def _kernel_grads_fwd(options, config, operands, lse, cotangent):
    return _kernel_grads(options, config, operands, lse, cotangent), (operands, lse, cotangent)


def _kernel_grads_bwd(options, config, residuals, cotangents):
    operands, lse, cotangent = residuals

    def grads(ct, *operands):
        return _xla_grads(options, config, operands, ct)

    primals = (cotangent, *operands)
    d_ct, *d_operands = vjp_some(grads, primals, (True, *_differentiable(operands)), cotangents)
    return tuple(d_operands), jnp.zeros_like(lse), d_ct


_kernel_grads.defvjp(_kernel_grads_fwd, _kernel_grads_bwd)


def _blockwise(problem: LinearProblem, options: Options, config: Config) -> jax.Array:
    if problem.inputs.shape[0] == 0:
        return jnp.zeros((0,), _tile.accumulation_dtype(problem.inputs.dtype))
    return _fused(options, config, *problem)


def _materialised(problem: LinearProblem, options: Options, config: Config) -> jax.Array:
    """The ``"reference"`` implementation: the ``[N, V]`` logits, then the plain formula."""
    if config.filter_eps:
        raise NotImplementedError(
            "gradient_filter_eps is a property of the blockwise backward pass; implementation="
            '"reference" differentiates the exact formula with autodiff and cannot filter'
        )
    acc = _tile.accumulation_dtype(problem.inputs.dtype)
    spec = "nd,vd->nv" if config.vd else "nd,dv->nv"
    logits = jnp.einsum(spec, problem.inputs, problem.weight, preferred_element_type=acc)
    if problem.bias is not None:
        logits = logits + problem.bias.astype(acc)
    canonical = _canonical.Problem(
        logits, problem.labels, problem.where, problem.class_weights, problem.temperature
    )
    return _reference.cross_entropy(canonical, options, integer=True)


def _pallas(problem: LinearProblem, options: Options, config: Config) -> jax.Array:
    backend = config.pallas_backend or jax.default_backend()
    if backend not in PALLAS_BACKENDS:
        raise NotImplementedError(
            f'implementation="pallas" needs a GPU or TPU (the default backend is '
            f"{jax.default_backend()!r}); on CPU pass pallas_backend='tpu' or 'gpu' with "
            f"interpret=True to run a schedule in interpret mode"
        )
    if not config.interpret and backend != jax.default_backend():
        raise NotImplementedError(
            f"the {backend!r} schedule of the fused kernel compiles only on a {backend!r} backend "
            f"(the default backend is {jax.default_backend()!r}); pass interpret=True to run it "
            f"in interpret mode"
        )
    config = dataclasses.replace(config, pallas_backend=backend)
    return _blockwise(problem, options, config)


# Every implementation takes (problem, options, config) and returns per-example losses [N] in the
# accumulation dtype, 0 for examples that do not count; an unsupported case raises
# NotImplementedError with the reason.
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": _blockwise,
    "pallas": _pallas,
    "reference": _materialised,
}


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _run_implementation(implementation, problem: LinearProblem, options, config) -> jax.Array:
    """Per-example losses from one implementation. Operands with an explicit sharding (data- or
    vocabulary-parallel under ``jit``) are handed to XLA's partitioner: the blockwise loops run
    under `jax.sharding.auto_axes`, since their dynamic slices have no explicit-sharding rule,
    and the losses come back sharded like the inputs' rows. Pallas kernels cannot be partitioned
    that way and raise; inside ``shard_map`` every implementation runs per shard.

    Jitted with the static parts as its key, so that an eager call reuses what an earlier call
    of the same shapes and options compiled (the loops and kernels would otherwise be traced and
    compiled anew on every call); inside a caller's ``jit`` it is inlined."""
    mesh = _canonical.explicit_mesh(problem)
    if mesh is None:
        return implementation(problem, options, config)
    if config.engine == "pallas":
        raise NotImplementedError(EXPLICIT_SHARDING)
    rows = jax.typeof(problem.inputs).sharding.spec
    out = jax.sharding.PartitionSpec(rows[0] if rows else None)

    def run(problem):
        return implementation(problem, options, config)

    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(run, out_sharding=out)(problem)


def _check_operands(inputs, weight, bias, labels, weight_layout):
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    inputs = _canonical.check_floating("inputs", inputs)
    weight = _canonical.check_floating("weight", weight)
    if inputs.ndim < 1:
        raise ValueError(f"inputs must have shape [..., D], got shape {inputs.shape}")
    d = inputs.shape[-1]
    expected = "[V, D]" if weight_layout == "vd" else "[D, V]"
    if weight.ndim != 2 or weight.shape[1 if weight_layout == "vd" else 0] != d:
        raise ValueError(
            f"weight shape {weight.shape} does not match inputs shape {inputs.shape}: expected "
            f"{expected} with D = {d} for weight_layout={weight_layout!r}"
        )
    if weight.dtype != inputs.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} (shape {weight.shape}) must equal the inputs dtype "
            f"{inputs.dtype} (shape {inputs.shape})"
        )
    v = weight.shape[0 if weight_layout == "vd" else 1]
    if v == 0:
        raise ValueError(f"weight of shape {weight.shape} has no classes")
    if bias is not None:
        bias = _canonical.check_floating("bias", bias)
        if bias.shape != (v,):
            raise ValueError(
                f"bias shape {bias.shape} must be [{v}] for weight shape {weight.shape}"
            )
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got {labels.dtype} with shape {labels.shape}")
    batch_shape = inputs.shape[:-1]
    try:
        broadcast = np.broadcast_shapes(labels.shape, batch_shape) == tuple(batch_shape)
    except ValueError:
        broadcast = False
    if not broadcast:
        raise ValueError(
            f"labels shape {labels.shape} does not match inputs shape {inputs.shape} without "
            f"the last axis (expected {batch_shape})"
        )
    return inputs, weight, bias, labels, v


def _check_filter_eps(gradient_filter_eps) -> float:
    if gradient_filter_eps is None:
        return 0.0
    if isinstance(gradient_filter_eps, bool) or not isinstance(gradient_filter_eps, numbers.Real):
        raise TypeError(
            f"gradient_filter_eps must be a Python float or None, got {gradient_filter_eps!r}"
        )
    if not 0.0 <= gradient_filter_eps < 1.0:
        raise ValueError(f"gradient_filter_eps must be in [0, 1), got {gradient_filter_eps}")
    return float(gradient_filter_eps)


def linear_softmax_cross_entropy(
    inputs: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | jax.typing.ArrayLike = 1.0,
    reduction: str = "none",
    implementation: str | None = None,
    weight_layout: str = "dv",
    gradient_filter_eps: float | None = None,
    block_sizes: BlockSizes | None = None,
    pallas_backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    r"""Softmax cross-entropy of the logits ``inputs @ weight + bias``, never materialised.

    With ``z = x W + b`` the logits of one example, the loss is the integer-label loss of
    `softmax_cross_entropy_with_integer_labels` on ``z``, with every one of its options:

    .. math::
      \ell = (1 - e)\, w_t \left(\operatorname{lse}(z') - z'_t\right)
        + \frac{e}{V_\text{valid}} \sum_{k \text{ valid}} w_k
          \left(\operatorname{lse}(z') - z'_k\right)
        + \lambda_z \operatorname{lse}(z')^2 , \qquad z' = \operatorname{softcap}(x W + b) / T .

    The default ``"xla"`` implementation works on ``[block_n, block_v]`` tiles of logits, formed by
    a matmul and reduced at once into a float32 log-sum-exp; its ``custom_vjp`` saves only that
    log-sum-exp (``[N]``) and recomputes the tiles in the backward pass, so neither pass holds
    ``[N, V]`` values. Matmuls accumulate in float32 (float64 for float64 inputs); for 16-bit
    inputs the gradient tile is rounded to the inputs' dtype before its two matmuls, and
    ``d_inputs``, ``d_weight`` blocks and ``d_bias`` are accumulated in float32.

    Decisions where the contract is silent:

    - ``weight_layout="vd"`` takes the projection as ``[V, D]``, the embedding table of a model with
      tied embeddings, and contracts it on its last axis without a transposed copy.
    - ``inputs`` and ``weight`` must have the same dtype (``TypeError`` otherwise); ``bias`` may be
      of any floating dtype and is added in the accumulation dtype.
    - ``gradient_filter_eps`` (off by default), as in Cut Cross-Entropy: the backward pass skips the
      two gradient matmuls of every tile in which all ``|dl/dz'|`` (``|p - q|`` without options,
      before the incoming cotangent) are below it. Each skipped entry changes ``d_inputs[i]`` by at
      most ``eps |c_i| |W[:, k]| / T`` and ``d_weight[:, k]`` by at most ``eps |c_i| |x_i| / T``
      (``c`` the cotangent; times 1 more for the softcap's derivative, which is at most 1).
      ``2**-12`` is Cut Cross-Entropy's choice for bfloat16. Only ``"xla"`` and ``"pallas"``
      filter; ``"reference"`` raises ``NotImplementedError``.
    - ``"pallas"`` runs on TPU (Mosaic) and GPU (the Triton backend); on CPU it needs
      ``pallas_backend="tpu"`` or ``"gpu"`` and ``interpret=True``, which run that schedule in
      interpret mode. ``implementation=None`` picks ``"xla"``. On GPU the backward pass adds
      each tile's contributions to ``d_inputs`` and ``d_weight`` with float32 atomic adds (as
      Cut Cross-Entropy does), so those gradients may differ in their last bits between runs;
      the other schedules are deterministic. Its kernels have no derivative rules of their
      own: their ``custom_vjp`` rules are the XLA implementation's, so reverse over reverse
      (``grad`` of ``grad``) is exact, and under ``vmap`` the forward kernel folds the batch
      into rows while the backward runs once per batch element.
    - Sharded operands. Inside ``shard_map`` every implementation runs on its shard, and the
      gradient of an operand that does not vary over a mesh axis (a replicated ``weight`` in data
      parallelism) comes back summed over that axis, as JAX's autodiff gives. Under ``jit``,
      operands with an explicit sharding (tokens or vocabulary sharded) run ``"xla"`` under
      `jax.sharding.auto_axes` and XLA partitions the loops; ``"pallas"`` raises
      ``NotImplementedError`` for them and must be called inside ``shard_map``.

    Args:
      inputs: Features, shape ``[..., D]`` (``[batch_size, hidden_size]`` or
        ``[batch_size, seq_len, hidden_size]``). float16, bfloat16, float32 or float64.
      weight: The output projection, ``[D, V]`` (``[V, D]`` with ``weight_layout="vd"``), in the
        inputs' dtype.
      labels: Integer class ids, shape ``inputs.shape[:-1]`` (or broadcastable to it).
      bias: Optional ``[V]`` bias of the projection.
      where: Boolean mask of the valid classes, broadcast against the logits
        ``inputs.shape[:-1] + (V,)``; a mask of shape ``inputs.shape[:-1]`` masks whole examples.
      ignore_index: A label value whose examples do not count (PyTorch uses -100).
      label_smoothing: ``e`` in ``[0, 1)``; the smoothing mass is spread over valid classes only.
      class_weights: ``[V]`` weights ``w_k`` (zero gradient).
      z_loss: Coefficient ``lambda_z >= 0`` of the ``lse**2`` penalty.
      logit_softcap: ``c > 0`` caps the logits to ``c * tanh(z / c)`` first.
      temperature: ``T > 0``, a Python float or a differentiable scalar array.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (PyTorch's weighted mean).
      implementation: None (``"xla"``), ``"xla"``, ``"pallas"`` or ``"reference"`` (materialised
        logits and plain autodiff: the only one with forward mode, ``jax.jvp`` and
        ``jax.hessian``; the others support reverse mode only).
      weight_layout: ``"dv"`` for a ``[D, V]`` weight, ``"vd"`` for a ``[V, D]`` (tied) one.
      gradient_filter_eps: None or 0 for exact gradients, else the filter threshold in
        ``(0, 1)``.
      block_sizes: Tile sizes, a `jax_softmax_ce.kernels.linear.BlockSizes`; None for the
        implementation's default on the platform (`BlockSizes.get_default`). The GPU schedule
        needs powers of two of at least 16, ``block_d`` included; the compiled TPU schedule
        needs ``block_n`` a multiple of 8 and ``block_v``, ``block_d`` multiples of 128 (or
        each at least the whole axis).
      pallas_backend: ``"tpu"`` or ``"gpu"``: which kernel schedule ``"pallas"`` runs; None for
        the default backend's.
      interpret: Run the ``"pallas"`` kernels in interpret mode (for tests on CPU).

    Returns:
      The losses, shape ``inputs.shape[:-1]`` for ``reduction="none"``, else a scalar; float32
      for 16-bit inputs, the inputs' dtype otherwise.

    Raises:
      TypeError: non-floating inputs or weight, different dtypes, or non-integer labels.
      ValueError: shapes that do not match, or an option out of its range.
      NotImplementedError: an explicit ``implementation`` that cannot take this case.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> inputs = jnp.array([[1.0, 0.5], [-0.3, 0.8]])
      >>> weight = jnp.array([[1.2, -0.8, -0.5], [0.2, 0.4, 1.6]])
      >>> labels = jnp.array([0, 2])
      >>> print(sce.linear_softmax_cross_entropy(inputs, weight, labels).round(4))
      [0.417  0.4793]
      >>> print(sce.linear_softmax_cross_entropy(
      ...     inputs, weight.T, labels, weight_layout="vd", reduction="mean").round(4))
      0.4481

    References:
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024.
      Hsu et al., `Liger Kernel <https://arxiv.org/abs/2410.10989>`_ (fused linear
      cross-entropy), 2024.
    """
    reduction = _options.check_reduction(reduction)
    implementation = _options.check_implementation(implementation)
    inputs, weight, bias, labels, v = _check_operands(inputs, weight, bias, labels, weight_layout)
    filter_eps = _check_filter_eps(gradient_filter_eps)
    if block_sizes is None:
        platform = pallas_backend or jax.default_backend()
        block_sizes = BlockSizes.get_default(implementation or "xla", platform)
    elif not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes or None, got {block_sizes!r}")
    if pallas_backend is not None and pallas_backend not in PALLAS_BACKENDS:
        raise ValueError(
            f"pallas_backend must be None or one of {PALLAS_BACKENDS}, got {pallas_backend!r}"
        )
    logits_shape = (*inputs.shape[:-1], v)
    lay = _canonical.layout(logits_shape, -1)
    array_temperature = _canonical.array_temperature(temperature)
    options = _options.make_options(
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
        ignore_index=ignore_index,
        temperature_is_array=array_temperature is not None,
    )
    problem = LinearProblem(
        inputs=inputs.reshape(lay.num_rows, inputs.shape[-1]),
        weight=weight,
        bias=bias,
        labels=jnp.broadcast_to(labels, lay.batch_shape).reshape(lay.num_rows),
        where=_canonical.mask(where, logits_shape, lay, -1, LOGITS),
        class_weights=_canonical.class_weights(
            class_weights, lay, inputs.dtype, logits_shape, LOGITS
        ),
        temperature=array_temperature,
    )
    if implementation is None:
        implementation = "xla"
    config = Config(
        num_classes=v,
        vd=weight_layout == "vd",
        block_sizes=block_sizes,
        filter_eps=filter_eps,
        engine="pallas" if implementation == "pallas" else "xla",
        pallas_backend=pallas_backend,
        interpret=bool(interpret),
    )
    losses = _run_implementation(IMPLEMENTATIONS[implementation], problem, options, config)
    return _canonical.reduce_losses(
        losses,
        _logits_stand_in(problem, v),
        ignore_index=options.ignore_index,
        integer=True,
        reduction=reduction,
        batch_shape=lay.batch_shape,
        dtype=_tile.accumulation_dtype(inputs.dtype),
    )
