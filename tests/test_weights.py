"""Tests of regjax.weights: DropConnect (dropconnect_dense) and the max-norm constraint."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import _DC_BIAS, _DC_KERNEL, Z, _dropconnect, _normal
from absl.testing import parameterized

import regjax


# ----------------------------------------------------------------------------
# DropConnect
class DropConnectTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_train_output_is_the_masked_kernel_product(self):
    rate = 0.4
    x = _normal(70, (16, 32))
    key = jax.random.key(71)
    y = self.variant(lambda x, k: _dropconnect(x, rate, key=k))(x, key)
    # DropConnect's mask is the one regjax.dropout draws for the kernel's shape.
    mask = np.asarray(regjax.dropout(jnp.ones(_DC_KERNEL.shape), rate, key=key)) != 0
    reference = np.asarray(x, np.float64) @ (np.asarray(_DC_KERNEL, np.float64) * mask) / (
      1 - rate
    ) + np.asarray(_DC_BIAS, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), reference, rtol=1e-5, atol=1e-5)
    assert 0.5 < mask.mean() < 0.7

  def test_mean_over_draws_is_the_eval_output(self):
    rate, draws = 0.5, 4000
    x = _normal(72, (4, 32))
    keys = jax.random.split(jax.random.key(73), draws)
    ys = np.asarray(jax.jit(jax.vmap(lambda k: _dropconnect(x, rate, key=k)))(keys), np.float64)
    eval_y = np.asarray(_dropconnect(x, rate, deterministic=True), np.float64)
    # Var of one draw: sum_i x_i**2 W_ij**2 * rate / (1 - rate), independent weights.
    var = (
      (np.asarray(x, np.float64) ** 2)
      @ (np.asarray(_DC_KERNEL, np.float64) ** 2)
      * (rate / (1 - rate))
    )
    np.testing.assert_array_less(np.abs(ys.mean(axis=0) - eval_y), Z * np.sqrt(var / draws))
    np.testing.assert_allclose(ys.var(axis=0), var, rtol=Z * math.sqrt(2 / draws) * 2)

  def test_rate_one_gives_the_bias(self):
    x = _normal(74, (4, 32))
    np.testing.assert_array_equal(
      np.asarray(_dropconnect(x, 1.0)), np.broadcast_to(np.asarray(_DC_BIAS), (4, 24))
    )
    grad = jax.jit(jax.grad(lambda x, r: jnp.sum(_dropconnect(x, r, key=jax.random.key(0)))))(
      x, 1.0
    )
    np.testing.assert_array_equal(np.asarray(grad), 0)

  def test_gradient_wrt_kernel_is_masked(self):
    x = _normal(75, (8, 32))
    key = jax.random.key(76)
    grad = jax.grad(lambda w: jnp.sum(regjax.dropconnect_dense(x, w, None, 0.5, key=key)))(
      _DC_KERNEL
    )
    mask = np.asarray(regjax.dropout(jnp.ones(_DC_KERNEL.shape), 0.5, key=key)) != 0
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0)
    np.testing.assert_allclose(
      np.asarray(grad)[mask],
      np.broadcast_to(2 * np.asarray(x).sum(axis=0)[:, None], mask.shape)[mask],
      rtol=1e-5,
    )

  def test_bad_shapes(self):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`kernel` must have shape \(in, out\)"):
      regjax.dropconnect_dense(jnp.ones((2, 31)), _DC_KERNEL, None, 0.5, key=key)
    with pytest.raises(ValueError, match=r"`bias` must have shape \(24,\)"):
      regjax.dropconnect_dense(jnp.ones((2, 32)), _DC_KERNEL, jnp.ones(3), 0.5, key=key)
    with pytest.raises(TypeError, match="`kernel` must be a floating-point array"):
      regjax.dropconnect_dense(jnp.ones((2, 32)), jnp.ones((32, 4), jnp.int32), None, 0.5, key=key)


# ----------------------------------------------------------------------------
# Max-norm
def _params():
  return {
    "Dense_0": {"kernel": 2.0 * _normal(80, (16, 8)), "bias": 10 * jnp.ones(8)},
    "Conv_0": {"kernel": _normal(81, (3, 3, 4, 6))},
    "Embed_0": {"embedding": 10 * _normal(82, (10, 4))},
    "BatchNorm_0": {"scale": 10 * jnp.ones(6)},
  }


def _unit_norms(kernel, axes=None):
  kernel = np.asarray(kernel, np.float64)
  axes = tuple(range(kernel.ndim - 1)) if axes is None else axes
  return np.sqrt((kernel**2).sum(axis=axes))


class MaxNormTest(parameterized.TestCase):
  def test_projects_units_outside_the_ball_and_leaves_the_rest(self):
    c = 6.0
    params = _params()
    out = regjax.max_norm(params, c)
    for layer in ("Dense_0", "Conv_0"):
      before, after = params[layer]["kernel"], out[layer]["kernel"]
      norms_before, norms_after = _unit_norms(before), _unit_norms(after)
      inside = norms_before <= c
      assert inside.any() and (~inside).any(), layer  # the test covers both cases
      np.testing.assert_array_less(norms_after, c * (1 + 1e-6))
      np.testing.assert_allclose(norms_after[~inside], c, rtol=1e-6)
      b, a = np.asarray(before), np.asarray(after)
      np.testing.assert_array_equal(a[..., inside], b[..., inside])  # bit for bit
      # Projected units keep their direction.
      np.testing.assert_allclose(
        a[..., ~inside] * (norms_before[~inside] / c), b[..., ~inside], rtol=1e-5
      )
    # Biases, embeddings and BN scales are not kernels: the same objects come back.
    for layer, name in (("Dense_0", "bias"), ("Embed_0", "embedding"), ("BatchNorm_0", "scale")):
      assert out[layer][name] is params[layer][name]

  def test_filter_and_axis(self):
    params = _params()

    def only_dense(path, leaf):
      return path[0].startswith("Dense") and path[-1] == "kernel"

    out = regjax.max_norm(params, 1.0, filter=only_dense)
    assert out["Conv_0"]["kernel"] is params["Conv_0"]["kernel"]
    np.testing.assert_array_less(_unit_norms(out["Dense_0"]["kernel"]), 1 + 1e-6)
    # Keras' axis=0 on a conv kernel: one norm per (kh, kw) position and channel pair instead.
    conv = regjax.max_norm(params, 1.0, axis=0)["Conv_0"]["kernel"]
    np.testing.assert_array_less(_unit_norms(conv, axes=(0,)), 1 + 1e-6)
    assert _unit_norms(conv).max() > 1.5

    def everything(path, leaf):
      return leaf.ndim >= 1

    out = regjax.max_norm(params, 1.0, filter=everything, axis=0)
    assert np.all(np.abs(np.asarray(out["Dense_0"]["bias"])) <= 1 + 1e-6)

  def test_half_precision_leaf(self):
    kernel = (3.0 * _normal(81, (64, 16))).astype(jnp.bfloat16)
    out = regjax.max_norm({"kernel": kernel}, 2.0)["kernel"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_less(_unit_norms(out), 2.0 * (1 + 2**-7))

  def test_after_apply_updates_in_a_jitted_step_and_as_an_optax_transformation(self):
    c = 0.5
    x = _normal(82, (64, 16))
    target = _normal(83, (64, 8))
    params = {"Dense_0": {"kernel": 0.1 * _normal(84, (16, 8)), "bias": jnp.zeros(8)}}

    def loss(p):
      return jnp.mean((x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] - target) ** 2)

    sgd = optax.sgd(0.5)
    chained = optax.chain(optax.sgd(0.5), regjax.max_norm_projection(c))

    @jax.jit
    def step(params, chained_params, state, chained_state):
      updates, state = sgd.update(jax.grad(loss)(params), state, params)
      params = regjax.max_norm(optax.apply_updates(params, updates), c)
      updates, chained_state = chained.update(
        jax.grad(loss)(chained_params), chained_state, chained_params
      )
      return params, optax.apply_updates(chained_params, updates), state, chained_state

    state, chained_state, chained_params = sgd.init(params), chained.init(params), params
    for _ in range(20):
      params, chained_params, state, chained_state = step(
        params, chained_params, state, chained_state
      )
      for p in (params, chained_params):
        np.testing.assert_array_less(_unit_norms(p["Dense_0"]["kernel"]), c * (1 + 1e-6))
    assert _unit_norms(params["Dense_0"]["kernel"]).max() > c * (1 - 1e-6)  # it was binding
    np.testing.assert_allclose(
      np.asarray(chained_params["Dense_0"]["kernel"]),
      np.asarray(params["Dense_0"]["kernel"]),
      rtol=1e-4,
      atol=1e-6,
    )
    # The bias is unconstrained and its update passes through unchanged.
    np.testing.assert_allclose(
      np.asarray(chained_params["Dense_0"]["bias"]),
      np.asarray(params["Dense_0"]["bias"]),
      rtol=1e-4,
      atol=1e-6,
    )

  def test_bad_arguments(self):
    params = _params()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
      with pytest.raises(ValueError, match=r"`max_value` must be in \(0, inf\)"):
        regjax.max_norm(params, bad)
    with pytest.raises(TypeError, match="`filter` must be a callable"):
      regjax.max_norm(params, 1.0, filter="kernel")
    with pytest.raises(TypeError, match="`params leaf step` must be a floating-point array"):
      regjax.max_norm({"step": jnp.ones((2, 2), jnp.int32)}, 1.0, filter=lambda p, leaf: True)
    with pytest.raises(ValueError, match="no axis to take norms over"):
      regjax.max_norm({"b": jnp.ones(3)}, 1.0, filter=lambda p, leaf: True)
    tx = regjax.max_norm_projection(1.0)
    with pytest.raises(ValueError, match="needs the current params"):
      tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match=r"`max_value` must be in \(0, inf\)"):
      regjax.max_norm_projection(-2.0)
    with pytest.raises(TypeError, match="`filter` must be a callable"):
      regjax.max_norm_projection(1.0, filter=["kernel"])
