"""Contracts every linen module shares: traced ``deterministic``, flax
transforms (jit, remat, scan, vmap), serialization and reproducibility.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import MODULES, NAMES, TRACED_MSG, X
from flax import serialization

import regjax.linen as rl


def linen_apply(module, key, x=X, deterministic=False):
  variables = module.init({"params": jax.random.key(0)}, x, deterministic=True)
  return module.apply(variables, x, deterministic=deterministic, rngs={"dropout": key})


# --- 1. a traced `deterministic` -------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_linen_traced_deterministic_raises_clear_type_error(name):
  module = MODULES[name][0]
  variables = module.init({"params": jax.random.key(0)}, X, deterministic=True)

  @jax.jit
  def f(deterministic):
    return module.apply(
      variables, X, deterministic=deterministic, rngs={"dropout": jax.random.key(1)}
    )

  with pytest.raises(TypeError, match=TRACED_MSG) as info:
    f(False)
  assert f"regjax.linen.{name}" in str(info.value)
  assert "jax.lax.cond" in str(info.value) and "static_argnums" in str(info.value)


def test_static_deterministic_under_jit_works():
  module = rl.Dropout(0.5)
  f = jax.jit(
    lambda d: module.apply({}, X, deterministic=d, rngs={"dropout": jax.random.key(0)}),
    static_argnums=0,
  )
  np.testing.assert_array_equal(f(True), X)
  assert not np.array_equal(f(False), X)


# --- linen transforms -----------------------------------------------------------------
class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(3)(x)
    return rl.Dropout(0.5)(x, deterministic=not train)


def test_linen_under_nn_jit():
  x = X.reshape(-1, 3)
  params = Block().init(jax.random.key(0), x, train=False)
  key = jax.random.key(1)
  # nn.jit forks the rng streams (flax.linen.Dropout's mask changes too), so the
  # jitted draw is compared with itself and, with rng_impl='jax', with flax's.
  jitted = nn.jit(Block)().apply(params, x, rngs={"dropout": key})
  again = nn.jit(Block)().apply(params, x, rngs={"dropout": key})
  np.testing.assert_array_equal(jitted, again)
  other = nn.jit(Block)().apply(params, x, rngs={"dropout": jax.random.key(2)})
  assert not np.array_equal(jitted, other)
  eager = Block().apply(params, x, rngs={"dropout": key})
  via_jax_jit = jax.jit(lambda p, k: Block().apply(p, x, rngs={"dropout": k}))(params, key)
  np.testing.assert_allclose(via_jax_jit, eager, rtol=1e-6)

  class Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
      return rl.Dropout(0.5, deterministic=False, rng_impl="jax")(x)

  class Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dropout(0.5, deterministic=False)(x)

  ours = nn.jit(Ours)().apply({}, x, rngs={"dropout": key})
  np.testing.assert_array_equal(ours, nn.jit(Flax)().apply({}, x, rngs={"dropout": key}))


def test_linen_under_nn_remat_matches_and_differentiates():
  x = X.reshape(-1, 3)
  params = Block().init(jax.random.key(0), x, train=False)
  key = jax.random.key(1)

  def loss(cls, p):
    return jnp.sum(cls().apply(p, x, rngs={"dropout": key}) ** 2)

  np.testing.assert_allclose(loss(nn.remat(Block), params), loss(Block, params), rtol=1e-6)
  g_remat = jax.grad(lambda p: loss(nn.remat(Block), p))(params)
  g_plain = jax.grad(lambda p: loss(Block, p))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_remat, g_plain
  )


class Step(nn.Module):
  @nn.compact
  def __call__(self, carry, x):
    return carry, rl.Dropout(0.5, deterministic=False)(x)


def test_linen_under_nn_scan_draws_a_new_mask_each_step():
  scan = nn.scan(
    Step,
    variable_broadcast="params",
    split_rngs={"params": False, "dropout": True},
    in_axes=0,
    out_axes=0,
  )
  xs = jnp.ones((4, 64))

  def run(seed):
    return scan().apply({}, None, xs, rngs={"dropout": jax.random.key(seed)})[1]

  ys = run(0)
  assert ys.shape == xs.shape
  for i in range(4):
    for j in range(i):
      assert not np.array_equal(ys[i], ys[j])
  np.testing.assert_array_equal(run(0), ys)
  assert not np.array_equal(run(1), ys)


class Member(nn.Module):
  @nn.compact
  def __call__(self, x):
    return rl.Dropout(0.5, deterministic=False)(x)


@pytest.mark.parametrize("split", [True, False])
def test_linen_under_nn_vmap(split):
  vmapped = nn.vmap(Member, variable_axes={}, split_rngs={"dropout": split}, in_axes=0, out_axes=0)
  xs = jnp.ones((4, 64))

  def run(seed):
    return vmapped().apply({}, xs, rngs={"dropout": jax.random.key(seed)})

  ys = run(0)
  for i in range(1, 4):
    assert np.array_equal(ys[i], ys[0]) != split  # split: each member its own mask
  np.testing.assert_array_equal(run(0), ys)


@pytest.mark.parametrize("name", NAMES)
def test_linen_serialization_round_trip(name):
  module = MODULES[name][0]
  variables = module.init({"params": jax.random.key(0)}, X, deterministic=True)
  restored = serialization.from_bytes(variables, serialization.to_bytes(variables))
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  key = jax.random.key(4)
  np.testing.assert_array_equal(
    module.apply(restored, X, deterministic=False, rngs={"dropout": key}),
    module.apply(variables, X, deterministic=False, rngs={"dropout": key}),
  )


@pytest.mark.parametrize("name", NAMES)
def test_linen_same_key_same_output(name):
  module = MODULES[name][0]
  a = linen_apply(module, jax.random.key(7))
  b = linen_apply(module, jax.random.key(7))
  np.testing.assert_array_equal(a, b)
  if name != "DropPath":
    assert not np.array_equal(a, linen_apply(module, jax.random.key(8)))
