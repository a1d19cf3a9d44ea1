"""Tests of regjax.diagnostics on linen models against the analytic variance shift.

Input N(c, v) -> multiplicative noise (mean 1, variance s2) -> BatchNorm:
Var_train = v + s2 * (c**2 + v), Var_eval = v, so delta = v / (v + s2 * (c**2 + v)).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regjax.linen as rnn
from regjax import diagnostics

C, V = 1.0, 2.0  # input mean and variance


BATCH, FEATURES = 1024, 128


STEPS, MOMENTUM = 200, 0.9


NOISES = {  # name -> (module factory, s2)
  "dropout": (lambda: rnn.Dropout(0.5), 1.0),
  "gaussian_dropout": (lambda: rnn.GaussianDropout(0.5), 1.0),
  "uout": (lambda: rnn.Uout(1.0), 1.0 / 3.0),
}


class NoiseIntoBN(nn.Module):
  noise: str

  @nn.compact
  def __call__(self, x, train: bool):
    x = NOISES[self.noise][0]()(x, deterministic=not train)
    return rnn.BatchNorm(deterministic=not train, momentum=MOMENTUM)(x)


def _data(key, n=BATCH):
  return C + math.sqrt(V) * jax.random.normal(key, (n, FEATURES))


def _train(model):
  """Runs STEPS train steps (only the BN statistics change; no params to learn)."""
  variables = model.init(jax.random.key(0), jnp.ones((2, FEATURES)), train=False)

  def body(stats, key):
    kx, kd = jax.random.split(key)
    _, upd = model.apply(
      {**variables, "batch_stats": stats},
      _data(kx),
      train=True,
      rngs={"dropout": kd},
      mutable=["batch_stats"],
    )
    return upd["batch_stats"], None

  keys = jax.random.split(jax.random.key(1), STEPS)
  stats, _ = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(variables["batch_stats"], keys)
  return {**variables, "batch_stats": stats}


@pytest.fixture(scope="module", params=sorted(NOISES))
def trained(request):
  model = NoiseIntoBN(request.param)
  batches = [_data(jax.random.key(100 + i)) for i in range(8)]
  return request.param, model, _train(model), batches


def _eval(model):
  return lambda v, x: model.apply(v, x, train=False)


def test_measured_shift_matches_analytic(trained):
  noise, model, variables, batches = trained
  s2 = NOISES[noise][1]
  expected = V / (V + s2 * (C**2 + V))
  shifts = diagnostics.variance_shift(_eval(model), variables, batches)
  assert list(shifts) == ["BatchNorm_0"]
  layer = shifts["BatchNorm_0"]
  assert layer.count == 8 * BATCH
  # The bar is 2 %; the statistical error here is ~0.3 % (EMA over
  # 1024-sample batches, averaged over 128 features).
  assert abs(layer.delta.mean() / expected - 1) < 0.02
  np.testing.assert_allclose(layer.real_var.mean(), V, rtol=0.02)
  np.testing.assert_allclose(layer.moving_var.mean(), V + s2 * (C**2 + V), rtol=0.02)
  assert layer.mean_shift == pytest.approx(np.mean(np.maximum(layer.delta, 1 / layer.delta)))
  assert layer.max_shift >= layer.mean_shift >= 1.0


def test_recalibration_brings_running_var_to_eval_var(trained):
  noise, model, variables, batches = trained
  before = jax.tree.map(np.asarray, variables)
  new_stats = diagnostics.recalibrate_batch_stats(_eval(model), variables, batches)
  # The input is untouched, the structure and dtypes are kept.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)
  assert jax.tree.structure(new_stats) == jax.tree.structure(variables["batch_stats"])
  assert jax.tree.map(lambda a: a.dtype, new_stats) == jax.tree.map(
    lambda a: a.dtype, variables["batch_stats"]
  )
  stats = new_stats["BatchNorm_0"]
  # Biased batch variance: E = V * (n-1)/n.
  np.testing.assert_allclose(np.mean(stats["var"]), V * (BATCH - 1) / BATCH, rtol=0.01)
  np.testing.assert_allclose(np.mean(stats["mean"]), C, atol=0.01)
  recalibrated = {**variables, "batch_stats": new_stats}
  after = diagnostics.variance_shift(_eval(model), recalibrated, batches)["BatchNorm_0"]
  assert abs(after.delta.mean() - 1) < 0.01
  # Eval outputs now have unit variance again, as in training.
  out = model.apply(recalibrated, _data(jax.random.key(7), 4096), train=False)
  np.testing.assert_allclose(float(jnp.var(out, axis=0).mean()), 1.0, rtol=0.02)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)  # flax's own BN
    return rnn.Dropout(0.3, deterministic=not train)(nn.relu(x))


class Deep(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = Block()(x, train)
    x = nn.Dense(8)(x)
    return rnn.BatchNorm(deterministic=not train, unbiased_running_var=True)(x)


def test_nested_paths_flax_bn_and_exact_real_statistics():
  model = Deep()
  x = jax.random.normal(jax.random.key(0), (256, 5)) * 3 + 1
  variables = model.init(jax.random.key(1), x, train=False)
  _, upd = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
  )
  variables = {**variables, **upd}
  batches = [(x[:100], None), (x[100:], None)]  # unequal batches, (x, y) tuples
  shifts = diagnostics.variance_shift(_eval(model), variables, batches)
  assert list(shifts) == ["Block_0/BatchNorm_0", "BatchNorm_0"]
  # The first BN's input is the Dense output: check against float64 NumPy.
  dense = variables["params"]["Block_0"]["Dense_0"]
  h = np.asarray(x, np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(
    dense["bias"], np.float64
  )
  first = shifts["Block_0/BatchNorm_0"]
  np.testing.assert_allclose(first.real_mean, h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(first.real_var, h.var(0), rtol=1e-5)
  np.testing.assert_allclose(
    first.moving_var, np.asarray(variables["batch_stats"]["Block_0"]["BatchNorm_0"]["var"])
  )
  assert first.count == 256

  # Recalibration follows each layer's convention: the last BN stores unbiased variances.
  new = diagnostics.recalibrate_batch_stats(_eval(model), variables, [x])
  np.testing.assert_allclose(np.asarray(new["Block_0"]["BatchNorm_0"]["var"]), h.var(0), rtol=1e-4)
  hidden = nn.relu((h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5))  # BN in batch mode, no noise
  dense = variables["params"]["Dense_0"]
  h2 = hidden @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
  np.testing.assert_allclose(np.asarray(new["BatchNorm_0"]["var"]), h2.var(0, ddof=1), rtol=1e-4)
  np.testing.assert_allclose(
    np.asarray(new["BatchNorm_0"]["mean"]), h2.mean(0), rtol=1e-4, atol=1e-5
  )


def test_recalibration_gives_the_pooled_statistics_of_all_batches():
  model = NoiseIntoBN("dropout")
  variables = model.init(jax.random.key(0), jnp.ones((2, FEATURES)), train=False)
  # Unequal sizes and scales: an average of per-batch statistics would be wrong.
  batches = [_data(jax.random.key(i), n) * (i + 1) for i, n in enumerate((64, 64, 1))]
  new = diagnostics.recalibrate_batch_stats(_eval(model), variables, batches)
  pooled = np.concatenate([np.asarray(b, np.float64) for b in batches])
  np.testing.assert_allclose(
    np.asarray(new["BatchNorm_0"]["mean"]), pooled.mean(0), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(new["BatchNorm_0"]["var"]), pooled.var(0), rtol=1e-5)


def test_errors_are_clear():
  dense = nn.Dense(3)
  variables = dense.init(jax.random.key(0), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="no BatchNorm call was seen"):
    diagnostics.variance_shift(dense.apply, {**variables, "batch_stats": {}}, [jnp.ones((2, 4))])
  with pytest.raises(ValueError, match="no BatchNorm call was seen"):
    diagnostics.recalibrate_batch_stats(dense.apply, variables, [])
  with pytest.raises(ValueError, match="under 'x'"):
    diagnostics.variance_shift(dense.apply, variables, [{"image": jnp.ones((2, 4))}])
