"""regjax.equinox.Dropout as a drop-in for eqx.nn.Dropout: equinox's behaviours, as our tests."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regjax
import regjax.equinox as rq

KEY = jax.random.key(11)
X = jax.random.normal(jax.random.key(0), (16, 24))


def test_constructor_defaults_are_equinox_ones():
  module = rq.Dropout()
  assert module.p == 0.5 and module.inference is False
  assert rq.Dropout(0.2, True).inference is True
  assert rq.Dropout(rate=0.2).p == 0.2 and rq.Dropout(rate=0.2).rate == 0.2
  with pytest.raises(TypeError, match=r"`p` or `rate`, not both"):
    rq.Dropout(0.2, rate=0.3)
  with pytest.raises(ValueError, match=r"rate"):
    rq.Dropout(1.5)


def test_inference_returns_x():
  assert rq.Dropout(0.5, inference=True)(X) is X
  assert rq.Dropout(0.5)(X, inference=True) is X


def test_rate_zero_returns_x_and_needs_no_key():
  assert rq.Dropout(0.0)(X) is X


def test_rate_one_returns_zeros_and_needs_no_key():
  y = rq.Dropout(1.0)(X)
  assert y.shape == X.shape and y.dtype == X.dtype
  np.testing.assert_array_equal(np.asarray(y), 0.0)


def test_training_without_a_key_raises_as_equinox():
  with pytest.raises(RuntimeError):
    eqx.nn.Dropout(0.5)(X)
  with pytest.raises(RuntimeError, match=r"regjax.equinox.Dropout in training mode"):
    rq.Dropout(0.5)(X)


def test_inference_mode_switches_every_dropout_of_a_model():
  model = [rq.Dropout(0.5), eqx.nn.Dropout(0.5), {"inner": rq.GaussianNoise(1.0)}]
  frozen = eqx.nn.inference_mode(model)
  assert frozen[0].inference and frozen[1].inference and frozen[2]["inner"].inference
  assert frozen[0](X) is X and frozen[2]["inner"](X) is X
  thawed = eqx.nn.inference_mode(frozen, value=False)
  assert not thawed[0].inference
  np.testing.assert_array_equal(
    np.asarray(thawed[0](X, key=KEY)), np.asarray(regjax.dropout(X, 0.5, key=KEY))
  )


def test_under_vmap_each_example_draws_from_its_own_key():
  module = rq.Dropout(0.5)
  keys = jax.random.split(KEY, X.shape[0])
  y = jax.vmap(lambda x, k: module(x, key=k))(X, keys)
  one = jax.jit(lambda x, k: regjax.dropout(x, 0.5, key=k))
  for i in (0, 7, 15):
    np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(one(X[i], keys[i])))
  masks = np.asarray(y != 0)
  assert not (masks[0] == masks[1]).all()  # different keys, different masks


def test_under_filter_jit_equals_eager_and_p_can_be_traced():
  module = rq.Dropout(0.3)
  f = eqx.filter_jit(lambda m, x, k: m(x, key=k))
  np.testing.assert_array_equal(np.asarray(f(module, X, KEY)), np.asarray(module(X, key=KEY)))
  traced = rq.Dropout(jnp.float32(0.3))
  np.testing.assert_array_equal(
    np.asarray(f(traced, X, KEY)), np.asarray(regjax.dropout(X, jnp.float32(0.3), key=KEY))
  )
  f(eqx.tree_at(lambda m: m.p, traced, jnp.float32(0.6)), X, KEY)
  assert f._cached._cache_size() == 2  # the Python-float module, and one for any traced p


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
  n = 200_000
  x = jnp.ones((n,))
  y = np.asarray(rq.Dropout(p)(x, key=jax.random.key(int(p * 100))), np.float64)
  kept = y != 0
  # the kept fraction is Binomial(n, 1 - p) / n: 5 standard errors
  assert abs(kept.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
  np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=1e-6)
  # inverted dropout keeps the mean: E[y] = 1, Var[y] = p / (1 - p)
  assert abs(y.mean() - 1) < 5 * math.sqrt(p / (1 - p) / n)
