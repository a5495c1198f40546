"""The ``"xla"`` implementation keeps no logits-sized temporary on the CPU, option by option.

``jit(value_and_grad)`` of the mean loss over ``[256, 4096]`` logits is compiled for the CPU and
its temporary memory read from XLA's memory analysis: at most 1/64 of one float32 copy of the
logits (64 KiB here; O(N) statistics take about 6 KiB). XLA on the CPU fuses a reduction with
its elementwise math only where that math has no comparison or select and shares no
``[N, V]`` value with another fusion; anything else it materialises, a float32 ``[N, V]``
buffer each time. With float32 logits such a buffer can hide in the gradient's output buffer,
with 16-bit logits it cannot, so both dtypes are checked.

Options are passed as the arguments of the compiled function where a user would pass arrays
(the labels, an array temperature, a mask), so that XLA cannot fold them into constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_softmax_ce as sce

# What is measured is XLA's CPU compiler; an accelerator's fuses otherwise.
pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the temporaries of XLA's CPU compiler"
)

N, V = 256, 4096
LIMIT = N * V * 4 / 64

# name: (keyword options, array options passed as arguments of the compiled function)
OPTIONS = {
    "plain": ({}, {}),
    "z_loss": ({"z_loss": 1e-4}, {}),
    "class_weights": ({}, {"class_weights": np.linspace(0.5, 2.0, V, dtype=np.float32)}),
    "weights": ({}, {"weights": np.linspace(0.0, 1.0, N, dtype=np.float32)}),
    "label_smoothing": ({"label_smoothing": 0.1}, {}),
    "temperature": ({"temperature": 2.0}, {}),
    "array_temperature": ({}, {"temperature": np.float32(2.0)}),
    "return_aux": ({"return_aux": True}, {}),
    "where_col": ({}, {"where": np.ones((1, V), bool)}),
    "where_full": ({}, {"where": np.ones((N, V), bool)}),
    "logit_softcap": ({"logit_softcap": 30.0}, {}),
}
INTEGER_ONLY = {"ignore_index": ({"ignore_index": 0}, {})}

MASK = (
    "a mask is a select (it keeps a masked NaN hidden, as optax's does), which XLA's CPU fuses "
    "into no reduction: the masked values are materialised once (16-bit logits and labels in "
    "their own dtype, where the logits' copy shares the gradient's buffer)"
)
SOFTCAP = (
    "the softcap's max and sums read one z' (its tanh in another fusion need not round alike), "
    "formed with selects that keep infinite logits infinite"
)
TEMPERATURE = (
    "z / T goes through the select that keeps infinite logits infinite; without it LLVM "
    "contracts z * (1/T) - m into a fused multiply-add inside the fusion, and the row max's own "
    "class no longer gives exactly 0"
)
# (labels, dtype, option): why it still materialises an [N, V] float32 temporary.
KNOWN = {
    ("integer", "bfloat16", "temperature"): TEMPERATURE,
    ("integer", "bfloat16", "array_temperature"): TEMPERATURE,
    ("integer", "bfloat16", "logit_softcap"): SOFTCAP,
    ("probability", "float32", "where_col"): MASK,
    ("probability", "float32", "where_full"): MASK,
    ("probability", "float32", "logit_softcap"): SOFTCAP,
    ("probability", "bfloat16", "temperature"): TEMPERATURE,
    ("probability", "bfloat16", "array_temperature"): TEMPERATURE,
    ("probability", "bfloat16", "where_col"): MASK,
    ("probability", "bfloat16", "where_full"): MASK,
    ("probability", "bfloat16", "logit_softcap"): SOFTCAP,
}
if jax.__version_info__ >= (0, 11):
    # The same temporary as with bfloat16; jax 0.10.2's XLA puts it in the gradient's output
    # buffer, which float32 logits make as large.
    KNOWN[("probability", "float32", "temperature")] = TEMPERATURE
    KNOWN[("probability", "float32", "array_temperature")] = TEMPERATURE


def cases():
    for kind in ("integer", "probability"):
        options = {**OPTIONS, **INTEGER_ONLY} if kind == "integer" else OPTIONS
        for dtype in ("float32", "bfloat16"):
            for name in options:
                reason = KNOWN.get((kind, dtype, name))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                yield pytest.param(kind, dtype, name, id=f"{kind}-{dtype}-{name}", marks=marks)


@pytest.mark.parametrize(("kind", "dtype", "name"), list(cases()))
def test_value_and_grad_keeps_no_logits_sized_temporary(kind, dtype, name):
    keywords, arrays = {**OPTIONS, **INTEGER_ONLY}[name]
    logits = jnp.zeros((N, V), dtype)
    if kind == "integer":
        loss_fn = sce.softmax_cross_entropy_with_integer_labels
        labels = jnp.zeros((N,), jnp.int32)
    else:
        loss_fn = sce.softmax_cross_entropy
        labels = jnp.full((N, V), 1.0 / V, dtype)

    def mean_loss(z, q, arrays):
        out = loss_fn(z, q, implementation="xla", reduction="mean", **keywords, **arrays)
        return out[0] if keywords.get("return_aux") else out

    compiled = jax.jit(jax.value_and_grad(mean_loss)).lower(logits, labels, arrays).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < LIMIT


def test_the_check_sees_a_logits_sized_temporary():
    """The limit is not vacuous: optax's ``value_and_grad`` keeps ``exp(z - m)`` in float32."""
    optax = pytest.importorskip("optax")
    logits = jnp.zeros((N, V), jnp.bfloat16)
    labels = jnp.zeros((N,), jnp.int32)

    def mean_loss(z):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))

    compiled = jax.jit(jax.value_and_grad(mean_loss)).lower(logits).compile()
    assert compiled.memory_analysis().temp_size_in_bytes >= N * V * 4


def test_the_gradient_takes_the_buffer_of_logits_formed_in_the_same_computation():
    """Logits formed inside the differentiated computation (``x @ w``, as in a training step)
    are one temporary; their gradient, formed once they have been read, takes their buffer, so
    that no second logits-sized temporary appears (a scatter into the gradient once kept it
    from doing so on the CPU)."""
    d = 64
    inputs, weight = jnp.zeros((N, d), jnp.float32), jnp.zeros((d, V), jnp.float32)
    labels = jnp.zeros((N,), jnp.int32)

    def mean_loss(x, w, q):
        return sce.softmax_cross_entropy_with_integer_labels(
            x @ w, q, implementation="xla", reduction="mean"
        )

    step = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))
    compiled = step.lower(inputs, weight, labels)
    temp = compiled.compile().memory_analysis().temp_size_in_bytes
    assert N * V * 4 <= temp < N * V * 4 + LIMIT
