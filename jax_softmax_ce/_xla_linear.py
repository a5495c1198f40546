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

Sharded over automatic mesh axes under ``jit`` (plain `jax.sharding.NamedSharding` operands, or
explicitly sharded rows under `jax.sharding.auto_axes`), the loops are left to XLA's
partitioner, which cannot see into a dynamic slice along a sharded axis and would gather the
whole operand. So the loops split the rows and the classes into groups (`_Loops`): every block
takes the same rows (columns) from each group, a slice along an axis that no mesh axis shards,
and the partitioner gives each device its groups. Neither the inputs, the projection nor
anything logits-sized is gathered: the devices exchange a few floats per row for the forward
state, one sum of each ``d_inputs`` block over the classes' shards and one of each
``d_weight`` block over the rows', and the gradients come back sharded like their operands.
The groups' count is the largest product of the automatic mesh axes' sizes, at most 16, that
divides the extent and the block (`_groups`): where the size of the axis that shards the rows
(classes) does not divide it (an axis over 16, or one that does not divide ``N`` and
``block_n``, ``V`` and ``block_v``: a ragged vocabulary), the partitioner gathers that operand,
in part or whole, as without groups. On one device, and inside ``shard_map``, there is one
group: the loops are the plain ones, compiled to the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical, _sharding
from jax_softmax_ce._canonical import Linear, Problem
from jax_softmax_ce._options import BlockSizes, Options, Xla
from jax_softmax_ce.kernels import _blocks, _linear, _tile
from jax_softmax_ce.monitoring import CrossEntropyAux


def losses(options: Options, config: Xla, problem: Problem) -> jax.Array:
    """Per-example losses ``[N]``. A projection whose classes are sharded over explicit mesh
    axes runs per device inside ``shard_map`` (`_vocabulary_parallel`). Other operands with an
    explicit sharding are handed to XLA's partitioner: the loops run under
    `jax.sharding.auto_axes`, since their dynamic slices have no explicit-sharding rule, and the
    losses come back sharded like the inputs' rows. Under automatic axes the loops' groups
    (module docstring) keep the partitioner from gathering the operands."""
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


# The most groups of rows or of classes: so that a default block (1024 rows by 2048 columns)
# keeps 64 rows and 128 columns (a TPU vector's lanes) of every group.
MAX_GROUPS = 16


def _automatic_axis_sizes(x: jax.Array) -> list[int]:
    """The sizes of the automatic axes of the mesh in ``x``'s type (none on one device, nor
    inside ``shard_map``, whose axes are manual)."""
    mesh = jax.typeof(x).sharding.mesh
    auto = jax.sharding.AxisType.Auto
    return [s for s, t in zip(mesh.axis_sizes, mesh.axis_types, strict=True) if t == auto]


def _groups(x: jax.Array, size: int, block: int) -> int:
    """How many groups the loops split an axis of ``size`` rows or classes of ``x`` into, with
    blocks of ``block`` (`_Loops`): the largest product of the sizes of some of the automatic
    mesh axes (any of them may shard that axis), at most `MAX_GROUPS`, that divides both
    ``size`` and ``block``; 1 on one device."""
    sizes = _automatic_axis_sizes(x)
    products = {
        math.prod(chosen)
        for k in range(len(sizes) + 1)
        for chosen in itertools.combinations(sizes, k)
    }
    return max(g for g in products if g <= MAX_GROUPS and size % g == 0 and block % g == 0)


