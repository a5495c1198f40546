"""The fused loss's ``"xla"`` implementation: blockwise loops in JAX with a ``custom_vjp``.

The forward pass loops over row blocks and, inside, over vocabulary blocks (``lax.fori_loop``);
each step forms one ``[block_n, block_v]`` tile with a matmul and merges it into a running
log-sum-exp and target sum in float32 (the `kernels._linear` tile steps, the same as the Pallas
kernels'). Only per-example statistics (`_tile.Stats`, float32 ``[N, 1]`` each) are saved beside the
inputs. The backward pass makes two passes, as flash attention's does: over row blocks, each
accumulating its ``d_inputs`` block (float32 ``[block_n, D]``) over the vocabulary before writing
it in the inputs' dtype, then over vocabulary blocks, each accumulating its ``d_weight`` block
(float32 ``[D, block_v]``) and ``d_bias`` over the rows. Each recomputes its tiles from the saved
statistics. Temporary memory is therefore O(block_n·block_v + block_n·D + D·block_v) besides the
gradients themselves, in their own dtypes, and never O(N·V): no float32 accumulator spans the
inputs or the projection. A ragged last block is moved back to end at the array's edge and
ignores the rows or columns an earlier block covered, so nothing is padded or copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical, _sharding
from jax_softmax_ce._canonical import Linear, Problem
from jax_softmax_ce._options import BlockSizes, Options, Xla
from jax_softmax_ce.kernels import _blocks, _linear, _tile
from jax_softmax_ce.monitoring import CrossEntropyAux


def losses(options: Options, config: Xla, problem: Problem) -> jax.Array:
    """Per-example losses ``[N]``. Operands with an explicit sharding (data- or
    vocabulary-parallel under ``jit``) are handed to XLA's partitioner: the loops run under
    `jax.sharding.auto_axes`, since their dynamic slices have no explicit-sharding rule, and the
    losses come back sharded like the inputs' rows."""
    linear = problem.logits
    blocks = config.block_sizes or BlockSizes.get_default(
        "xla",
        num_rows=problem.num_rows,
        num_classes=problem.num_classes,
        dtype=linear.dtype,
        hidden=linear.inputs.shape[1],
    )
    mesh = _canonical.explicit_mesh(problem)
    if mesh is None:
        return _fused(options, blocks, problem)
    classes = _classes_axis(mesh, linear)
    if classes is not None:
        return _vocabulary_parallel(options, blocks, problem, mesh, classes)
    rows = jax.typeof(linear.inputs).sharding.spec
    out = _out_specs(options, jax.sharding.PartitionSpec(rows[0] if rows else None))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(functools.partial(_fused, options, blocks), out_sharding=out)(
            problem
        )


def _out_specs(options: Options, rows):
    """The specs of `_fused`'s outputs, each sharded like the rows (``rows``, a spec)."""
    if not options.aux:
        return rows
    return rows, CrossEntropyAux(rows, rows, rows, rows, rows if options.integer else None)


def _classes_axis(mesh, linear: Linear):
    """The mesh axes over which an explicitly sharded projection splits its classes evenly, or
    None."""
    spec = (*jax.typeof(linear.weight).sharding.spec, None, None)
    classes = spec[0 if linear.vd else 1]
    if classes is None:
        return None
    names = classes if isinstance(classes, tuple) else (classes,)
    return None if linear.num_classes % math.prod(mesh.shape[a] for a in names) else classes


