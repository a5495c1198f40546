"""A Mosaic GPU probe: the plain integer-label loss on Pallas' Mosaic GPU backend, so that a GPU
session measures the choice of Triton for `jax_softmax_ce.kernels.cross_entropy_gpu` instead of
taking it on trust.

It is a benchmark candidate ("probe:mosaic_gpu" in the ce suite), not part of the library: no
options, finite logits, labels in ``[0, V)``, and ``V`` a multiple of one 128-byte row of the
logits' dtype (64 for 16-bit, 32 for 32-bit; every vocabulary of the benchmark grid is). Anything
else raises `NotImplementedError`, which the harness records as skipped.

Schedule (one kernel each way, ``plgpu.kernel``, lane semantics): a grid of programs
``(row strip, vocabulary split)``, one warpgroup each. A strip is ``BLOCK_N = 64`` rows, the
height of the WGMMA register layout that the row reductions use; the vocabulary is split until
there are `MIN_PROGRAMS` programs, two per SM of an H100, since 8192 rows make only 128 strips.
A program streams its run of ``[64, block_v]`` blocks (16 KiB) through a TMA pipeline of
`STAGES` buffers in shared memory, tiled and swizzled so that the register loads are free of
bank conflicts (which is what ties ``V`` to the 128-byte row: TMA copies a tiled block only from
an array whose tiled dimension is a multiple of the tile). The forward carries the running max,
sum-exp and target logit per row in float32 registers and writes them per split; XLA merges the
splits (``[splits, N]`` floats). The backward recomputes ``p = exp(z - lse)`` and writes
``ct (p - onehot)`` in the logits' dtype through two shared-memory buffers and TMA stores. Ragged
blocks: TMA fills out-of-bounds reads with zeros and drops out-of-bounds writes, and columns past
``V`` are masked to -inf. The sizes are reasoned, not tuned.

Checked off a GPU (``tests/test_mosaic_gpu_probe.py``): jax 0.10.2 and 0.11.2 both lower the two
kernels for an H100 from a CPU host, which runs Mosaic GPU's own layout, tiling and
shared-memory checks; jax 0.11.2's Mosaic GPU interpreter (``InterpretGPUParams``, with race
detection) runs them against float64. The interpreter completes each TMA copy at once, so it
cannot catch a store buffer reused before its copy has read it; that discipline (two buffers,
and ``wait_smem_to_gmem(1, wait_read_only=True)`` before writing one) is reasoned, not tested.

What porting the library's kernel would take, learnt here: a row vector must be
one-dimensional in the layout ``WGMMA.reduce(1)`` and broadcast with ``lax.broadcast_in_dim``
(a ``[64, 1]`` array has no register layout), so `kernels._tile`, written for ``[rows, 1]``
columns, does not carry over as it is; a ragged ``V`` needs either an untiled block, whose
register load has bank conflicts (``optimized=False``), or a separate tail; and ``plgpu.load``
takes the index as a separate argument before jax 0.11 only.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_N = 64
BLOCK_BYTES = 16 * 1024  # one [64, block_v] block: 64 columns of 32-bit, 128 of 16-bit
STAGES = 4  # loads in flight; with 2 store buffers, 96 KiB: two CTAs fit in an H100's 227 KiB
MIN_PROGRAMS = 264  # two per SM of an H100 (132): the vocabulary is split until there are as many
_ROW = plgpu.Layout.WGMMA.reduce(1)
# jax < 0.11: load(ref, idx, ...) with idx required; 0.11 deprecates passing idx at all.
_LOAD_NEEDS_IDX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
    return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_IDX else plgpu.load(ref, layout=layout)


def _block_v(dtype) -> int:
    return BLOCK_BYTES // (BLOCK_N * np.dtype(dtype).itemsize)


def _tile_width(dtype) -> int:
    """Elements in one 128-byte swizzled row of ``dtype``: the tile width of the logits blocks."""
    return 128 // np.dtype(dtype).itemsize


def _check(logits, labels) -> None:
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise NotImplementedError(
            f"the probe takes logits [N, V] and labels [N], got {logits.shape} and {labels.shape}"
        )
    tile = (8, _tile_width(logits.dtype))
    if logits.shape[0] % tile[0] or logits.shape[1] % tile[1]:
        raise NotImplementedError(
            f"the probe needs N and V multiples of {tile} for {np.dtype(logits.dtype).name} "
            f"logits (a tiled TMA copy), got [N, V] = {list(logits.shape)}"
        )


class _Grid:
    """Programs ``(strip, split)``: 64 rows each, and a contiguous run of ``per_split``
    vocabulary blocks each, so that a short, wide problem still fills the GPU. The last split
    may run past ``V`` by whole blocks: TMA reads them as zeros, the columns are masked, and
    their stores are dropped."""

    def __init__(self, n: int, v: int, dtype):
        self.v, self.bv = v, _block_v(dtype)
        self.strips = pl.cdiv(n, BLOCK_N)
        blocks = pl.cdiv(v, self.bv)
        splits = min(blocks, pl.cdiv(MIN_PROGRAMS, self.strips))
        self.per_split = pl.cdiv(blocks, splits)
        self.splits = pl.cdiv(blocks, self.per_split)

    def block(self, split, j):
        """The vocabulary block index of step ``j`` of ``split``."""
        return split * self.per_split + j

    def columns(self, block):
        """``(column ids, in bounds)`` of vocabulary ``block``, in the WGMMA layout."""
        shape = (BLOCK_N, self.bv)
        ids = block * self.bv + plgpu.broadcasted_iota(
            jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA
        )
        return ids, ids < self.v

    def per_row(self, x):
        return jax.lax.broadcast_in_dim(x, (BLOCK_N, self.bv), [0])

    def logits(self, z_smem, block):
        """The float32 logits of ``block``, -inf past ``V``, with their column ids."""
        ids, ok = self.columns(block)
        z = _load(z_smem, plgpu.Layout.WGMMA).astype(jnp.float32)
        return jnp.where(ok, z, -jnp.inf), ids

    def pipeline(self, step, dtype, strip, split, **kwargs):
        transforms = _transforms(dtype)
        spec = plgpu.BlockSpec(
            (BLOCK_N, self.bv), lambda j: (strip, self.block(split, j)), transforms=transforms
        )
        return plgpu.emit_pipeline(
            step, grid=(self.per_split,), in_specs=[spec], max_concurrent_steps=STAGES, **kwargs
        )

    def kernel(self, body, out_type, scratch, interpret):
        kwargs = {"interpret": plgpu.InterpretGPUParams(detect_races=True)} if interpret else {}
        return plgpu.kernel(
            body,
            out_type=out_type,
            scratch_types=scratch,
            grid=(self.strips, self.splits),
            grid_names=("strip", "split"),
            compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
            **kwargs,
        )


def _transforms(dtype):
    """Shared-memory blocks in 8-row tiles of one swizzled 128-byte row each."""
    return (
        plgpu.TilingTransform((8, _tile_width(dtype))),
        plgpu.SwizzleTransform(128),
    )


def _row_full(value):
    return plgpu.layout_cast(jnp.full((BLOCK_N,), value, jnp.float32), _ROW)


def _rows(i):
    return pl.ds(i * BLOCK_N, BLOCK_N)


def _read_rows(gmem_refs, smem_refs, barrier, i):
    """Each ``[N]`` operand's 64 values of row strip ``i``, in the row layout."""
    for gmem, smem in zip(gmem_refs, smem_refs, strict=True):
        plgpu.copy_gmem_to_smem(gmem.at[_rows(i)], smem, barrier)
    plgpu.barrier_wait(barrier)
    return [_load(smem, _ROW) for smem in smem_refs]


