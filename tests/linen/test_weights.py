"""Tests of regjax.linen.DropConnect, a drop-in `flax.linen.Dense`."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import regjax
import regjax.linen as rnn


class DropConnectTest(parameterized.TestCase):
  def test_rng_impl_is_passed_through(self):
    x = jax.random.normal(jax.random.key(3), (4, 6))
    key = jax.random.key(4)
    for impl in ("hash", "jax"):
      module = rnn.DropConnect(5, rate=0.4, rng_impl=impl)
      variables = module.init(jax.random.key(0), x, deterministic=True)
      y = module.apply(variables, x, deterministic=False, rng=key)
      p = variables["params"]
      np.testing.assert_array_equal(
        np.asarray(y),
        np.asarray(
          regjax.dropconnect_dense(x, p["kernel"], p["bias"], 0.4, key=key, rng_impl=impl)
        ),
      )

  def test_fields_are_dense_fields_plus_four(self):
    dense = {f.name: f.default for f in dataclasses.fields(nn.Dense)}
    ours = {f.name: f.default for f in dataclasses.fields(rnn.DropConnect)}
    assert set(ours) - set(dense) == {"rate", "deterministic", "rng_collection", "rng_impl"}
    assert set(dense) <= set(ours)
    for name in dense:
      if name in ("kernel_init", "bias_init"):
        continue  # initializer closures: compared by their draws below
      assert ours[name] == dense[name], name
    x = jnp.ones((2, 5))
    theirs = nn.Dense(4).init(jax.random.key(0), x)
    mine = rnn.DropConnect(4).init(jax.random.key(0), x, deterministic=True)
    chex.assert_trees_all_equal(mine, theirs)  # same names, shapes and initial values

  @parameterized.named_parameters(
    ("float32", None, True), ("bfloat16", jnp.bfloat16, True), ("no_bias", None, False)
  )
  def test_dense_checkpoint_loads_and_eval_is_dense(self, dtype, use_bias):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 3, 10)), jnp.float32)
    dense = nn.Dense(7, dtype=dtype, use_bias=use_bias)
    variables = dense.init(jax.random.key(2), x)
    ours = rnn.DropConnect(7, dtype=dtype, use_bias=use_bias, rate=0.4)
    y = ours.apply(variables, x, deterministic=True)
    expected = dense.apply(variables, x)
    assert y.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))

  def test_train_mode_masks_the_kernel(self):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((6, 10)), jnp.float32)
    variables = nn.Dense(7).init(jax.random.key(4), x)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    key = jax.random.key(5)
    module = rnn.DropConnect(7, rate=0.4)
    y = module.apply(variables, x, deterministic=False, rng=key)
    # The mask regjax.dropout draws for the kernel's shape (rate 0.4).
    mask = np.asarray(regjax.dropout(jnp.ones(kernel.shape), 0.4, key=key)) != 0
    expected = np.asarray(x) @ (np.asarray(kernel) * mask) / 0.6 + np.asarray(bias)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)
    # From the stream: a different draw per key, reproducible.
    a = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    b = module.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(6)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(y))

  def test_train_mode_without_stream_raises(self):
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match="DropConnect in train mode.*'dropout' PRNG stream"):
      rnn.DropConnect(4).init(jax.random.key(0), x, deterministic=False)
    variables = rnn.DropConnect(4).init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, deterministic=False
    )
    assert variables["params"]["kernel"].shape == (5, 4)
    with pytest.raises(ValueError, match="deterministic"):
      rnn.DropConnect(4).apply(variables, x)
