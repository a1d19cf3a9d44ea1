"""Tests of regjax.nnx.DropConnect beyond flax parity (tests/test_parity.py)."""

import jax
import numpy as np
import pytest
from _helpers import _x
from flax import nnx

import regjax
import regjax.nnx as rx


# ---------------------------------------------------------------- DropConnect
def test_drop_connect_passes_rng_impl_through():
  x, key = _x((4, 5)), jax.random.key(5)
  for impl in ("hash", "jax"):
    ours = rx.DropConnect(5, 4, rate=0.4, rng_impl=impl, rngs=nnx.Rngs(0, dropout=1))
    y = ours(x, rngs=key)
    np.testing.assert_array_equal(
      np.asarray(y),
      np.asarray(
        regjax.dropconnect_dense(x, ours.kernel[...], ours.bias[...], 0.4, key=key, rng_impl=impl)
      ),
    )
  with pytest.raises(ValueError, match="regjax.nnx.DropConnect: `rng_impl` must be one of"):
    rx.DropConnect(5, 4, rng_impl="philox", rngs=nnx.Rngs(0))
