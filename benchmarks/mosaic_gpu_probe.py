"""A Mosaic GPU probe: the plain integer-label loss on Pallas' Mosaic GPU backend, so that a GPU
session measures the choice of Triton for `jax_softmax_ce.kernels.cross_entropy_gpu` instead of
taking it on trust.

It is a benchmark candidate ("probe:mosaic_gpu" in the ce suite), not part of the library: no
options, finite logits, labels in ``[0, V)``, and ``V`` a multiple of one 128-byte row of the
logits' dtype (64 for 16-bit, 32 for 32-bit; every vocabulary of the benchmark grid is). Anything
else raises `NotImplementedError`, which the harness records as skipped.

Schedule (one kernel each way, ``plgpu.kernel``, lane semantics): one warpgroup per strip of
``BLOCK_N = 64`` rows, the height of the WGMMA register layout that the row reductions use.
It streams the strip's vocabulary through a TMA pipeline of `STAGES` ``[64, block_v]`` blocks
in shared memory, tiled and swizzled so that the register loads are free of bank conflicts
(which is what ties ``V`` to the 128-byte row: TMA copies a tiled block only from an array whose
tiled dimension is a multiple of the tile). The forward carries the running max, sum-exp and
target logit per row in float32 registers and writes the loss and lse; the backward recomputes
``p = exp(z - lse)`` and writes ``ct (p - onehot)`` in the logits' dtype through the pipeline's
TMA stores. Ragged last row and vocabulary blocks: TMA fills out-of-bounds reads with zeros and
drops out-of-bounds writes, and columns past ``V`` are masked to -inf.

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
BLOCK_BYTES = 32 * 1024  # one [64, block_v] block: 128 columns of 32-bit, 256 of 16-bit
STAGES = 4  # 4 loads in flight and 2 store buffers: 192 KiB of the H100's 227 KiB
_ROW = plgpu.Layout.WGMMA.reduce(1)
# jax < 0.11: load(ref, idx, ...) with idx required; 0.11 deprecates passing idx at all.
_LOAD_NEEDS_IDX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
    return plgpu.load(ref, (), layout=layout) if _LOAD_NEEDS_IDX else plgpu.load(ref, layout=layout)


def _block_v(dtype) -> int:
    return BLOCK_BYTES // (BLOCK_N * np.dtype(dtype).itemsize)


def _row_bytes_elements(dtype) -> int:
    """Elements in one 128-byte swizzled row of ``dtype``: the tile width of the logits blocks."""
    return 128 // np.dtype(dtype).itemsize


def _check(logits, labels) -> None:
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise NotImplementedError(
            f"the probe takes logits [N, V] and labels [N], got {logits.shape} and {labels.shape}"
        )
    tile = (8, _row_bytes_elements(logits.dtype))
    if logits.shape[0] % tile[0] or logits.shape[1] % tile[1]:
        raise NotImplementedError(
            f"the probe needs N and V multiples of {tile} for {np.dtype(logits.dtype).name} "
            f"logits (a tiled TMA copy), got [N, V] = {list(logits.shape)}"
        )


def _transforms(dtype):
    """Shared-memory blocks in 8-row tiles of one swizzled 128-byte row each."""
    return (
        plgpu.TilingTransform((8, _row_bytes_elements(dtype))),
        plgpu.SwizzleTransform(128),
    )


def _logits_spec(dtype, index_map):
    return plgpu.BlockSpec((BLOCK_N, _block_v(dtype)), index_map, transforms=_transforms(dtype))


def _columns(j, bv, v):
    """``(column ids, in bounds)`` of vocabulary block ``j``, in the WGMMA layout."""
    ids = j * bv + plgpu.broadcasted_iota(jnp.int32, (BLOCK_N, bv), 1, layout=plgpu.Layout.WGMMA)
    return ids, ids < v


def _per_row(x, bv):
    return jax.lax.broadcast_in_dim(x, (BLOCK_N, bv), [0])


def _row_full(value):
    return plgpu.layout_cast(jnp.full((BLOCK_N,), value, jnp.float32), _ROW)


def _read_rows(gmem_refs, smem_refs, barrier, i):
    """Each ``[N]`` operand's 64 values of row strip ``i``, in the row layout."""
    for gmem, smem in zip(gmem_refs, smem_refs, strict=True):
        plgpu.copy_gmem_to_smem(gmem.at[pl.ds(i * BLOCK_N, BLOCK_N)], smem, barrier)
    plgpu.barrier_wait(barrier)
    return [_load(smem, _ROW) for smem in smem_refs]


def _kernel(body, out_type, scratch, n, interpret):
    kwargs = {"interpret": plgpu.InterpretGPUParams(detect_races=True)} if interpret else {}
    return plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(pl.cdiv(n, BLOCK_N),),
        grid_names=("strips",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **kwargs,
    )