def _vocabulary_parallel(options: Options, blocks: BlockSizes, problem: Problem, mesh, classes):
    """The losses of a problem whose projection's classes are explicitly sharded over
    ``classes``: the loops per device inside ``shard_map``, each on its rows and its classes,
    as with ``vocab_axis_name`` (`_sharding`), so that neither the projection nor the logits
    are gathered. Every operand is resharded to its place first (a small one, labels or class
    weights, may come replicated)."""
    linear = problem.logits
    rows = (*jax.typeof(linear.inputs).sharding.spec, None)[0]
    P = jax.sharding.PartitionSpec

    def per_row(x):
        return None if x is None else P(rows if x.shape[0] != 1 else None, None)

    facts = problem.rows
    spec = Problem(
        Linear(
            P(rows, None),
            P(classes, None) if linear.vd else P(None, classes),
            None if linear.bias is None else P(classes),
            linear.vd,
        ),
        P(rows),
        None
        if problem.where is None
        else {"row": P(rows, None), "col": P(None, classes), "full": P(rows, classes)}[
            options.mask
        ],
        None if problem.class_weights is None else P(classes),
        None if problem.temperature is None else P(),
        _canonical.Rows(*(per_row(x) for x in facts)),
    )
    local = dataclasses.replace(options, vocab_axis=classes)

    def per_device(problem):
        v = problem.logits.num_classes
        labels = problem.labels - _sharding.class_offset(classes, v)
        return _fused(local, blocks, problem._replace(labels=labels))

    with jax.sharding.use_abstract_mesh(mesh):
        problem = jax.tree.map(jax.sharding.reshard, problem, spec)
        out = _out_specs(options, P(rows))
        return jax.shard_map(per_device, mesh=mesh, in_specs=(spec,), out_specs=out)(problem)


def _slice(x, start, size: int, axis: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _tile_operands(options: Options, ops: _blocks.Operands, r0, c0, bn: int, bv: int):
    """The blocks of the operands other than ``x`` and ``w`` at rows ``r0 + [0, bn)`` and
    columns ``c0 + [0, bv)``."""

    def block(name, x):
        if x is None or name in ("x", "w"):
            return None
        row, col = _blocks.axes(name, options)
        if row == 0:
            x = _slice(x, r0, bn, 0)
        if col == 1:
            x = _slice(x, c0, bv, 1)
        return x

    return _blocks.Operands(*(block(n, x) for n, x in zip(ops._fields, ops, strict=True)))


def _manual_axes(problem: Problem) -> tuple[str, ...]:
    """The ``shard_map`` axes over which some operand varies (empty outside ``shard_map``)."""
    axes = frozenset().union(*(_canonical.varying_axes(x) for x in jax.tree.leaves(problem)))
    return tuple(sorted(axes))


def _varying(tree, axes: tuple[str, ...]):
    """Loop carries built from constants, made to vary like the operands that update them
    (inside ``shard_map`` a loop's carry must keep its type)."""
    if not axes:
        return tree
    return jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), tree)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Loops:
    """The geometry of the loops over one problem: tile sizes clipped to the arrays."""

    def __init__(self, options: Options, blocks: BlockSizes, problem: Problem, **saved):
        linear = problem.logits
        self.options, self.vd = options, linear.vd
        self.ops = _canonical.operands(options, problem, **saved)
        self.x, self.w = self.ops.x, linear.weight
        self.n, self.d = self.x.shape
        self.v = linear.num_classes
        self.bn, self.bv = min(blocks.block_n, self.n), min(blocks.block_v, self.v)
        self.dtype = problem.accumulation_dtype
        self.axes = _manual_axes(problem)

    def tile(self, i, j) -> tuple[_linear.Tile, jax.Array, jax.Array]:
        """The tile of row block ``i`` and vocabulary block ``j`` (each moved back to end inside
        the array, and ignoring the rows and columns an earlier block covered), and its blocks
        of ``x`` and of the projection."""
        r0 = _linear.block_start(i, self.bn, self.n)
        c0 = _linear.block_start(j, self.bv, self.v)
        blocks = _tile_operands(self.options, self.ops, r0, c0, self.bn, self.bv)
        tile = _linear.Tile(
            blocks,
            self.options,
            start=(r0, c0),
            lo=(i * self.bn, j * self.bv),
            shape=(self.bn, self.bv),
            extents=(self.n, self.v),
        )
        x_blk = _slice(self.x, r0, self.bn, 0)
        return tile, x_blk, _slice(self.w, c0, self.bv, 0 if self.vd else 1)

    def logits(self, x_blk, w_blk, tile: _linear.Tile):
        return _linear.logits_tile(x_blk, w_blk, tile.bias, vd=self.vd)


