"""Runs optax's own loss test classes against our functions."""

from __future__ import annotations

import functools
import types
from unittest import mock

import jax.test_util
from optax.losses import _classification_test as optax_tests

_REVERSE_MODE = types.SimpleNamespace(
    check_grads=functools.partial(jax.test_util.check_grads, modes=("rev",))
)


def against_ours(*, reverse_mode_only: bool = False, **functions):
    """A mixin for an optax TestCase: its module's ``_classification`` holds our ``functions``.

    ``reverse_mode_only`` restricts optax's gradient checks to reverse mode, for functions that
    are a ``custom_vjp``.
    """
    ours = types.SimpleNamespace(**functions)

    class AgainstOurs:
        def setUp(self):
            super().setUp()
            self.enter_context(mock.patch.object(optax_tests, "_classification", ours))
            if reverse_mode_only:
                self.enter_context(mock.patch.object(optax_tests, "jaxtest", _REVERSE_MODE))

    return AgainstOurs