class _Loops:
    """The geometry of the loops over one problem: tile sizes clipped to the arrays, and the
    groups that every block takes its rows and its columns from.

    With ``row_groups`` groups of rows (``groups`` of classes), each operand is seen as
    ``[row_groups, N / row_groups]`` along its row axis (``[groups, V / groups]`` along its
    class axis), a reshape, and row block ``i`` (vocabulary block ``j``) is the same
    ``block_n / row_groups`` rows (``block_v / groups`` classes) of every group: a dynamic slice
    along an axis that no mesh axis shards where the groups' count is a multiple of the mesh
    axes' sizes, so that XLA's partitioner splits the loops over the groups instead of gathering
    the operands. The tile of each group is formed apart (``vmap``), and the forward states of
    a row's groups of classes are folded at the end of the row with the cross-shard merge
    (`_fold`). In the backward, each group of classes keeps its part of a ``d_inputs`` block
    (``[groups, block_n, D]``), each group of rows its part of a ``d_weight`` block
    (``[row_groups, D, block_v]``), until the block is done: the groups on other devices are
    then summed once per block, not once per tile. Those accumulators are split over the
    devices that split the groups, so they take per device what one group's takes where every
    mesh axis splits the rows or the classes; an axis that splits neither multiplies them by
    its size. One group of each (one device) is the plain loop."""

    def __init__(self, options: Options, blocks: BlockSizes, problem: Problem, **saved):
        linear = problem.logits
        self.options, self.vd = options, linear.vd
        ops = _canonical.operands(options, problem, **saved)._replace(w=linear.weight)
        self.x, self.w = ops.x, linear.weight
        self.n, self.d = self.x.shape
        self.v = linear.num_classes
        self.bn, self.bv = min(blocks.block_n, self.n), min(blocks.block_v, self.v)
        self.dtype = problem.accumulation_dtype
        self.axes = _manual_axes(problem)
        self.row_groups = _groups(self.x, self.n, self.bn)
        self.groups = _groups(self.w, self.v, self.bv)
        # Rows and classes per group, and how many of them one block takes from each group.
        self.ng, self.bng = self.n // self.row_groups, self.bn // self.row_groups
        self.vg, self.bg = self.v // self.groups, self.bv // self.groups
        self.w_axis = 0 if self.vd else 1
        # Each operand's row and class axes (None where it has none), and its grouped view.
        self.place = {
            n: _blocks.axes(n, options) for n, x in ops._asdict().items() if x is not None
        }
        self.views = {n: self.split(getattr(ops, n), *self.place[n]) for n in self.place}

    def split(self, x, row: int | None, col: int | None):
        """``x`` with its row axis ``row`` split into ``[row_groups, N / row_groups]`` and its
        class axis ``col`` into ``[groups, V / groups]`` (where there are several)."""
        if col is not None and self.groups > 1:
            x = x.reshape(*x.shape[:col], self.groups, -1, *x.shape[col + 1 :])
        if row is not None and self.row_groups > 1:
            x = x.reshape(*x.shape[:row], self.row_groups, -1, *x.shape[row + 1 :])
        return x

    def join(self, x, row: int | None, col: int | None):
        """`split`'s inverse, for ``x`` of the original axes ``row`` and ``col``."""
        if row is not None and self.row_groups > 1:
            x = x.reshape(*x.shape[:row], -1, *x.shape[row + 2 :])
        if col is not None and self.groups > 1:
            x = x.reshape(*x.shape[:col], -1, *x.shape[col + 2 :])
        return x

    def within(self, row: int | None, col: int | None) -> tuple[int | None, int | None]:
        """Where the rows and the classes of one group are in a `split` array."""
        row_in = None if row is None else row + (self.row_groups > 1)
        col_in = None
        if col is not None:
            before = row is not None and row < col and self.row_groups > 1
            col_in = col + before + (self.groups > 1)
        return row_in, col_in

    def for_groups(self, tree):
        """Loop carries, one per group of rows and of classes on leading axes."""
        lead = tuple(g for g in (self.row_groups, self.groups) if g > 1)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (*lead, *a.shape)), tree)

    def grouped(self, fn, i, j, *carry):
        """``(fn(tile, z_raw, *carry), x_blk, w_blk)``: ``fn`` of the tile of row block ``i`` and
        vocabulary block ``j`` of every group (each block moved back to end inside its group,
        and ignoring the rows and columns an earlier block covered) and its raw logits, mapped
        over the groups of rows, then of classes (``carry`` and the result have a leading axis
        for each of them where there are several); the blocks of the inputs and of the
        projection as `split` sees them, ``[row_groups, rows, D]`` and ``[D, groups, cols]``
        (``[groups, cols, D]`` when ``vd``), without the axis of one group: ``[block_n, D]``
        and ``[D, block_v]`` on one device."""
        bng, bg = self.bng, self.bg
        r0 = _linear.block_start(i, bng, self.ng)
        c0 = _linear.block_start(j, bg, self.vg)

        def block(name):
            x = self.views[name]
            row, col = self.within(*self.place[name])
            if row is not None:
                x = _slice(x, r0, bng, row)
            if col is not None:
                x = _slice(x, c0, bg, col)
            return x

        blocks = {name: block(name) for name in self.views}
        x_blk, w_blk = blocks.pop("x"), blocks.pop("w")

        def one(blocks, x_blk, w_blk, base, *carry):
            col0, lo = c0, j * bg
            if base is not None:
                col0, lo = base + col0, base + lo
            tile = _linear.Tile(
                _blocks.Operands(**blocks),
                self.options,
                start=(r0, col0),
                lo=(i * bng, lo),
                shape=(bng, bg),
                extents=(self.ng, self.v),
            )
            return fn(tile, _linear.logits_tile(x_blk, w_blk, tile.bias, vd=self.vd), *carry)

        base = None
        more = (0,) * len(carry)
        if self.groups > 1:
            base = jnp.arange(self.groups, dtype=jnp.int32) * self.vg
            cols = {n: self.place[n][1] for n in blocks}
            one = jax.vmap(one, in_axes=(cols, None, self.w_axis, 0, *more))
        if self.row_groups > 1:
            rows = {n: None if self.place[n][0] is None else 0 for n in blocks}
            one = jax.vmap(one, in_axes=(rows, 0, None, None, *more))
        return one(blocks, x_blk, w_blk, base, *carry), x_blk, w_blk

    def by_classes(self, x):
        """A gradient tile from `grouped` as ``[groups, block_n, cols]``, each group's rows side by
        side (``[block_n, block_v]`` for one group of classes)."""
        if self.groups == self.row_groups == 1:
            return x
        if self.groups > 1 and self.row_groups > 1:
            x = jnp.moveaxis(x, 1, 0)
        return x.reshape(*x.shape[: int(self.groups > 1)], self.bn, -1)

    def by_rows(self, x):
        """A gradient tile from `grouped` as ``[row_groups, rows, block_v]``, each row group's
        columns side by side (``[block_n, block_v]`` for one group of rows)."""
        if self.groups == self.row_groups == 1:
            return x
        if self.groups > 1:
            x = jnp.moveaxis(x, int(self.row_groups > 1), -2)
        return x.reshape(*x.shape[: int(self.row_groups > 1)], -1, self.bv)

    def fold(self, state: _tile.RowState) -> _tile.RowState:
        """The state of a row block from its groups' states (`grouped`'s carry)."""
        if self.groups == 1:
            return state
        if self.row_groups > 1:
            state = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), state)
        return jax.tree.map(lambda a: a[0], _fold(state, self.groups))