def forward(logits, labels, *, interpret: bool = False):
    """``(loss, lse)``, each float32 ``[N]``: each program's running max, sum-exp and target
    logit over its split, merged across splits here."""
    _check(logits, labels)
    n, v = logits.shape
    grid = _Grid(n, v, logits.dtype)
    f32 = jnp.float32

    def body(z_gmem, y_gmem, m_gmem, s_gmem, t_gmem, y_smem, m_smem, s_smem, t_smem, barrier):
        i, k = jax.lax.axis_index("strip"), jax.lax.axis_index("split")
        (y,) = _read_rows([y_gmem], [y_smem], barrier, i)

        def step(indices, z_smem, carry):
            m, s, t = carry
            z, ids = grid.logits(z_smem, grid.block(k, indices[0]))
            m_new = jnp.maximum(m, z.max(axis=1))
            s = s * jnp.exp(m - m_new) + jnp.exp(z - grid.per_row(m_new)).sum(axis=1)
            t = t + jnp.where(ids == grid.per_row(y), z, 0.0).sum(axis=1)
            return m_new, s, t

        init = (_row_full(-jnp.inf), _row_full(0.0), _row_full(0.0))
        partials = grid.pipeline(step, logits.dtype, i, k, init_carry=init)(z_gmem)
        smem_refs, gmem_refs = (m_smem, s_smem, t_smem), (m_gmem, s_gmem, t_gmem)
        for x, smem in zip(partials, smem_refs, strict=True):
            smem[...] = x
        plgpu.commit_smem()
        for smem, gmem in zip(smem_refs, gmem_refs, strict=True):
            plgpu.copy_smem_to_gmem(smem, gmem.at[k, _rows(i)])
        plgpu.wait_smem_to_gmem(0)

    part = jax.ShapeDtypeStruct((grid.splits, n), f32)
    scratch = [plgpu.SMEM((BLOCK_N,), jnp.int32)]
    scratch += [plgpu.SMEM((BLOCK_N,), f32)] * 3
    scratch += [plgpu.Barrier(num_arrivals=1)]
    m, s, t = grid.kernel(body, (part, part, part), scratch, interpret)(logits, labels)
    top = jnp.max(m, axis=0)
    lse = top + jnp.log(jnp.sum(s * jnp.exp(m - top), axis=0))
    return lse - jnp.sum(t, axis=0), lse


