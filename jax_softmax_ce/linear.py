"""The fused linear softmax cross-entropy: the loss of ``inputs @ weight (+ bias)`` without the
logits. This module validates the caller's operands; the loss runs through the same pipeline as the
logits losses (`_pipeline`), on a `_canonical.Linear` problem whose logits each implementation
forms blockwise (`_xla_linear`, the `kernels.linear_tpu` and `kernels.linear_gpu` kernels) or,
for ``"reference"``, materialises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_softmax_ce import _canonical, _pipeline
from jax_softmax_ce._canonical import Linear
from jax_softmax_ce._options import Implementation
from jax_softmax_ce.monitoring import CrossEntropyAux

WEIGHT_LAYOUTS = ("dv", "vd")


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
    return inputs, weight, bias, labels


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
    weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | jax.typing.ArrayLike = 1.0,
    reduction: str = "none",
    implementation: str | Implementation | None = None,
    weight_layout: str = "dv",
    gradient_filter_eps: float | None = None,
    return_aux: bool = False,
    vocab_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
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

    - The matmuls follow JAX's matmul precision, as ``inputs @ weight`` does, in every
      implementation and in the Pallas kernels too: by default a GPU multiplies float32
      operands in TF32 (10-bit mantissas, 5e-4 relative per operand; Triton's ``tl.dot`` and
      XLA alike) and a TPU in bfloat16 passes. ``with jax.default_matmul_precision("float32"):``
      asks for full float32 products (PyTorch's default), which the tests' float64 comparisons
      use. 16-bit operands are unaffected. Everything after the matmul is float32 whatever the
      setting.

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
    - ``"pallas"`` runs the fused kernels: Mosaic when lowered for a TPU, Triton for a GPU, and on
      a CPU, Pallas' interpreter, as for the logits losses; `jax_softmax_ce.Pallas` configures
      them (block sizes with a hidden chunk ``block_d``, schedule, interpret mode).
      ``implementation=None`` picks ``"xla"``. On GPU the backward pass adds each tile's
      contributions to ``d_inputs`` and ``d_weight`` with float32 atomic adds (as Cut
      Cross-Entropy does), so those gradients may differ in their last bits between runs; the
      other schedules are deterministic. Its float32 accumulators are bounded by
      ``Pallas(accumulator_bytes=...)`` (32 MiB): beyond it, the backward runs over chunks of
      rows for ``d_inputs``, then of columns for ``d_weight``, forming the logits twice. Its
      kernels have no derivative rules of their own: the rules are the XLA implementation's, so
      reverse over reverse (``grad`` of ``grad``) is exact, and under ``vmap`` the forward kernel
      folds the batch into rows while the backward runs once per batch element.
    - Sharded operands. Inside ``shard_map`` every implementation runs on its shard, and the
      gradient of an operand that does not vary over a mesh axis (a replicated ``weight`` in data
      parallelism) comes back summed over that axis, as JAX's autodiff gives. Under ``jit``,
      ``"pallas"``'s kernels have a partitioning rule: each device runs them on its rows and
      its slice of the projection, the shards combine a few floats per row, and the gradients
      come back sharded like the inputs and the projection. So do ``"xla"``'s: with a
      projection whose classes are sharded over explicit mesh axes, its loops run per device
      inside ``shard_map``, as with ``vocab_axis_name``; otherwise XLA partitions its loops,
      which split the rows and the classes into groups, one or more per device, so that
      nothing of the inputs' or the projection's size is gathered. The groups' count is the
      largest product of the automatic mesh axes' sizes up to 16 that divides ``N`` and
      ``block_n`` (``V`` and ``block_v``); a mesh axis over 16, or a ragged ``N`` or ``V``
      that its size does not divide, leaves that operand gathered, in part or whole (use
      ``"pallas"``, explicit axes or ``vocab_axis_name`` there). On one device nothing
      changes.

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
      weights: Per-example weights ``u``, broadcastable to ``inputs.shape[:-1]``, or None: as
        in `softmax_cross_entropy_with_integer_labels`, example ``i``'s loss is ``u_i l_i``,
        ``"mean"`` divides by ``sum_i u_i w_{t_i}`` over counted examples, and an example of
        weight 0 contributes nothing, even where its inputs are NaN. Differentiable.
      z_loss: Coefficient ``lambda_z >= 0`` of the ``lse**2`` penalty.
      logit_softcap: ``c > 0`` caps the logits to ``c * tanh(z / c)`` first.
      temperature: ``T > 0``, a Python float or a differentiable scalar array; an array that
        is not positive gives NaN losses (a value cannot raise under ``jit``).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (PyTorch's weighted mean).
      implementation: None (``"xla"``), ``"xla"``, ``"pallas"``, ``"reference"`` (materialised
        logits and plain autodiff), or a configuration value: `jax_softmax_ce.Xla` (the tiles of
        the blockwise loops, ``BlockSizes(block_n, block_v)``) or `jax_softmax_ce.Pallas`.
        Transformations: every implementation supports reverse mode of any order; ``"xla"`` also
        ``jax.hessian``; only ``"reference"`` supports forward mode of the loss itself
        (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``), and ``jax.hessian`` with
        ``"pallas"``.
      weight_layout: ``"dv"`` for a ``[D, V]`` weight, ``"vd"`` for a ``[V, D]`` (tied) one.
      gradient_filter_eps: None or 0 for exact gradients, else the filter threshold in
        ``(0, 1)``. With ``return_aux``, a tile is skipped only where the auxiliary values'
        gradient (times their cotangents) is below it too.
      return_aux: Also return a `jax_softmax_ce.CrossEntropyAux` of per-example statistics of
        ``softmax(z')`` (``lse``, ``argmax``, ``max_prob``, ``entropy``, ``target_logprob``),
        from the same pass over the tiles, with what
        `softmax_cross_entropy_with_integer_labels` says of them; their gradients reach
        ``inputs``, ``weight``, ``bias`` and an array temperature, in the same backward pass.
        Also with the classes sharded (``vocab_axis_name``, or a class-sharded projection under
        ``jit``), the shards' statistics combined like the loss's (the argmax a global class
        id, the lowest among ties across shards).
      vocab_axis_name: Inside ``shard_map``, the mesh axis (or tuple of axes) over which the
        projection's classes are split: ``weight`` (``bias``, ``class_weights``, a class
        ``where``) is this device's slice of ``V_local`` classes, starting at class
        ``axis_index * V_local``, and labels are global class ids. The shards merge a few
        floats per example over the axis and sum the inputs' gradient over it; the weight's
        gradient is the shard's own. None: the classes are not split.

    Returns:
      The losses, shape ``inputs.shape[:-1]`` for ``reduction="none"``, else a scalar; float32
      for 16-bit inputs, the inputs' dtype otherwise. With ``return_aux=True``,
      ``(losses, aux)``, each of ``aux``'s fields of shape ``inputs.shape[:-1]`` whatever the
      ``reduction``.

    Raises:
      TypeError: non-floating inputs or weight, different dtypes, non-integer labels, or
        complex ``weights``.
      ValueError: shapes that do not match (``weights`` that do not broadcast to
        ``inputs.shape[:-1]``), or an option out of its range.
      NotImplementedError: an explicit ``implementation`` that cannot take this case (for
        ``"pallas"``, raised when lowering for a platform whose kernel cannot).

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
    inputs, weight, bias, labels = _check_operands(inputs, weight, bias, labels, weight_layout)
    statics = _pipeline.prepare(
        Linear(inputs, weight, bias, vd=weight_layout == "vd"),
        labels,
        -1,
        where,
        class_weights,
        temperature,
        weights=weights,
        integer=True,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        gradient_filter_eps=gradient_filter_eps,
        return_aux=return_aux,
        vocab_axis_name=vocab_axis_name,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
        implementation=implementation,
    )
    return _pipeline.run(**statics)