def _over(groups: int, fn, in_axes):
    """``fn`` mapped over ``groups`` (on the operands' axes ``in_axes``), where there are
    several."""
    return fn if groups == 1 else jax.vmap(fn, in_axes=in_axes)


def _fold(state: _tile.RowState, k: int) -> _tile.RowState:
    """``k`` states on a leading axis (of classes in order) folded into one, pairwise with
    `_tile.row_state_combine`, the cross-shard merge: ``log2(k)`` merges of half as many."""
    if k == 1:
        return state

    def every_other(start: int, stop: int):
        return jax.tree.map(lambda a: a[start:stop:2], state)

    pairs = _tile.row_state_combine(every_other(0, k - 1), every_other(1, k))
    if k % 2:
        pairs = jax.tree.map(lambda p, a: jnp.concatenate([p, a[k - 1 :]]), pairs, state)
    return _fold(pairs, (k + 1) // 2)


def _forward_state(options: Options, blocks: BlockSizes, problem: Problem) -> _tile.RowState:
    """``RowState`` of ``[N, 1]`` accumulators, looping over row blocks, then vocabulary blocks
    (with several groups of classes, each group's apart, folded at the end of the row)."""
    loops = _Loops(options, blocks, problem)
    ng, bng = loops.ng, loops.bng

    def forward(tile, z, acc):
        return tile.forward(acc, z)

    def row_block(i, state):
        r0 = _linear.block_start(i, bng, ng)

        def vocab_block(j, acc):
            return loops.grouped(forward, i, j, acc)[0]

        init = loops.for_groups(_varying(_blocks.state_init(options, bng, loops.dtype), loops.axes))
        block = loops.fold(jax.lax.fori_loop(0, _cdiv(loops.vg, loops.bg), vocab_block, init))
        fresh = _linear.rows_ok(r0, i * bng, bng, ng)
        axis = loops.within(0, None)[0]

        def write(full, new):
            old = _slice(full, r0, bng, axis)
            return jax.lax.dynamic_update_slice_in_dim(full, jnp.where(fresh, new, old), r0, axis)

        return jax.tree.map(write, state, block)

    init = _varying(_blocks.state_init(options, loops.n, loops.dtype), loops.axes)
    init = jax.tree.map(lambda a: loops.split(a, 0, None), init)
    state = jax.lax.fori_loop(0, _cdiv(ng, bng), row_block, init)
    return jax.tree.map(lambda a: loops.join(a, 0, None), state)


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
    ng, bng, vg, bg = loops.ng, loops.bng, loops.vg, loops.bg
    dtype, vd, w_axis = loops.dtype, loops.vd, loops.w_axis
    groups, row_groups = loops.groups, loops.row_groups
    has_bias = problem.logits.bias is not None
    # Each group of classes (of rows) keeps its part of a d_inputs (d_weight) block apart until
    # the block is done: with the groups split over devices, one sum across them per block.
    input_grad = _over(groups, functools.partial(_linear.input_grad, vd=vd), (0, w_axis))
    weight_grad = _over(row_groups, functools.partial(_linear.weight_grad, vd=vd), 0)
    by_classes = (groups,) if groups > 1 else ()
    by_rows = (row_groups,) if row_groups > 1 else ()

    def backward(tile, z):
        return tile.backward(z, filter_eps=options.filter_eps)

    def tile_grad(i, j):
        grad, x_blk, w_blk = loops.grouped(backward, i, j)
        if grad.keep is not None and groups * row_groups > 1:
            grad = grad._replace(keep=jnp.any(grad.keep))  # kept where any group's tile is
        return grad, x_blk, w_blk

    def row_block(i, carry):
        dx, t_sum = carry

        def vocab_block(j, inner):
            acc, t_sum = inner
            grad, _, w_blk = tile_grad(i, j)
            if grad.t_part is not None:
                t_sum = t_sum + jnp.sum(grad.t_part)

            def add(acc):
                return acc + input_grad(loops.by_classes(grad.d_logits), w_blk)

            return _linear.when_kept(grad.keep, add, acc), t_sum

        init = (_varying(jnp.zeros((*by_classes, bn, d), dtype), loops.axes), t_sum)
        acc, t_sum = jax.lax.fori_loop(0, _cdiv(vg, bg), vocab_block, init)
        if groups > 1:
            acc = jnp.sum(acc, axis=0)
        r0 = _linear.block_start(i, bng, ng)
        fresh = _linear.rows_ok(r0, i * bng, bng, ng)
        axis = loops.within(0, None)[0]
        return _write(dx, loops.split(acc, 0, None), r0, bng, axis, fresh), t_sum

    def vocab_block(j, carry):
        dw, db = carry

        def row_block(i, acc):
            grad, x_blk, _ = tile_grad(i, j)
            d_logits = loops.by_rows(grad.d_logits)

            def add(acc):
                dw_blk, db_blk = acc
                dw_blk = dw_blk + weight_grad(x_blk, d_logits)
                if db_blk is not None:
                    db_blk = db_blk + jnp.sum(d_logits, axis=-2, keepdims=True)
                return dw_blk, db_blk

            return _linear.when_kept(grad.keep, add, acc)

        init = (
            jnp.zeros((*by_rows, bv, d) if vd else (*by_rows, d, bv), dtype),
            jnp.zeros((*by_rows, 1, bv), dtype) if has_bias else None,
        )
        acc = jax.lax.fori_loop(0, _cdiv(ng, bng), row_block, _varying(init, loops.axes))
        if row_groups > 1:
            acc = jax.tree.map(lambda a: jnp.sum(a, axis=0), acc)
        dw_blk, db_blk = acc
        c0 = _linear.block_start(j, bg, vg)
        ok = _linear.columns_ok(c0, j * bg, bg, vg)
        axis = loops.within(None, w_axis)[1]
        dw = _write(dw, loops.split(dw_blk, None, w_axis), c0, bg, axis, ok.T if vd else ok)
        if db is not None:
            axis = loops.within(None, 1)[1]
            db = _write(db, loops.split(db_blk, None, 1), c0, bg, axis, ok)
        return dw, db

    zeros = (loops.split(jnp.zeros((n, d), loops.x.dtype), 0, None), jnp.zeros((), dtype))
    dx, t_sum = jax.lax.fori_loop(0, _cdiv(ng, bng), row_block, _varying(zeros, loops.axes))
    zeros = (
        loops.split(jnp.zeros(loops.w.shape, loops.w.dtype), None, w_axis),
        loops.split(jnp.zeros((1, v), dtype), None, 1) if has_bias else None,
    )
    dw, db = jax.lax.fori_loop(0, _cdiv(vg, bg), vocab_block, _varying(zeros, loops.axes))
    dx, dw = loops.join(dx, 0, None), loops.join(dw, None, w_axis)
    return _linear.Grads(dx, dw, None if db is None else loops.join(db, None, 1)[0], t_sum)


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
