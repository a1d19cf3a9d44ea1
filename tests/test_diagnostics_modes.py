"""regjax.diagnostics on BatchRenorm, BatchNorm without running statistics, and ghost BN.

BatchRenorm is measured and recalibrated as a BatchNorm (its eval mode is
BatchNorm's); a BatchNorm with ``track_running_stats=False`` is skipped (no
LayerShift, no statistics, its call runs unchanged); a ghost BatchNorm
(``virtual_batch_size``) is a plain BatchNorm for the diagnostics. Linen and NNX.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import regjax.linen as rnn
import regjax.nnx as rx
from regjax import diagnostics
from regjax.linen.normalization import BatchRenorm as LinenBatchRenorm
from regjax.nnx.normalization import BatchRenorm as NNXBatchRenorm

F = 4
SIZES = (16, 24, 8)  # unequal batches, multiples of the ghost batch size
EPS = 1e-5


def _batches(seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SIZES))
  return [
    2.0 * (i + 1) + (i + 1) * jax.random.normal(k, (n, F))
    for i, (k, n) in enumerate(zip(keys, SIZES, strict=True))
  ]


def _pooled(arrays):
  data = np.concatenate([np.asarray(a, np.float64) for a in arrays])
  return data.mean(0), data.var(0)


def _per_batch_normalized(batches):
  """What a BatchNorm without running statistics outputs: each batch by its own statistics."""
  out = []
  for b in batches:
    b = np.asarray(b, np.float64)
    out.append((b - b.mean(0)) / np.sqrt(b.var(0) + EPS))
  return out


class LinenModes(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = rnn.BatchNorm(deterministic=not train, track_running_stats=False, name="no_stats")(x)
    a = LinenBatchRenorm(deterministic=not train, name="renorm")(h)
    b = rnn.BatchNorm(deterministic=not train, virtual_batch_size=8, name="ghost")(x)
    return a + b


class NNXModes(nnx.Module):
  def __init__(self, rngs):
    self.no_stats = rx.BatchNorm(F, track_running_stats=False, rngs=rngs)
    self.renorm = NNXBatchRenorm(F, rngs=rngs)
    self.ghost = rx.BatchNorm(F, virtual_batch_size=8, rngs=rngs)

  def __call__(self, x):
    return self.renorm(self.no_stats(x)) + self.ghost(x)


def _stats(rng):
  return {
    "mean": jnp.asarray(rng.normal(size=F), jnp.float32),
    "var": jnp.asarray(rng.uniform(0.5, 2.0, F), jnp.float32),
  }


def _linen_setup():
  model = LinenModes()
  batches = _batches()
  variables = model.init(jax.random.key(0), batches[0])
  rng = np.random.default_rng(1)
  assert set(variables["batch_stats"]) == {"renorm", "ghost"}  # no_stats has none
  variables = {**variables, "batch_stats": {"renorm": _stats(rng), "ghost": _stats(rng)}}
  return model, variables, batches


def _nnx_setup():
  model = NNXModes(nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for layer in (model.renorm, model.ghost):
    stats = _stats(rng)
    layer.mean[...], layer.var[...] = stats["mean"], stats["var"]
  return model, _batches()


def _nnx_stats(model):
  return {n: {"mean": getattr(model, n).mean[...], "var": getattr(model, n).var[...]}
          for n in ("renorm", "ghost")}  # fmt: skip


def _check_shifts(shifts, stats, batches):
  assert list(shifts) == ["renorm", "ghost"]  # call order; no LayerShift for no_stats
  inputs = {"renorm": _per_batch_normalized(batches), "ghost": batches}
  for name, shift in shifts.items():
    np.testing.assert_array_equal(shift.moving_mean, np.asarray(stats[name]["mean"], np.float64))
    np.testing.assert_array_equal(shift.moving_var, np.asarray(stats[name]["var"], np.float64))
    mean, var = _pooled(inputs[name])
    np.testing.assert_allclose(shift.real_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shift.real_var, var, rtol=1e-5)
    assert shift.count == sum(SIZES)


def _check_recalibrated(new, batches):
  # renorm sees what the no-statistics layer really outputs (each batch normalized
  # by itself, so the pooled mean is ~0 and the variance ~1): that layer ran unchanged.
  for name, data in (("renorm", _per_batch_normalized(batches)), ("ghost", batches)):
    mean, var = _pooled(data)  # the population of all samples, not per group
    np.testing.assert_allclose(np.asarray(new[name]["mean"]), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new[name]["var"]), var, rtol=1e-5)


def test_linen_variance_shift_and_recalibration():
  model, variables, batches = _linen_setup()
  eval_apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
  shifts = diagnostics.variance_shift(eval_apply, variables, batches)
  _check_shifts(shifts, variables["batch_stats"], batches)
  new = diagnostics.recalibrate_batch_stats(eval_apply, variables, batches)
  assert jax.tree.structure(new) == jax.tree.structure(variables["batch_stats"])
  _check_recalibrated(new, batches)
  model.apply({**variables, "batch_stats": new}, batches[0])  # loads and runs


def test_nnx_variance_shift_and_recalibration():
  model, batches = _nnx_setup()
  before = jax.tree.map(np.asarray, nnx.state(model))
  shifts = diagnostics.variance_shift(model, batches)
  _check_shifts(shifts, _nnx_stats(model), batches)
  new = diagnostics.recalibrate_batch_stats(model, batches)
  paths = {path for path, _ in nnx.to_flat_state(new)}
  assert paths == {("renorm", "mean"), ("renorm", "var"), ("ghost", "mean"), ("ghost", "var")}
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), before)
  nnx.update(model, new)
  _check_recalibrated(_nnx_stats(model), batches)
  assert model.no_stats.mean is None and model.no_stats.var is None


def test_linen_and_nnx_agree():
  linen_model, variables, batches = _linen_setup()
  nnx_model, _ = _nnx_setup()
  eval_apply = lambda v, x: linen_model.apply(v, x, train=False)  # noqa: E731
  linen_new = diagnostics.recalibrate_batch_stats(eval_apply, variables, batches)
  nnx.update(nnx_model, diagnostics.recalibrate_batch_stats(nnx_model, batches))
  for name in ("renorm", "ghost"):
    for stat in ("mean", "var"):
      np.testing.assert_allclose(
        np.asarray(getattr(getattr(nnx_model, name), stat)[...]),
        np.asarray(linen_new[name][stat]),
        rtol=1e-6,
        atol=1e-6,
      )


def test_only_layers_without_running_statistics_is_an_error_that_says_so():
  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
      return rnn.BatchNorm(track_running_stats=False)(x)

  batches = _batches()
  model = Linen()
  variables = model.init(jax.random.key(0), batches[0])
  for fn in (diagnostics.variance_shift, diagnostics.recalibrate_batch_stats):
    with pytest.raises(ValueError, match="track_running_stats=False"):
      fn(lambda v, x: model.apply(v, x), variables, batches)
    nnx_model = nnx.Sequential(rx.BatchNorm(F, track_running_stats=False, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="track_running_stats=False"):
      fn(nnx_model, batches)


def test_batch_renorm_is_recalibrated_with_its_own_conventions():
  # unbiased_running_var and a non-default epsilon are honoured as for BatchNorm, and
  # recalibrated BatchRenorm statistics equal recalibrated BatchNorm statistics.
  batches = _batches(seed=3)
  kw = dict(unbiased_running_var=True, epsilon=1e-3)
  renorm = NNXBatchRenorm(F, **kw, rngs=nnx.Rngs(0))
  bn = rx.BatchNorm(F, **kw, rngs=nnx.Rngs(0))
  new_renorm = diagnostics.recalibrate_batch_stats(renorm, batches)
  new_bn = diagnostics.recalibrate_batch_stats(bn, batches)
  jax.tree.map(np.testing.assert_array_equal, new_renorm, new_bn)
  data = np.concatenate([np.asarray(b, np.float64) for b in batches])
  np.testing.assert_allclose(np.asarray(new_renorm["var"][...]), data.var(0, ddof=1), rtol=1e-5)