def _forward_state(options: Options, blocks: BlockSizes, problem: Problem) -> _tile.RowState:
    """``RowState`` of ``[N, 1]`` accumulators, looping over row blocks, then vocabulary blocks."""
    loops = _Loops(options, blocks, problem)
    n, v, bn, bv = loops.n, loops.v, loops.bn, loops.bv

    def row_block(i, state):
        r0 = _linear.block_start(i, bn, n)

        def vocab_block(j, acc):
            tile, x_blk, w_blk = loops.tile(i, j)
            return tile.forward(acc, loops.logits(x_blk, w_blk, tile))

        init = _varying(_blocks.state_init(options, bn, loops.dtype), loops.axes)
        block = jax.lax.fori_loop(0, _cdiv(v, bv), vocab_block, init)
        fresh = _linear.rows_ok(r0, i * bn, bn, n)

        def write(full, new):
            old = _slice(full, r0, bn, 0)
            return jax.lax.dynamic_update_slice_in_dim(full, jnp.where(fresh, new, old), r0, 0)

        return jax.tree.map(write, state, block)

    init = _varying(_blocks.state_init(options, n, loops.dtype), loops.axes)
    return jax.lax.fori_loop(0, _cdiv(n, bn), row_block, init)


def _forward(options: Options, blocks: BlockSizes, problem: Problem):
    """``(losses [N], stats)`` (`_tile.Stats`), or with ``options.aux`` the values and saved rows
    of `_canonical.finish_rows`."""
    state = _forward_state(options, blocks, problem)
    if options.vocab_axis is not None:
        state = _sharding.combine(state, options.vocab_axis, problem.num_classes)
    return _canonical.finish_rows(options, problem, state)


def _write(full, new, start, size: int, axis: int, fresh):
    """``full`` with ``new`` written at ``start`` along ``axis``, where ``fresh`` (the part of a
    moved-back block that an earlier block did not cover)."""
    old = _slice(full, start, size, axis)
    new = jnp.where(fresh, new.astype(full.dtype), old)
    return jax.lax.dynamic_update_slice_in_dim(full, new, start, axis)