def backward(logits, labels, lse, ct, *, interpret: bool = False):
    """``ct (softmax(logits) - onehot(labels))`` in the logits' dtype; ``lse`` and ``ct`` are
    float32 ``[N]``."""
    _check(logits, labels)
    n, v = logits.shape
    grid = _Grid(n, v, logits.dtype)

    def body(z_gmem, y_gmem, lse_gmem, ct_gmem, g_gmem, y_smem, lse_smem, ct_smem, g_smem, barrier):
        i, k = jax.lax.axis_index("strip"), jax.lax.axis_index("split")
        y, row_lse, row_ct = _read_rows(
            [y_gmem, lse_gmem, ct_gmem], [y_smem, lse_smem, ct_smem], barrier, i
        )

        def step(indices, z_smem):
            (j,) = indices
            block = grid.block(k, j)
            z, ids = grid.logits(z_smem, block)
            p = jnp.exp(z - grid.per_row(row_lse))
            g = grid.per_row(row_ct) * (p - jnp.where(ids == grid.per_row(y), 1.0, 0.0))
            # Two store buffers: the one written now was last sent two blocks ago.
            out = g_smem.at[j % 2]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out[...] = g.astype(out.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, g_gmem.at[_rows(i), pl.ds(block * grid.bv, grid.bv)])

        grid.pipeline(step, logits.dtype, i, k)(z_gmem)
        plgpu.wait_smem_to_gmem(0)

    f32 = jnp.float32
    scratch = [plgpu.SMEM((BLOCK_N,), jnp.int32), plgpu.SMEM((BLOCK_N,), f32)]
    scratch += [plgpu.SMEM((BLOCK_N,), f32)]
    scratch += [
        plgpu.SMEM((2, BLOCK_N, grid.bv), logits.dtype, transforms=_transforms(logits.dtype))
    ]
    scratch += [plgpu.Barrier(num_arrivals=3)]
    out = jax.ShapeDtypeStruct(logits.shape, logits.dtype)
    return grid.kernel(body, out, scratch, interpret)(logits, labels, lse, ct)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _loss(logits, labels, interpret):
    return forward(logits, labels, interpret=interpret)[0]


def _loss_fwd(logits, labels, interpret):
    loss, lse = forward(logits, labels, interpret=interpret)
    return loss, (logits, labels, lse)


def _loss_bwd(interpret, residuals, ct):
    logits, labels, lse = residuals
    d_logits = backward(logits, labels, lse, ct.astype(jnp.float32), interpret=interpret)
    return d_logits, None


_loss.defvjp(_loss_fwd, _loss_bwd)


def per_example(logits, labels, *, interpret: bool = False):
    """Per-example float32 losses of ``[N, V]`` logits and int32 labels ``[N]``, differentiable
    with respect to the logits."""
    return _loss(logits, labels.astype(jnp.int32), interpret)
