"""regjax.equinox.BatchNorm / BatchRenorm: per example under jax.vmap with axis_name, as equinox."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regjax
import regjax.equinox as rq

# float32 outputs of order 1: a few ulps of the two-pass statistics (see tests/_helpers.py).
TOL = 1e-5


def _data(shape, seed=0, loc=0.0, scale=1.0):
  x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  return (loc + scale * x).astype(jnp.float32)


def _vmapped(layer, **kwargs):
  """``layer`` over a batch, one example per call, the batch named 'batch' (equinox's way)."""
  return jax.vmap(
    lambda x, s: layer(x, s, **kwargs), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
  )


@eqx.filter_jit
def _run(layer, x, state, kwargs):
  """``_vmapped(layer, **kwargs)(x, state)``, compiled once per layer structure and shapes."""
  return _vmapped(layer, **kwargs)(x, state)


def _clone(state):
  """A copy of ``state``: an eager (unjitted) call invalidates the state it is given."""
  leaves, treedef = jax.tree_util.tree_flatten(state)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _stats(layer, state):
  return {k: np.asarray(v) for k, v in state.get(layer.state_index).items()}


def _reference(x64, axes, mean=None, var=None, eps=1e-5):
  """float64 batch norm over ``axes`` (or with the given statistics)."""
  if mean is None:
    mean = x64.mean(axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axes, keepdims=True)
  return (x64 - mean) / np.sqrt(var + eps)


def test_vmap_equals_batch_norm_on_the_batch_and_eqx_batch_mode():
  x = _data((16, 3, 5, 5), loc=2.0, scale=3.0)  # a batch of channels-first images
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(3, "batch", momentum=0.9)
  y, new_state = _run(bn, x, state, {})
  expected, expected_stats = jax.jit(regjax.batch_norm, static_argnames="axis")(
    x, regjax.init_batch_stats(3), axis=1, momentum=0.9
  )
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=TOL, atol=TOL)
  for name in ("mean", "var"):
    np.testing.assert_allclose(
      _stats(bn, new_state)[name], np.asarray(expected_stats[name]), rtol=TOL, atol=TOL
    )
  ebn, estate = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", momentum=0.9, mode="batch")
  ey, estate = _run(ebn, x, estate, {})
  np.testing.assert_allclose(np.asarray(y), np.asarray(ey), rtol=TOL, atol=TOL)
  # equinox's batch mode stores the same running averages (it debiases them in inference)
  emean, evar = estate.get(ebn.batch_state_index)
  np.testing.assert_allclose(_stats(bn, new_state)["mean"], np.asarray(emean), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(_stats(bn, new_state)["var"], np.asarray(evar), rtol=TOL, atol=TOL)
  ref = _reference(np.asarray(x, np.float64), (0, 2, 3))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=TOL, atol=TOL)


def test_state_updates_and_inference_uses_running_statistics():
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch", momentum=0.8, eps=1e-3)
  mean, var = np.zeros(4), np.ones(4)
  for step in range(3):
    x = _data((32, 4), seed=step, loc=1.0, scale=2.0)
    _, state = _run(bn, x, state, {})
    x64 = np.asarray(x, np.float64)
    mean = 0.8 * mean + 0.2 * x64.mean(0)
    var = 0.8 * var + 0.2 * x64.var(0)
  np.testing.assert_allclose(_stats(bn, state)["mean"], mean, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(_stats(bn, state)["var"], var, rtol=TOL, atol=TOL)
  x = _data((8, 4), seed=9)
  before = _stats(bn, state)
  for layer, kwargs in ((bn, {"inference": True}), (eqx.nn.inference_mode(bn), {})):
    y, state = _run(layer, x, state, kwargs)
    expected = _reference(np.asarray(x, np.float64), None, mean, var, eps=1e-3)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=TOL, atol=TOL)
    after = _stats(bn, state)
    for name in ("mean", "var"):
      np.testing.assert_array_equal(after[name], before[name])  # inference: state unchanged


def test_jit_equals_eager_and_gradients_flow():
  # As regjax.batch_norm's, eager and jitted statistics agree to float32 rounding
  # (XLA fuses the jitted reductions), with and without a named axis.
  flat, flat_state = eqx.nn.make_with_state(rq.BatchNorm)(4, axis=-1)
  x = _data((8, 4), loc=3.0)
  step = lambda layer, x, s: layer(x, s)  # noqa: E731
  eager, eager_state = step(flat, x, _clone(flat_state))
  jitted, jitted_state = eqx.filter_jit(step)(flat, x, flat_state)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=TOL, atol=TOL)
  for name in ("mean", "var"):
    np.testing.assert_allclose(
      _stats(flat, eager_state)[name], _stats(flat, jitted_state)[name], rtol=TOL, atol=TOL
    )
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch")
  eager, _ = _vmapped(bn)(x, state)
  jitted, jitted_state = _run(bn, x, state, {})
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=TOL, atol=TOL)

  def loss(layer, state):
    y, _ = _vmapped(layer)(x, state)
    return jnp.sum(y * jnp.arange(4.0))

  grads = eqx.filter_jit(eqx.filter_grad(loss))(bn, jitted_state)
  # dL/dbias = sum over the batch of the weights 0..3; dL/dweight = sum(xhat * w) = 0
  np.testing.assert_allclose(np.asarray(grads.bias), 8 * np.arange(4.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grads.weight), 0.0, atol=1e-4)


