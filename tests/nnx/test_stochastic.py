"""Tests of regjax.nnx's stochastic modules beyond the shared module tests."""

import jax
import numpy as np
import pytest
from _helpers import IMPLS, _x
from flax import nnx

import regjax
import regjax.nnx as rx


def test_dropout_rate_one_returns_zeros_without_a_key():
  y = rx.Dropout(1.0)(_x((4, 3)))
  np.testing.assert_array_equal(np.asarray(y), 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_classic_dropout_module_equals_function(impl):
  x = _x((16, 40))
  key = jax.random.key(71)
  module = rx.Dropout(0.3, rng_impl=impl, inverted=False)
  np.testing.assert_array_equal(
    np.asarray(module(x, rngs=key)),
    np.asarray(regjax.dropout(x, 0.3, key=key, rng_impl=impl, inverted=False)),
  )
  # The kept stream, as for inverted dropout: the same mask, scaled by keep.
  classic = rx.Dropout(0.3, rng_impl=impl, inverted=False, rngs=nnx.Rngs(dropout=3))(x)
  inverted = rx.Dropout(0.3, rng_impl=impl, rngs=nnx.Rngs(dropout=3))(x)
  np.testing.assert_allclose(np.asarray(classic), 0.7 * np.asarray(inverted), rtol=1e-6)
  module.eval()
  np.testing.assert_array_equal(
    np.asarray(module(x)), np.asarray(regjax.dropout(x, 0.3, deterministic=True, inverted=False))
  )
  assert rx.Dropout(0.3).inverted is True


def test_classic_dropout_module_bad_inverted():
  with pytest.raises(TypeError, match=r"regjax.nnx.Dropout: `inverted` must be a bool"):
    rx.Dropout(0.3, inverted="yes")
