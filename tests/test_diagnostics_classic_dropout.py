"""The variance shift of classic (non-inverted) dropout, measured by regjax.diagnostics.

x ~ N(c, v) per feature -> dropout -> BatchNorm. With keep = 1 - rate, classic
dropout gives Var_train[x * m] = keep * v + keep * rate * c**2 and
Var_eval[x * keep] = keep**2 * v, so

    delta = Var_eval / Var_train = keep * v / (v + rate * c**2),

inverted dropout's v / (v + s2 * (c**2 + v)) with s2 = rate / keep (both modes of
classic dropout are keep times inverted dropout's outputs). The running statistics
are trained on many batches, linen and NNX; the measured delta is compared with the
formula at Z standard errors computed from the sample sizes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import regjax.linen as rnn
import regjax.nnx as rx
from regjax import diagnostics

Z = 5.0
RATE = 0.4
FEATURES, BATCH, STEPS, MOMENTUM = 256, 512, 100, 0.9
EVAL_BATCHES, EVAL_BATCH = 4, 1024
VAR = 2.0


def _train_moments(c, v, rate):
  """Variance and central fourth moment of y = x * m, x ~ N(c, v), m ~ Bernoulli(1 - rate)."""
  keep = 1 - rate
  mu = keep * c
  var = keep * v + keep * rate * c**2
  d = c - mu  # x - mu = z + d, z ~ N(0, v), where kept; y - mu = -mu where dropped
  mu4 = keep * (3 * v**2 + 6 * v * d**2 + d**4) + rate * mu**4
  return var, mu4


def expected_delta(c, v, rate):
  return (1 - rate) * v / (v + rate * c**2)


def _tolerance(c, v, rate):
  """Z standard errors of mean(real_var) / mean(moving_var) over FEATURES features.

  moving_var: an EMA (weight 1 - m per step) of unbiased batch variances, each
  with sampling variance (mu4 - var**2) / n to leading order, so its stationary
  variance is that times (1 - m) / (1 + m). real_var: pooled over
  EVAL_BATCHES * EVAL_BATCH normal values (eval input x * keep), relative
  variance 2 / count. Independent features divide both by FEATURES.
  """
  var, mu4 = _train_moments(c, v, rate)
  rel_moving = math.sqrt((mu4 - var**2) / BATCH * (1 - MOMENTUM) / (1 + MOMENTUM)) / var
  rel_real = math.sqrt(2 / (EVAL_BATCHES * EVAL_BATCH))
  return Z * math.hypot(rel_moving, rel_real) / math.sqrt(FEATURES)


def _expected_measured_delta(c, v, rate, inverted):
  """The formula, with the EMA's remaining weight MOMENTUM**STEPS on the initial var 1."""
  keep = 1 - rate
  var, _ = _train_moments(c, v, rate)
  eval_var = keep**2 * v
  if inverted:
    var, eval_var = var / keep**2, v
  decay = MOMENTUM**STEPS
  return eval_var / (decay + (1 - decay) * var)


def _batches(c, v, seed, n, size):
  keys = jax.random.split(jax.random.key(seed), n)
  return [c + math.sqrt(v) * jax.random.normal(k, (size, FEATURES)) for k in keys]


def _linen_delta(c, v, inverted):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = rnn.Dropout(RATE, inverted=inverted)(x, deterministic=not train)
      return rnn.BatchNorm(momentum=MOMENTUM, unbiased_running_var=True)(x, deterministic=not train)

  net = Net()
  variables = net.init(jax.random.key(0), jnp.ones((2, FEATURES)), train=False)

  def body(stats, key):
    kx, kd = jax.random.split(key)
    x = c + math.sqrt(v) * jax.random.normal(kx, (BATCH, FEATURES))
    _, upd = net.apply(
      {**variables, "batch_stats": stats},
      x,
      train=True,
      rngs={"dropout": kd},
      mutable=["batch_stats"],
    )
    return upd["batch_stats"], None

  keys = jax.random.split(jax.random.key(1), STEPS)
  stats, _ = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(variables["batch_stats"], keys)
  variables = {**variables, "batch_stats": stats}
  batches = _batches(c, v, 2, EVAL_BATCHES, EVAL_BATCH)
  (shift,) = diagnostics.variance_shift(
    lambda variables, x: net.apply(variables, x, train=False), variables, batches
  ).values()
  return shift


class NNXNet(nnx.Module):
  def __init__(self, inverted):
    self.drop = rx.Dropout(RATE, inverted=inverted, rngs=nnx.Rngs(dropout=1))
    self.bn = rx.BatchNorm(FEATURES, momentum=MOMENTUM, unbiased_running_var=True, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.bn(self.drop(x))


def _nnx_delta(c, v, inverted):
  model = NNXNet(inverted)
  model.train()

  @nnx.jit
  def step(model, x):
    model(x)

  for x in _batches(c, v, 3, STEPS, BATCH):
    step(model, x)
  (shift,) = diagnostics.variance_shift(model, _batches(c, v, 2, EVAL_BATCHES, EVAL_BATCH)).values()
  return shift


FRAMEWORKS = {"linen": _linen_delta, "nnx": _nnx_delta}


@pytest.mark.parametrize("c", [0.0, 1.0])
@pytest.mark.parametrize("framework", tuple(FRAMEWORKS))
def test_classic_dropout_delta_matches_formula_and_inverted(framework, c):
  tol = _tolerance(c, VAR, RATE)
  deltas = {}
  for inverted in (False, True):
    shift = FRAMEWORKS[framework](c, VAR, inverted)
    assert shift.count == EVAL_BATCHES * EVAL_BATCH
    measured = shift.real_var.mean() / shift.moving_var.mean()
    expected = _expected_measured_delta(c, VAR, RATE, inverted)
    # MOMENTUM**STEPS ~ 3e-5: the EMA has forgotten its start, the formula is the limit.
    assert abs(expected / expected_delta(c, VAR, RATE) - 1) < 1e-4
    assert abs(measured / expected - 1) < tol, (inverted, measured, expected, tol)
    deltas[inverted] = measured
    # Each feature alone, with its own standard error (FEATURES times the mean's variance).
    per_feature = shift.delta / expected - 1
    assert np.all(np.abs(per_feature) < (Z + 1) / Z * tol * math.sqrt(FEATURES))
  # Classic and inverted: the same delta within the tolerance of one measurement.
  assert abs(deltas[False] / deltas[True] - 1) < tol


def test_formula_is_inverted_dropouts():
  for c in (0.0, 0.5, 1.0, 3.0):
    for v in (0.5, 1.0, 2.0):
      for rate in (0.1, 0.4, 0.8):
        s2 = rate / (1 - rate)
        assert expected_delta(c, v, rate) == pytest.approx(v / (v + s2 * (c**2 + v)), rel=1e-12)
        var, _ = _train_moments(c, v, rate)
        # Monte-Carlo-free check of the train variance: E[y^2] - E[y]^2 with E[y^k] = keep E[x^k].
        keep = 1 - rate
        assert var == pytest.approx(keep * (v + c**2) - (keep * c) ** 2, rel=1e-12)
