"""Test-wide settings: float64 available, strict dtype promotion, warnings are errors, and four
virtual CPU devices for the sharding tests. They are set before any test module touches JAX."""

import warnings

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
