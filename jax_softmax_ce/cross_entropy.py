"""Public softmax cross-entropy losses: validate the caller's arguments, then one pipeline."""

from __future__ import annotations

import jax

from jax_softmax_ce import _pipeline
from jax_softmax_ce._options import Implementation
from jax_softmax_ce.monitoring import CrossEntropyAux


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | jax.typing.ArrayLike = 1.0,
    reduction: str = "none",
    implementation: str | Implementation | None = None,
    return_aux: bool = False,
    vocab_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Softmax cross-entropy between logits and probability labels; a drop-in for optax's.

    With ``z' = softcap(z) / T`` over the valid classes, target ``q = (1 - e) y + e / V_valid``
    and class weights ``w``, each example's loss is

    .. math::
      \ell = \sum_k w_k q_k \left(\operatorname{lse}(z') - z'_k\right)
        + \lambda_z \operatorname{lse}(z')^2 .

    The gradient with respect to the logits is formed in a ``custom_vjp`` from the saved
    log-sum-exp as ``(sum_k w_k q_k + 2 lambda_z lse) softmax(z') - w q`` (``softmax - labels``
    without options), so no probabilities are kept between the passes.

    Decisions where optax and the spec leave room:

    - Label mass on an invalid class (``where`` False there) is dropped, as optax's
      ``sum(where=...)`` drops it; the gradient with respect to those labels is 0.
    - A finite, valid label mass on a class whose logit is -inf gives a loss of +inf.
    - ``"mean"`` divides by the number of counted examples (by the sum of their ``weights``);
      fully masked examples do not count.
    - ``weights`` follow PyTorch's ``reduction="none"`` losses times the weights, and its
      weighted mean; see `softmax_cross_entropy_with_integer_labels` for the details.
    - The softcap ``c tanh(z / c)`` applies to finite logits; a -inf logit stays -inf (a class
      of probability 0) and a +inf logit stays +inf (a non-finite loss), as without a softcap.
    - The label gradient at a -inf logit is +inf; ``implementation="reference"`` (plain autodiff)
      gives 0 there for a class without label mass.
    - An empty class axis (``num_classes == 0``, e.g. logits indexed by an all-False mask) gives
      loss 0 per example, as optax's empty sum does: no example has a valid class.

    Args:
      logits: Unnormalised log-probabilities, shape ``[batch_size, num_classes]`` or any shape
        with the class axis (or axes) named by ``axis``. float16, bfloat16, float32 or float64.
      labels: Probabilities over the classes, broadcastable to ``logits.shape``.
      axis: The class axis, or a tuple of axes that are flattened (in the given order) into one.
      where: Boolean mask of the valid classes, broadcast against ``logits``; a mask with the
        rank of the batch shape masks whole examples, as in optax (to mask classes, give a mask
        the logits' rank: ``[1, num_classes]``), and a scalar applies to every class.
      label_smoothing: ``e`` in ``[0, 1)``; the smoothing mass is spread over valid classes only.
      class_weights: ``[num_classes]`` weights ``w_k`` of each class's term (zero gradient).
      weights: Per-example weights ``u``, broadcastable to the batch shape (``logits.shape``
        without ``axis``), or None: example ``i``'s loss is ``u_i l_i``, and ``"mean"`` is
        ``sum_i u_i l_i / sum_i u_i`` over counted examples. Differentiable; a weight of 0
        gives loss 0 and gradient 0, even for NaN logits.
      z_loss: Coefficient ``lambda_z >= 0`` of the ``lse**2`` penalty (PaLM's z-loss).
      logit_softcap: ``c > 0`` caps the logits to ``c * tanh(z / c)`` first (Gemma 2).
      temperature: ``T > 0``, a Python float or a differentiable scalar array; an array that
        is not positive gives NaN losses (a value cannot raise under ``jit``).
      reduction: ``"none"`` (per-example losses), ``"sum"`` or ``"mean"``.
      implementation: None (the automatic choice), ``"xla"``, ``"pallas"``, ``"reference"``, or
        a `jax_softmax_ce.Pallas` or `jax_softmax_ce.Xla` configuration; what each is, and the
        transformations each supports, as for `softmax_cross_entropy_with_integer_labels`.
      return_aux: Also return per-example statistics of ``softmax(z')`` from the same pass
        (`jax_softmax_ce.CrossEntropyAux`), as for
        `softmax_cross_entropy_with_integer_labels`; with probability labels its
        ``target_logprob`` is None (there is no single target class).
      vocab_axis_name: Inside ``shard_map``, the mesh axis (or tuple of axes) over which
        the class axis is split, as in Megatron-LM's vocabulary-parallel cross-entropy: the
        local ``logits`` (and ``where``, ``class_weights``, probability ``labels``) are this
        device's slice of ``V_local`` classes, starting at class ``axis_index * V_local``;
        integer labels are global class ids. Each shard reduces its classes to a few floats
        per example, which are gathered and merged over the axis, so the losses (the same on
        every shard of the axis) and the shard's gradient are those of the whole logits;
        nothing of size ``[batch_size, num_classes]`` crosses devices. ``return_aux``'s
        statistics are merged alike (the argmax a global class id, the lowest among ties
        across shards). None (the default): the classes are not split. ``"reference"``
        differentiates through ``psum`` and needs ``shard_map``'s ``check_vma`` (its default).

    Returns:
      The losses, shape ``logits.shape`` without ``axis`` for ``reduction="none"``, else a
      scalar; float32 for 16-bit logits, the logits' dtype otherwise. With ``return_aux=True``,
      ``(losses, aux)``.

    Raises:
      TypeError: integer logits, or complex ``weights``.
      ValueError: shapes that do not broadcast (``labels``, ``where`` or ``weights``),
        ``class_weights`` not ``[num_classes]``, or an option out of its range.
      NotImplementedError: an explicit ``implementation`` that cannot take this case (for
        ``"pallas"``, raised when lowering for a platform whose kernel cannot).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(sce.softmax_cross_entropy(logits, labels))
      ...     print(sce.softmax_cross_entropy(logits, labels, label_smoothing=0.1))
      [0.2761 2.9518]
      [0.3995 2.8051]

    References:
      Szegedy et al., `Rethinking the Inception Architecture
      <https://arxiv.org/abs/1512.00567>`_ (label smoothing), 2016.
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_ (z-loss), 2022.
    """
    return _pipeline.run(**_pipeline.prepare(integer=False, **locals()))


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float | jax.typing.ArrayLike = 1.0,
    reduction: str = "none",
    implementation: str | Implementation | None = None,
    return_aux: bool = False,
    vocab_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Softmax cross-entropy with integer labels; a drop-in for optax's.

    With ``z' = softcap(z) / T`` over the valid classes, label ``t``, smoothing ``e`` and class
    weights ``w``, each example's loss is

    .. math::
      \ell = (1 - e)\, w_t \left(\operatorname{lse}(z') - z'_t\right)
        + \frac{e}{V_\text{valid}} \sum_{k \text{ valid}}
          w_k \left(\operatorname{lse}(z') - z'_k\right)
        + \lambda_z \operatorname{lse}(z')^2 ,

    formed as ``log(sum exp(z' - m)) - (z'_t - m)`` so that it keeps float32 relative accuracy for
    logits of any magnitude. The gradient is ``softmax(z') - onehot(t)`` without options, formed
    in a ``custom_vjp`` from the saved log-sum-exp.

    Examples that do not count (loss 0, gradient 0): a label equal to ``ignore_index``, and an
    example with no valid class. ``"mean"`` is PyTorch's weighted mean ``sum l_i / sum w_{t_i}``
    over counted examples, and 0 when nothing counts. A label outside ``[0, num_classes)`` that
    is not ``ignore_index`` gives a NaN loss (as in optax), since a value cannot raise under
    ``jit``. A label on a class masked out by ``where`` gives +inf: an invalid class is a class
    with logit -inf. The softcap applies to finite logits: a -inf logit stays a class of
    probability 0 and a +inf logit still makes the loss non-finite. An empty class axis gives
    loss 0 per example: no example has a valid class.

    Per-example ``weights`` ``u`` multiply each example's loss, as PyTorch's
    ``reduction="none"`` losses times ``u``: ``"none"`` returns ``u_i l_i``, ``"sum"`` their
    sum and ``"mean"`` ``sum_i u_i l_i / sum_i u_i w_{t_i}`` over counted examples (``w_{t_i}``
    is 1 without class weights), 0 when that denominator is 0. They are plain multipliers:
    negative weights are taken as they are, a NaN weight of a counted example gives a NaN loss
    (the weight of an example that does not count is never read), and booleans and integers
    are cast to the losses' float dtype. An example of weight 0 contributes nothing: its loss
    and its logits' gradient are 0, even where its logits are NaN. The weights are
    differentiable: ``d/du_i`` of ``"sum"`` is the unweighted ``l_i`` (also at ``u_i = 0``
    where ``l_i`` is finite; 0 where it is not), and ``"mean"``'s follows the quotient rule.

    Args:
      logits: Unnormalised log-probabilities, shape ``[batch_size, num_classes]`` or any shape
        with the class axis (or axes) named by ``axis``. float16, bfloat16, float32 or float64.
      labels: Integer class ids, shape ``logits.shape`` without ``axis`` (or broadcastable to
        it). With a tuple ``axis``, a label is a flat index into the classes in that axis order.
      axis: The class axis, or a tuple of axes that are flattened into one.
      where: Boolean mask of the valid classes, broadcast against ``logits``; a mask with the
        rank of the batch shape masks whole examples, as in optax (to mask classes, give a mask
        the logits' rank: ``[1, num_classes]``), and a scalar applies to every class.
      ignore_index: A label value whose examples do not count (PyTorch uses -100).
      label_smoothing: ``e`` in ``[0, 1)``; the smoothing mass is spread over valid classes only.
      class_weights: ``[num_classes]`` weights ``w_k`` (zero gradient).
      weights: Per-example weights ``u``, broadcastable to the batch shape (``logits.shape``
        without ``axis``), or None for 1 each; any real dtype.
      z_loss: Coefficient ``lambda_z >= 0`` of the ``lse**2`` penalty.
      logit_softcap: ``c > 0`` caps the logits to ``c * tanh(z / c)`` first.
      temperature: ``T > 0``, a Python float or a differentiable scalar array; an array that
        is not positive gives NaN losses (a value cannot raise under ``jit``).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      implementation: None (the automatic choice: ``"xla"`` on every platform until a kernel
        has been measured faster there), ``"xla"``, ``"pallas"``, ``"reference"``, or a
        configuration value: `jax_softmax_ce.Pallas` (block sizes, schedule, interpret mode)
        or `jax_softmax_ce.Xla`. ``"pallas"``'s kernel is chosen when the computation is
        lowered, for the platform lowered for (Mosaic on a TPU, Triton on a GPU, Pallas'
        interpreter on a CPU); it runs per shard inside ``shard_map``, and under ``jit`` a
        partitioning rule runs it on each device's rows and classes of sharded logits (see
        ``vocab_axis_name`` for how the classes' shards are combined), on GPUs and CPUs: libtpu
        implements no custom partitioner, so ``"pallas"`` under ``jit`` over more than one TPU
        chip does not compile (use it inside ``shard_map`` there). Transformations: every
        implementation supports reverse mode of any order (``grad``, ``grad`` of ``grad``,
        ``jax.jacrev``); ``"xla"`` also ``jax.hessian``
        (forward mode over its plain-JAX reverse rule); only ``"reference"`` (plain autodiff)
        supports forward mode of the loss itself (``jax.jvp``, ``jax.linearize``,
        ``jax.jacfwd``), and ``jax.hessian`` with ``"pallas"``.
      return_aux: Also return a `jax_softmax_ce.CrossEntropyAux` of per-example statistics of
        ``p = softmax(z')``, computed in the same pass over the logits as the loss by every
        implementation (see below). Also with the classes sharded (``vocab_axis_name``, or
        class-sharded logits under ``jit``): each shard's statistics are combined with the
        others' like the loss's, and the values and gradients are those of the whole logits.
      vocab_axis_name: Inside ``shard_map``, the mesh axis (or tuple of axes) over which the
        class axis is split (Megatron-LM's vocabulary-parallel cross-entropy), as for
        `softmax_cross_entropy`: the local ``logits`` are this device's slice of the classes,
        and the labels are global class ids (``ignore_index`` as usual).

    Returns:
      The losses, shape ``logits.shape`` without ``axis`` for ``reduction="none"``, else a
      scalar; float32 for 16-bit logits, the logits' dtype otherwise. With ``return_aux=True``,
      ``(losses, aux)``: ``aux`` holds arrays of the batch shape (``logits.shape`` without
      ``axis``) whatever the ``reduction``, its float fields in the accumulation dtype
      (float32, float64 for float64 logits):

      - ``lse``: ``logsumexp(z')`` over the valid classes;
      - ``argmax``: int32, the class of the largest ``z'``, the lowest index among ties; with a
        tuple ``axis``, the flat index in that axis order, as the labels are;
      - ``max_prob``: ``p`` at ``argmax``, ``exp(z'_argmax - lse)``;
      - ``entropy``: ``-sum_k p_k log p_k``, formed as ``log s - t / s`` from the running sums
        ``s = sum exp(z' - m)`` and ``t = sum exp(z' - m) (z' - m)``;
      - ``target_logprob``: ``z'_t - lse`` (NaN for a label outside ``[0, num_classes)``, as
        the loss; -inf for a label on a masked class).

      Ignored and fully masked examples get ``argmax = -1`` and 0 in every float field. An
      example whose valid logits are all -inf gets ``lse = -inf``, ``argmax = -1``,
      ``max_prob = entropy = 0`` and ``target_logprob = -inf``. The per-example ``weights`` do
      not scale the aux values, and a NaN logit makes them NaN (and ``argmax`` -1). Every
      float field is differentiable, with its exact gradient formed in the loss's one backward
      pass: with respect to ``z'``, ``d lse = p``, ``d max_prob = p_a (onehot_a - p)``,
      ``d entropy = p (E_p[z'] - z')`` and ``d target_logprob = onehot_t - p``, then the chain
      rule through the softcap and the temperature (an array temperature included). The
      argmax has no gradient. Without ``return_aux`` nothing of this is computed; with it,
      aux values that are only logged, not differentiated, add nothing to the backward pass
      of the ``"xla"`` implementation (their cotangents are JAX's symbolic zeros; a
      ``0.0 * aux.entropy`` term in the loss is not one). At most ``2**24`` classes (the
      kernels carry the running argmax as a float32 class id).

    Raises:
      TypeError: integer logits, labels that are not integers, or complex ``weights``.
      ValueError: shapes that do not broadcast (``labels``, ``where`` or ``weights``),
        ``class_weights`` not ``[num_classes]``, or an option out of its range.
      NotImplementedError: an explicit ``implementation`` that cannot take this case (for
        ``"pallas"``, raised when lowering for a platform whose kernel cannot).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jax_softmax_ce as sce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([0, 1])
      >>> with jnp.printoptions(precision=4):
      ...     print(sce.softmax_cross_entropy_with_integer_labels(logits, labels))
      [0.2761 2.9518]
      >>> mean = sce.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean")
      >>> print(round(float(mean), 4))
      0.2761
      >>> weighted = sce.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, weights=jnp.array([2.0, 0.0]), reduction="mean")
      >>> print(round(float(weighted), 4))
      0.2761
      >>> loss, aux = sce.softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, reduction="mean", return_aux=True)
      >>> with jnp.printoptions(precision=4):
      ...     print(aux.argmax, aux.entropy)
      [0 2] [0.7171 0.8573]

    References:
      PyTorch, `CrossEntropyLoss
      <https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html>`_.
    """
    return _pipeline.run(**_pipeline.prepare(integer=True, **locals()))
