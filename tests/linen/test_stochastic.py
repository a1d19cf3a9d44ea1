"""Tests of regjax.linen's stochastic modules (Dropout, GaussianDropout, Uout),
a model built from them, and the variance-shift toy check of Li et al. (2019), Sec. 3.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import IMPLS
from absl.testing import parameterized

import regjax
import regjax.linen as rnn

Z = 5.0


# module class -> (function, its rate/beta field name, a value, flax counterpart)
MODULES = {
  "Dropout": (rnn.Dropout, regjax.dropout, "rate", 0.3),
  "GaussianDropout": (rnn.GaussianDropout, regjax.gaussian_dropout, "rate", 0.3),
  "Uout": (rnn.Uout, regjax.uout, "beta", 0.2),
}


MODULE_CASES = tuple((name, name) for name in MODULES)


def _make(name, **kwargs):
  cls, fn, field, value = MODULES[name]
  return cls(**{field: value}, **kwargs), fn, value


class NoiseModuleTest(parameterized.TestCase):
  def test_dropout_fields_match_flax(self):
    import dataclasses

    ours = {
      f.name: f.default
      for f in dataclasses.fields(rnn.Dropout)
      if f.name in ("rate", "broadcast_dims", "deterministic", "rng_collection")
    }
    theirs = {f.name: f.default for f in dataclasses.fields(nn.Dropout) if f.name in ours}
    assert ours == theirs and len(ours) == 4

  def test_dropout_matches_flax_output_for_the_same_rng_stream(self):
    x = jax.random.normal(jax.random.key(0), (16, 40))
    rngs = {"dropout": jax.random.key(1)}
    # rng_impl='jax' draws with jax.random.bernoulli, as flax does (the default
    # 'hash' generator draws a different, equally distributed mask).
    ours = rnn.Dropout(0.4, rng_impl="jax").apply({}, x, deterministic=False, rngs=rngs)
    theirs = nn.Dropout(0.4).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6)

  @parameterized.named_parameters(*MODULE_CASES)
  def test_module_equals_function_with_explicit_rng(self, name):
    module, fn, value = _make(name, broadcast_dims=(0,))
    x = jax.random.normal(jax.random.key(2), (8, 30))
    key = jax.random.key(3)
    y = module.apply({}, x, deterministic=False, rng=key)
    np.testing.assert_array_equal(
      np.asarray(y), np.asarray(fn(x, value, key=key, broadcast_dims=(0,)))
    )

  @parameterized.named_parameters(*MODULE_CASES)
  def test_stream_draws_vary_with_the_stream_key(self, name):
    module, _, _ = _make(name)
    x = jnp.ones((256,))
    a = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    b = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    a2 = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert not np.array_equal(np.asarray(a), np.asarray(b))

  @parameterized.named_parameters(*MODULE_CASES)
  def test_train_mode_without_stream_raises_instead_of_using_params(self, name):
    module, _, _ = _make(name)
    x = jnp.ones((4, 3))
    # flax would silently draw from 'params' here; regjax refuses.
    with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream.*rngs="):
      module.init(jax.random.key(0), x, deterministic=False)
    with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
      module.apply({}, x, deterministic=False, rngs={"params": jax.random.key(0)})

  @parameterized.named_parameters(*MODULE_CASES)
  def test_custom_rng_collection(self, name):
    module, _, _ = _make(name, rng_collection="noise")
    x = jnp.ones((64,))
    with pytest.raises(ValueError, match="'noise' PRNG stream"):
      module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    y = module.apply({}, x, deterministic=False, rngs={"noise": jax.random.key(0)})
    assert not np.allclose(np.asarray(y), 1.0)

  @parameterized.named_parameters(*MODULE_CASES)
  def test_deterministic_from_attribute_or_call(self, name):
    x = jax.random.normal(jax.random.key(6), (5, 7))
    module, _, _ = _make(name, deterministic=True)
    np.testing.assert_array_equal(np.asarray(module.apply({}, x)), np.asarray(x))
    module, _, _ = _make(name)
    np.testing.assert_array_equal(np.asarray(module.apply({}, x, True)), np.asarray(x))
    with pytest.raises(ValueError, match="deterministic"):
      module.apply({}, x)  # neither given: flax's merge_param error
    both, _, _ = _make(name, deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
      both.apply({}, x, deterministic=False)

  def test_zero_rate_needs_no_stream(self):
    x = jnp.ones((3,))
    for module in (rnn.Dropout(0.0), rnn.GaussianDropout(0.0), rnn.Uout(0.0)):
      np.testing.assert_array_equal(
        np.asarray(module.apply({}, x, deterministic=False)), np.asarray(x)
      )
    np.testing.assert_array_equal(np.asarray(rnn.Dropout(1.0).apply({}, x, deterministic=False)), 0)

  def test_bad_rate_raises_through_the_module(self):
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
      rnn.Dropout(1.5).apply(
        {}, jnp.ones(3), deterministic=False, rngs={"dropout": jax.random.key(0)}
      )
    with pytest.raises(ValueError, match=r"`beta` must be in"):
      rnn.Uout(-1.0).apply(
        {}, jnp.ones(3), deterministic=False, rngs={"dropout": jax.random.key(0)}
      )


class MLP(nn.Module):
  """Dense -> BN -> relu -> noise, twice, then a classifier."""

  width: int = 32
  classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.width)(x)
    x = rnn.BatchNorm(deterministic=not train, momentum=0.9)(x)
    x = rnn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    x = nn.Dense(self.width)(x)
    x = rnn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = rnn.Uout(0.1, deterministic=not train)(nn.relu(x))
    x = rnn.GaussianDropout(0.1, deterministic=not train)(x)
    return nn.Dense(self.classes)(x)


def _blobs(key, n=600, dim=8, classes=3):
  kc, kx, ky = jax.random.split(key, 3)
  centres = 3.0 * jax.random.normal(kc, (classes, dim))
  labels = jax.random.randint(ky, (n,), 0, classes)
  return centres[labels] + jax.random.normal(kx, (n, dim)), labels


def test_flax_model_trains_under_jit_with_mutable_batch_stats():
  x, y = _blobs(jax.random.key(0))
  model = MLP()
  variables = model.init(jax.random.key(1), x[:2], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(np.asarray(batch_stats["BatchNorm_0"]["var"]), 1.0)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, batch_stats, opt_state, key, xb, yb):
    def loss_fn(params):
      logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        xb,
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  base = jax.random.key(2)
  losses = []
  for i in range(30):
    sl = slice((i % 6) * 100, (i % 6 + 1) * 100)
    params, batch_stats, opt_state, loss = step(
      params, batch_stats, opt_state, jax.random.fold_in(base, i), x[sl], y[sl]
    )
    losses.append(float(loss))
  assert all(math.isfinite(v) for v in losses)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
  # Running statistics moved away from their initial values and stay finite.
  for layer in batch_stats.values():
    assert np.all(np.isfinite(np.asarray(layer["var"])))
    assert not np.allclose(np.asarray(layer["var"]), 1.0)
  logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y))
  assert accuracy > 0.9


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_toy_variance_shift_dropout_into_batch_norm(keep):
  """x ~ N(0, 1) -> dropout(keep) -> BN: running var -> 1/keep, eval-time var 1.

  After T steps from var 1, E[running var] = m**T + (1 - m**T) * (n-1)/n / keep.
  Each step's batch variance of y = x*m/keep has a per-feature sampling variance
  of about (E y**4 - (E y**2)**2) / n = (3/keep**3 - 1/keep**2) / n; the EMA
  keeps a fraction (1-m)/(1+m) of it; we average F independent features.
  """
  n, features, steps, momentum = 256, 512, 150, 0.9

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = rnn.Dropout(1 - keep, deterministic=not train)(x)
      return rnn.BatchNorm(deterministic=not train, momentum=momentum)(x)

  net = Net()
  variables = net.init(jax.random.key(0), jnp.ones((2, features)), train=False)
  params, stats = variables["params"], variables["batch_stats"]

  def body(stats, key):
    kx, kd = jax.random.split(key)
    x = jax.random.normal(kx, (n, features))
    _, upd = net.apply(
      {"batch_stats": stats, "params": params},
      x,
      train=True,
      rngs={"dropout": kd},
      mutable=["batch_stats"],
    )
    return upd["batch_stats"], None

  keys = jax.random.split(jax.random.key(1), steps)
  stats, _ = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(stats, keys)
  running_var = np.asarray(stats["BatchNorm_0"]["var"], np.float64)

  decay = momentum**steps
  expected = decay + (1 - decay) * (n - 1) / n / keep
  per_feature_sd = math.sqrt((3 / keep**3 - 1 / keep**2) / n * (1 - momentum) / (1 + momentum))
  assert abs(running_var.mean() - expected) < Z * per_feature_sd / math.sqrt(features)

  # Eval: dropout is the identity, so BN sees var 1 but divides by ~1/keep:
  # the output variance is the shift ratio Delta = keep.
  x_eval = jax.random.normal(jax.random.key(2), (4096, features))
  bn_input = rnn.Dropout(1 - keep).apply({}, x_eval, deterministic=True)
  eval_input_var = np.asarray(jnp.var(bn_input, axis=0), np.float64)
  assert abs(eval_input_var.mean() - 1) < Z * math.sqrt(2 / 4096 / features)
  out = net.apply({"params": params, "batch_stats": stats}, x_eval, train=False)
  out_var = np.asarray(jnp.var(out, axis=0), np.float64)
  # Eval BN is affine per feature: an exact relation, up to float32 rounding.
  np.testing.assert_allclose(out_var, eval_input_var / (running_var + 1e-5), rtol=1e-4)
  # Delta ~ keep: relative errors of the eval variance and of the running var add.
  rel_se = math.sqrt(2 / 4096 / features) + per_feature_sd * keep / math.sqrt(features)
  assert abs(out_var.mean() / (1 / expected) - 1) < Z * rel_se


def test_linen_and_nnx_modules_pass_rng_impl_through():
  import flax.linen as nn
  from flax import nnx

  x = jax.random.normal(jax.random.key(60), (16, 40))
  key = jax.random.key(61)
  for impl in IMPLS:
    for cls, fn, value in (
      (regjax.linen.Dropout, regjax.dropout, 0.4),
      (regjax.linen.GaussianDropout, regjax.gaussian_dropout, 0.4),
      (regjax.linen.Uout, regjax.uout, 0.3),
    ):
      y = cls(value, rng_impl=impl).apply({}, x, deterministic=False, rng=key)
      np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, value, key=key, rng_impl=impl)))
    for cls, fn, value in (
      (regjax.nnx.Dropout, regjax.dropout, 0.4),
      (regjax.nnx.GaussianDropout, regjax.gaussian_dropout, 0.4),
      (regjax.nnx.Uout, regjax.uout, 0.3),
    ):
      y = cls(value, rng_impl=impl)(x, rngs=key)
      np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, value, key=key, rng_impl=impl)))
  theirs = nn.Dropout(0.4, deterministic=False).apply({}, x, rng=key)
  np.testing.assert_array_equal(
    np.asarray(
      regjax.linen.Dropout(0.4, rng_impl="jax").apply({}, x, deterministic=False, rng=key)
    ),
    np.asarray(theirs),
  )
  with pytest.raises(ValueError, match="rng_impl"):
    regjax.nnx.Dropout(0.4, rng_impl="philox", rngs=nnx.Rngs(dropout=0))
  with pytest.raises(ValueError, match="rng_impl"):
    regjax.linen.Dropout(0.4, rng_impl="philox").apply({}, x, deterministic=False, rng=key)


@pytest.mark.parametrize("impl", IMPLS)
def test_classic_dropout_module_equals_function(impl):
  x = jax.random.normal(jax.random.key(70), (16, 40))
  key = jax.random.key(71)
  module = rnn.Dropout(0.3, rng_impl=impl, inverted=False)
  y = module.apply({}, x, deterministic=False, rng=key)
  np.testing.assert_array_equal(
    np.asarray(y), np.asarray(regjax.dropout(x, 0.3, key=key, rng_impl=impl, inverted=False))
  )
  # The stream's key, as for inverted dropout: the same mask, scaled by keep.
  rngs = {"dropout": jax.random.key(72)}
  classic = module.apply({}, x, deterministic=False, rngs=rngs)
  inverted = rnn.Dropout(0.3, rng_impl=impl).apply({}, x, deterministic=False, rngs=rngs)
  np.testing.assert_allclose(np.asarray(classic), 0.7 * np.asarray(inverted), rtol=1e-6)
  # Eval needs no stream and returns x * (1 - rate).
  evaluated = module.apply({}, x, deterministic=True)
  np.testing.assert_array_equal(
    np.asarray(evaluated), np.asarray(regjax.dropout(x, 0.3, deterministic=True, inverted=False))
  )
  assert rnn.Dropout(0.3).inverted is True


def test_classic_dropout_module_bad_inverted():
  with pytest.raises(TypeError, match="`inverted` must be a bool"):
    rnn.Dropout(0.3, inverted=1).apply({}, jnp.ones(3), deterministic=True)
