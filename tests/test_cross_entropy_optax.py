"""optax's own tests for softmax_cross_entropy and softmax_cross_entropy_with_integer_labels, run
against our functions. Their gradient checks run in reverse mode only: our default implementation
is a custom_vjp, and forward mode needs implementation="reference" (SPEC.md, Transformations)."""

from __future__ import annotations

import optax_port
from optax.losses import _classification_test as optax_tests

import jax_softmax_ce as sce

_AgainstOurs = optax_port.against_ours(
    reverse_mode_only=True,
    softmax_cross_entropy=sce.softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels=sce.softmax_cross_entropy_with_integer_labels,
)


class TestOptaxSoftmaxCrossEntropy(_AgainstOurs, optax_tests.SoftmaxCrossEntropyTest):
    pass


class TestOptaxSoftmaxCrossEntropyWithIntegerLabels(
    _AgainstOurs, optax_tests.SoftmaxCrossEntropyWithIntegerLabelsTest
):
    pass