def test_in_sequential_with_make_with_state():
  def make(key):
    return eqx.nn.Sequential(
      [eqx.nn.Linear(5, 4, key=key), rq.BatchNorm(4, "batch"), eqx.nn.Lambda(jax.nn.relu)]
    )

  model, state = eqx.nn.make_with_state(make)(jax.random.key(0))
  x = _data((6, 5))
  y, state = _run(model, x, state, {})
  assert y.shape == (6, 4)
  hidden = x @ model.layers[0].weight.T + model.layers[0].bias
  expected, _ = jax.jit(regjax.batch_norm)(hidden, regjax.init_batch_stats(4))
  np.testing.assert_allclose(np.asarray(y), np.asarray(jax.nn.relu(expected)), rtol=TOL, atol=TOL)


def test_large_mean_stays_accurate():
  # mean 1e4, std 1: float32 keeps ~1e-3 of the spread; the shifted sums keep it.
  x = _data((256, 4), seed=3, loc=1e4, scale=1.0)
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch")
  y, state = _run(bn, x, state, {})
  x64 = np.asarray(x, np.float64)
  assert np.abs(np.asarray(y) - _reference(x64, 0)).max() < 1e-2
  np.testing.assert_allclose(_stats(bn, state)["var"], 0.99 + 0.01 * x64.var(0), rtol=1e-4)


def test_without_axis_name_the_batch_is_an_axis_of_x():
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, axis=-1)
  x = _data((8, 4))
  y, state = bn(x, _clone(state))
  expected, stats = regjax.batch_norm(x, regjax.init_batch_stats(4))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
  np.testing.assert_array_equal(_stats(bn, state)["mean"], np.asarray(stats["mean"]))
  with pytest.raises(ValueError, match=r"needs a batch axis"):
    eqx.nn.make_with_state(rq.BatchNorm)(4)[0](x[0], state)


def test_dtype_rules():
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch", dtype=jnp.bfloat16)
  assert bn.weight.dtype == jnp.bfloat16 and _stats(bn, state)["mean"].dtype == np.float32
  x = _data((8, 4)).astype(jnp.bfloat16)
  y, state = _run(bn, x, state, {})
  assert y.dtype == jnp.bfloat16 and _stats(bn, state)["var"].dtype == np.float32
  bn32, state32 = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch")
  assert _run(bn32, x, state32, {})[0].dtype == jnp.float32  # result type of x and params


def test_track_running_stats_false_uses_batch_statistics_in_both_modes():
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch", track_running_stats=False)
  assert bn.state_index is None
  x = _data((8, 4), loc=5.0)
  train, state = _run(bn, x, state, {})
  infer, state = _run(bn, x, state, {"inference": True})
  np.testing.assert_array_equal(np.asarray(train), np.asarray(infer))
  np.testing.assert_allclose(
    np.asarray(train), _reference(np.asarray(x, np.float64), 0), rtol=TOL, atol=TOL
  )


def test_mask_selects_the_examples_in_the_statistics():
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch")
  x = _data((8, 4))
  keep = jnp.arange(8) < 5
  y, _ = jax.vmap(
    lambda x, m, s: bn(x, s, mask=m), axis_name="batch", in_axes=(0, 0, None), out_axes=(0, None)
  )(x, keep, state)
  expected, _ = regjax.batch_norm(x, regjax.init_batch_stats(4), mask=keep[:, None])
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=TOL, atol=TOL)


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"'ema' mode is not supported"):
    rq.BatchNorm(4, "batch", mode="ema")
  with pytest.raises(ValueError, match=r"input_size"):
    rq.BatchNorm(0, "batch")
  with pytest.raises(ValueError, match=r"momentum"):
    rq.BatchNorm(4, "batch", momentum=1.5)
  bn, state = eqx.nn.make_with_state(rq.BatchNorm)(4, "batch")
  with pytest.raises(ValueError, match=r"not `input_size`=4"):
    _run(bn, _data((8, 3)), state, {})


def test_batch_renorm_under_vmap():
  x = _data((16, 3), loc=1.0, scale=2.0)
  layer, state = eqx.nn.make_with_state(rq.BatchRenorm)(3, "batch", r_max=2.0, d_max=0.5)
  stats = {"mean": jnp.full(3, 0.5, jnp.float32), "var": jnp.full(3, 2.0, jnp.float32)}
  state = state.set(layer.state_index, stats)
  y, new_state = _run(layer, x, state, {})
  expected, expected_stats = jax.jit(regjax.batch_renorm)(x, stats, r_max=2.0, d_max=0.5)
  np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(
    _stats(layer, new_state)["var"], np.asarray(expected_stats["var"]), rtol=TOL, atol=TOL
  )
  # r_max=1, d_max=0 at call (traced) is BatchNorm; inference is BatchNorm's
  bn, bn_state = eqx.nn.make_with_state(rq.BatchNorm)(3, "batch")
  y_bn, _ = _run(bn, x, bn_state, {})
  plain, _ = _run(layer, x, new_state, {"r_max": jnp.float32(1.0), "d_max": jnp.float32(0.0)})
  np.testing.assert_allclose(np.asarray(plain), np.asarray(y_bn), rtol=TOL, atol=TOL)
  infer, _ = _run(layer, x, new_state, {"inference": True})
  stats = _stats(layer, new_state)
  expected = _reference(np.asarray(x, np.float64), None, stats["mean"], stats["var"])
  np.testing.assert_allclose(np.asarray(infer), expected, rtol=TOL, atol=TOL)
  with pytest.raises(ValueError, match=r"r_max"):
    rq.BatchRenorm(3, "batch", r_max=0.5)