def forward(logits, labels, *, interpret: bool = False):
    """``(loss, lse)``, each float32 ``[N]``."""
    _check(logits, labels)
    n, v = logits.shape
    bv = _block_v(logits.dtype)
    f32 = jnp.float32

    def body(z_gmem, y_gmem, loss_gmem, lse_gmem, y_smem, loss_smem, lse_smem, barrier):
        i = jax.lax.axis_index("strips")
        (y,) = _read_rows([y_gmem], [y_smem], barrier, i)

        def step(indices, z_smem, carry):
            (j,) = indices
            m, s, t = carry
            ids, ok = _columns(j, bv, v)
            z = jnp.where(ok, _load(z_smem, plgpu.Layout.WGMMA).astype(f32), -jnp.inf)
            m_new = jnp.maximum(m, z.max(axis=1))
            s = s * jnp.exp(m - m_new) + jnp.exp(z - _per_row(m_new, bv)).sum(axis=1)
            t = t + jnp.where(ids == _per_row(y, bv), z, 0.0).sum(axis=1)
            return m_new, s, t

        m, s, t = plgpu.emit_pipeline(
            step,
            grid=(pl.cdiv(v, bv),),
            in_specs=[_logits_spec(logits.dtype, lambda j: (i, j))],
            max_concurrent_steps=STAGES,
            init_carry=(_row_full(-jnp.inf), _row_full(0.0), _row_full(0.0)),
        )(z_gmem)
        lse = m + jnp.log(s)
        loss_smem[...] = lse - t
        lse_smem[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(loss_smem, loss_gmem.at[pl.ds(i * BLOCK_N, BLOCK_N)])
        plgpu.copy_smem_to_gmem(lse_smem, lse_gmem.at[pl.ds(i * BLOCK_N, BLOCK_N)])
        plgpu.wait_smem_to_gmem(0)

    rows = jax.ShapeDtypeStruct((n,), f32)
    scratch = [
        plgpu.SMEM((BLOCK_N,), jnp.int32),
        plgpu.SMEM((BLOCK_N,), f32),
        plgpu.SMEM((BLOCK_N,), f32),
        plgpu.Barrier(num_arrivals=1),
    ]
    return _kernel(body, (rows, rows), scratch, n, interpret)(logits, labels)


def backward(logits, labels, lse, ct, *, interpret: bool = False):
    """``ct (softmax(logits) - onehot(labels))`` in the logits' dtype; ``lse`` and ``ct`` are
    float32 ``[N]``."""
    _check(logits, labels)
    n, v = logits.shape
    bv = _block_v(logits.dtype)
    f32 = jnp.float32

    def body(z_gmem, y_gmem, lse_gmem, ct_gmem, g_gmem, y_smem, lse_smem, ct_smem, g_smem, barrier):
        i = jax.lax.axis_index("strips")
        y, row_lse, row_ct = _read_rows(
            [y_gmem, lse_gmem, ct_gmem], [y_smem, lse_smem, ct_smem], barrier, i
        )

        def step(indices, z_smem):
            (j,) = indices
            ids, ok = _columns(j, bv, v)
            z = jnp.where(ok, _load(z_smem, plgpu.Layout.WGMMA).astype(f32), -jnp.inf)
            p = jnp.exp(z - _per_row(row_lse, bv))
            g = _per_row(row_ct, bv) * (p - jnp.where(ids == _per_row(y, bv), 1.0, 0.0))
            # Two store buffers: the one written now was last sent two blocks ago.
            out = g_smem.at[j % 2]
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out[...] = g.astype(out.dtype)
            plgpu.commit_smem()
            block = g_gmem.at[pl.ds(i * BLOCK_N, BLOCK_N), pl.ds(j * bv, bv)]
            plgpu.copy_smem_to_gmem(out, block)

        plgpu.emit_pipeline(
            step,
            grid=(pl.cdiv(v, bv),),
            in_specs=[_logits_spec(logits.dtype, lambda j: (i, j))],
            max_concurrent_steps=STAGES,
        )(z_gmem)
        plgpu.wait_smem_to_gmem(0)

    scratch = [
        plgpu.SMEM((BLOCK_N,), jnp.int32),
        plgpu.SMEM((BLOCK_N,), f32),
        plgpu.SMEM((BLOCK_N,), f32),
        plgpu.SMEM((2, BLOCK_N, bv), logits.dtype, transforms=_transforms(logits.dtype)),
        plgpu.Barrier(num_arrivals=3),
    ]
    out = jax.ShapeDtypeStruct(logits.shape, logits.dtype)
    return _kernel(body, out, scratch, n, interpret)(logits, labels, lse, ct)


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
