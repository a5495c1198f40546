"""optax's own tests for softmax_cross_entropy and softmax_cross_entropy_with_integer_labels, run
against our functions. Their gradient checks run in reverse mode only: our default implementation
is a custom_vjp, and forward mode needs implementation="reference" (SPEC.md, Transformations)."""

from __future__ import annotations

import functools
import types
from unittest import mock

import jax.test_util
from optax.losses import _classification_test as optax_tests

import jax_softmax_ce as sce

OURS = types.SimpleNamespace(
    softmax_cross_entropy=sce.softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels=sce.softmax_cross_entropy_with_integer_labels,
)
REVERSE_MODE = types.SimpleNamespace(
    check_grads=functools.partial(jax.test_util.check_grads, modes=("rev",))
)


class _AgainstOurs:
    def setUp(self):
        super().setUp()
        self.enter_context(mock.patch.object(optax_tests, "_classification", OURS))
        self.enter_context(mock.patch.object(optax_tests, "jaxtest", REVERSE_MODE))


class TestOptaxSoftmaxCrossEntropy(_AgainstOurs, optax_tests.SoftmaxCrossEntropyTest):
    pass


class TestOptaxSoftmaxCrossEntropyWithIntegerLabels(
    _AgainstOurs, optax_tests.SoftmaxCrossEntropyWithIntegerLabelsTest
):
    pass
