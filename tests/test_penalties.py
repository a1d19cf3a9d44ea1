"""Tests of regjax.l1_penalty and regjax.l2_penalty against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import regjax


def _params(dtype=jnp.float32):
  """A flax-like params tree: Dense, Conv and BatchNorm layers."""
  rng = np.random.default_rng(0)

  def a(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return {
    "Conv_0": {"kernel": a(3, 3, 2, 4), "bias": a(4)},
    "BatchNorm_0": {"scale": a(4), "bias": a(4)},
    "Dense_0": {"kernel": a(36, 8), "bias": a(8)},
    "Dense_1": {"kernel": a(8, 3), "bias": a(3)},
  }


def _kernels(params):
  return [np.asarray(params[k]["kernel"], np.float64) for k in ("Conv_0", "Dense_0", "Dense_1")]


def _names(path):
  return tuple(str(p.key) for p in path)


def _mask(params, filter=regjax.default_max_norm_filter):
  """The selection as a pytree of bools (an optax mask)."""
  return jax.tree_util.tree_map_with_path(lambda p, leaf: filter(_names(p), leaf), params)


def test_reference_values_and_default_filter():
  params = _params()
  kernels = _kernels(params)
  l1 = regjax.l1_penalty(params)
  l2 = regjax.l2_penalty(params)
  assert l1.dtype == jnp.float32 and l1.shape == () and l2.dtype == jnp.float32
  np.testing.assert_allclose(float(l1), sum(np.abs(k).sum() for k in kernels), rtol=1e-6)
  np.testing.assert_allclose(float(l2), 0.5 * sum((k**2).sum() for k in kernels), rtol=1e-6)
  # Biases and BatchNorm scales are excluded: changing them changes nothing.
  other = jax.tree_util.tree_map_with_path(
    lambda p, leaf: leaf if _names(p)[-1] == "kernel" else leaf * 100, params
  )
  assert regjax.l2_penalty(other) == l2 and regjax.l1_penalty(other) == l1
  assert regjax.l2_penalty(params, None) == l2


def test_custom_filter_and_empty_selection():
  params = _params()

  def everything_but_bn(path, leaf):
    return path[0] != "BatchNorm_0"

  leaves = [
    np.asarray(v, np.float64)
    for k, layer in params.items()
    if k != "BatchNorm_0"
    for v in layer.values()
  ]
  np.testing.assert_allclose(
    float(regjax.l2_penalty(params, everything_but_bn)),
    0.5 * sum((v**2).sum() for v in leaves),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    float(regjax.l1_penalty(params, filter=everything_but_bn)),
    sum(np.abs(v).sum() for v in leaves),
    rtol=1e-6,
  )
  for penalty in (regjax.l1_penalty, regjax.l2_penalty):
    zero = penalty(params, lambda path, leaf: False)
    assert zero.dtype == jnp.float32 and float(zero) == 0.0
    assert float(penalty({})) == 0.0
    with pytest.raises(TypeError, match="`filter` must be a callable"):
      penalty(params, "kernel")
    with pytest.raises(TypeError, match="`params leaf Dense_0/step` must be a floating-point"):
      penalty({"Dense_0": {"step": jnp.ones((2, 2), jnp.int32)}}, lambda p, leaf: True)


def test_low_precision_leaves_accumulate_in_float32():
  params = _params(jnp.bfloat16)
  kernels = [np.asarray(k, np.float64) for k in _kernels(params)]  # the bf16 values, exactly
  l2 = regjax.l2_penalty(params)
  assert l2.dtype == jnp.float32
  np.testing.assert_allclose(float(l2), 0.5 * sum((k**2).sum() for k in kernels), rtol=1e-6)
  assert regjax.l1_penalty(params).dtype == jnp.float32


def test_gradients():
  params = _params()
  coeff = 0.3
  mask = _mask(params)
  grad = jax.grad(lambda p: coeff * regjax.l2_penalty(p))(params)
  for g, w, m in zip(
    jax.tree.leaves(grad), jax.tree.leaves(params), jax.tree.leaves(mask), strict=True
  ):
    np.testing.assert_allclose(np.asarray(g), coeff * np.asarray(w) * m, rtol=1e-6)
  grad = jax.jit(jax.grad(regjax.l1_penalty))(params)
  for g, w, m in zip(
    jax.tree.leaves(grad), jax.tree.leaves(params), jax.tree.leaves(mask), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(g), np.sign(np.asarray(w)) * m)


def _step(tx, loss, params):
  """One step of ``tx`` on ``loss`` from fresh optimizer state (one compilation)."""

  @jax.jit
  def step(params):
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
    return optax.apply_updates(params, updates)

  return step(params)


def _data_loss(params):
  x = jnp.linspace(-1.0, 1.0, 36 * 5).reshape(5, 36)
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return (
    jnp.mean((h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]) ** 2)
    + jnp.sum(params["Conv_0"]["kernel"] ** 3) * 1e-2
    + jnp.sum(params["BatchNorm_0"]["scale"] ** 2)
  )


def test_sgd_on_l2_penalty_is_add_decayed_weights_but_adam_is_not():
  params = _params()
  coeff, lr = 0.1, 0.05
  mask = _mask(params)

  def penalized(p):
    return _data_loss(p) + coeff * regjax.l2_penalty(p)

  coupled = _step(optax.sgd(lr), penalized, params)
  decayed = _step(
    optax.chain(optax.add_decayed_weights(coeff, mask=mask), optax.sgd(lr)), _data_loss, params
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6),
    coupled,
    decayed,
  )
  # The penalty acted: without it the kernels would have moved differently.
  plain = _step(optax.sgd(lr), _data_loss, params)
  assert not np.allclose(plain["Dense_0"]["kernel"], coupled["Dense_0"]["kernel"], atol=1e-4)
  np.testing.assert_array_equal(plain["Dense_0"]["bias"], coupled["Dense_0"]["bias"])

  # Adam: an L2 penalty in the loss is not decoupled weight decay.
  adam_l2 = _step(optax.adam(lr), penalized, params)
  adamw = _step(optax.adamw(lr, weight_decay=coeff, mask=mask), _data_loss, params)
  kernel_l2, kernel_w = (
    np.asarray(adam_l2["Dense_0"]["kernel"]),
    np.asarray(adamw["Dense_0"]["kernel"]),
  )
  assert np.max(np.abs(kernel_l2 - kernel_w)) > 1e-3