def _backward(options: Options, blocks: BlockSizes, problem: Problem, stats, ct, aux_ops):
    """``_linear.Grads``, in two passes, as in flash attention's backward: ``d_inputs`` over row
    blocks (each accumulated over the vocabulary in a float32 ``[block_n, D]`` block, then
    written in the inputs' dtype), then ``d_weight`` and ``d_bias`` over vocabulary blocks (each
    accumulated over the rows in a float32 ``[D, block_v]`` block). Every tile's gradient is
    formed twice, one matmul more than a single pass, so that no float32 accumulator spans the
    inputs or the projection. ``stats`` (`_tile.Stats`) and ``ct`` (the cotangent, 0 for rows
    that do not count) are ``[N, 1]``, and so are ``aux_ops``, the coefficients of the
    ``return_aux`` values' gradient (`_canonical.aux_operands`)."""
    loops = _Loops(options, blocks, problem, **stats._asdict(), ct=ct, **aux_ops)
    n, d, v, bn, bv = loops.n, loops.d, loops.v, loops.bn, loops.bv
    dtype, vd = loops.dtype, loops.vd
    has_bias = problem.logits.bias is not None

    def tile_grad(i, j):
        tile, x_blk, w_blk = loops.tile(i, j)
        grad = tile.backward(loops.logits(x_blk, w_blk, tile), filter_eps=options.filter_eps)
        return grad, x_blk, w_blk

    def row_block(i, carry):
        dx, t_sum = carry

        def vocab_block(j, inner):
            acc, t_sum = inner
            grad, _, w_blk = tile_grad(i, j)
            if grad.t_part is not None:
                t_sum = t_sum + jnp.sum(grad.t_part)

            def add(acc):
                return acc + _linear.input_grad(grad.d_logits, w_blk, vd=vd)

            return _linear.when_kept(grad.keep, add, acc), t_sum

        init = (_varying(jnp.zeros((bn, d), dtype), loops.axes), t_sum)
        acc, t_sum = jax.lax.fori_loop(0, _cdiv(v, bv), vocab_block, init)
        r0 = _linear.block_start(i, bn, n)
        return _write(dx, acc, r0, bn, 0, _linear.rows_ok(r0, i * bn, bn, n)), t_sum

    def vocab_block(j, carry):
        dw, db = carry

        def row_block(i, acc):
            grad, x_blk, _ = tile_grad(i, j)

            def add(acc):
                dw_blk, db_blk = acc
                dw_blk = dw_blk + _linear.weight_grad(x_blk, grad.d_logits, vd=vd)
                if db_blk is not None:
                    db_blk = db_blk + jnp.sum(grad.d_logits, axis=0, keepdims=True)
                return dw_blk, db_blk

            return _linear.when_kept(grad.keep, add, acc)

        init = (
            jnp.zeros((bv, d) if vd else (d, bv), dtype),
            jnp.zeros((1, bv), dtype) if has_bias else None,
        )
        dw_blk, db_blk = jax.lax.fori_loop(0, _cdiv(n, bn), row_block, _varying(init, loops.axes))
        c0 = _linear.block_start(j, bv, v)
        ok = _linear.columns_ok(c0, j * bv, bv, v)
        dw = _write(dw, dw_blk, c0, bv, 0 if vd else 1, ok.T if vd else ok)
        return dw, None if db is None else _write(db, db_blk, c0, bv, 1, ok)

    zeros = (jnp.zeros((n, d), loops.x.dtype), jnp.zeros((), dtype))
    dx, t_sum = jax.lax.fori_loop(0, _cdiv(n, bn), row_block, _varying(zeros, loops.axes))
    zeros = (
        jnp.zeros(loops.w.shape, loops.w.dtype),
        jnp.zeros((1, v), dtype) if has_bias else None,
    )
    dw, db = jax.lax.fori_loop(0, _cdiv(v, bv), vocab_block, _varying(zeros, loops.axes))
    return _linear.Grads(dx, dw, None if db is None else db[0], t_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(options: Options, blocks: BlockSizes, problem: Problem):
    return _forward(options, blocks, problem)[0]


def _fused_fwd(options, blocks, problem):
    out, saved = _forward(options, blocks, problem)
    return out, (problem, saved)


def _fused_bwd(options, blocks, residuals, cotangent):
    problem, saved = residuals
    rows, linear = problem.rows, problem.logits
    stats, cotangent, aux_grad = _canonical.unpack_saved(options, problem, saved, cotangent)
    ct = jnp.where(rows.counted, cotangent.astype(stats.m.dtype)[:, None], 0)
    grads = _backward(options, blocks, problem, stats, ct, _canonical.aux_operands(aux_grad))
    # A shard's classes give part of each input's gradient (and of the temperature's terms).
    d_inputs = _sharding.psum(grads.d_inputs, options.vocab_axis)
    terms = _sharding.psum(grads.t_sum, options.vocab_axis)
    d_temperature = _canonical.temperature_cotangent(terms, stats, ct, problem, options, aux_grad)

    def like(grad, primal):
        return None if grad is None else _canonical.like_primal(grad.astype(primal.dtype), primal)

    d_linear = Linear(
        like(d_inputs, linear.inputs),
        like(grads.d_weight, linear.weight),
        like(grads.d_bias, linear.bias),
        linear.vd,
    )
    return (Problem(d_linear, None, None, None, d_temperature, None),)


_fused.defvjp(_fused_fwd, _fused_bwd)
