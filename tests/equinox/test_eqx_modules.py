"""Every regjax.equinox noise module: equals its function, inference mode, dtype, jit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regjax
import regjax.equinox as rq

KEY = jax.random.key(3)


def _normal(shape, dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


# (module, the function with the same options: f(x, key, deterministic), input shape)
CASES = {
  "Dropout": (
    rq.Dropout(0.3, broadcast_dims=(0,)),
    lambda x, k, d: regjax.dropout(x, 0.3, key=k, deterministic=d, broadcast_dims=(0,)),
    (6, 32),
  ),
  "Dropout-classic": (
    rq.Dropout(0.3, inverted=False, rng_impl="jax"),
    lambda x, k, d: regjax.dropout(x, 0.3, key=k, deterministic=d, inverted=False, rng_impl="jax"),
    (6, 32),
  ),
  "GaussianDropout": (
    rq.GaussianDropout(0.2),
    lambda x, k, d: regjax.gaussian_dropout(x, 0.2, key=k, deterministic=d),
    (6, 32),
  ),
  "Uout": (rq.Uout(0.5), lambda x, k, d: regjax.uout(x, 0.5, key=k, deterministic=d), (6, 32)),
  "AlphaDropout": (
    rq.AlphaDropout(0.1),
    lambda x, k, d: regjax.alpha_dropout(x, 0.1, key=k, deterministic=d),
    (6, 32),
  ),
  "GaussianNoise": (
    rq.GaussianNoise(0.4),
    lambda x, k, d: regjax.gaussian_noise(x, 0.4, key=k, deterministic=d),
    (6, 32),
  ),
  "ChannelDropout": (
    rq.ChannelDropout(0.5, channel_axis=1),
    lambda x, k, d: regjax.channel_dropout(x, 0.5, key=k, deterministic=d, channel_axis=1),
    (4, 3, 8, 8),
  ),
  "DropPath": (
    rq.DropPath(0.5, mode="row"),
    lambda x, k, d: regjax.drop_path(x, 0.5, key=k, deterministic=d),
    (8, 5),
  ),
  "DropBlock": (
    rq.DropBlock(0.2, block_size=3, data_format="NCHW"),
    lambda x, k, d: regjax.dropblock(
      x, 0.2, key=k, deterministic=d, block_size=3, data_format="NCHW"
    ),
    (2, 3, 8, 8),
  ),
  "Cutout": (
    rq.Cutout(3, probability=0.7, fill="random"),
    lambda x, k, d: regjax.cutout(x, 3, key=k, deterministic=d, probability=0.7, fill="random"),
    (4, 8, 8, 3),
  ),
  "RandomErasing": (
    rq.RandomErasing(0.9, area=(0.1, 0.3), fill=1.0),
    lambda x, k, d: regjax.random_erasing(
      x, 0.9, key=k, deterministic=d, area=(0.1, 0.3), fill=1.0
    ),
    (4, 8, 8, 3),
  ),
  "JoinDropPath": (
    rq.JoinDropPath(0.4),
    lambda x, k, d: regjax.join_drop_path(x, 0.4, key=k, deterministic=d),
    (3, 4, 5),
  ),
}
IDENTITY_IN_INFERENCE = set(CASES) - {"Dropout-classic", "JoinDropPath"}


def _call(m, x, k):
  return m(x, key=k)


# Compiled once per module structure and input shape, shared by the tests.
_jit_call = eqx.filter_jit(_call)


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_equals_function_and_jit_equals_eager(name):
  module, fn, shape = CASES[name]
  x = _normal(shape)
  y = module(x, key=KEY)  # eager
  # the function, jitted (eager == jit for the functions: tests/test_contracts.py)
  expected = jax.jit(lambda x, k: fn(x, k, False))(x, KEY)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
  assert not np.array_equal(np.asarray(y), np.asarray(fn(x, None, True)))  # it is noisy
  jitted = _jit_call(module, x, KEY)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(y))


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_mode_from_field_call_and_inference_mode(name):
  module, fn, shape = CASES[name]
  x = _normal(shape)
  expected = np.asarray(fn(x, None, True))
  for y in (
    module(x, inference=True),
    eqx.nn.inference_mode(module)(x),
    eqx.tree_at(lambda m: m.inference, module, True)(x, key=KEY),
  ):
    np.testing.assert_array_equal(np.asarray(y), expected)
    if name in IDENTITY_IN_INFERENCE:
      assert y is x
  train = np.asarray(_jit_call(module, x, KEY))
  back = eqx.nn.inference_mode(eqx.nn.inference_mode(module), value=False)
  np.testing.assert_array_equal(np.asarray(_jit_call(back, x, KEY)), train)
  # inference=False at call overrides an inference-mode field
  override = eqx.filter_jit(lambda m, x, k: m(x, key=k, inference=False))
  np.testing.assert_array_equal(np.asarray(override(eqx.nn.inference_mode(module), x, KEY)), train)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_dtype_and_shape_kept(name, dtype):
  module, _, shape = CASES[name]
  x = jax.ShapeDtypeStruct(shape, dtype)
  y = jax.eval_shape(lambda x: module(x, key=KEY), x)  # the dtype rule is decided at trace time
  expected_shape = shape[1:] if name == "JoinDropPath" else shape
  assert y.dtype == dtype and y.shape == expected_shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_without_a_key_raises(name):
  module, _, shape = CASES[name]
  with pytest.raises(RuntimeError, match=r"needs a key: pass `key="):
    module(_normal(shape))


def test_traced_inference_raises_a_type_error():
  with pytest.raises(TypeError, match=r"`inference` must be a Python bool"):
    jax.jit(lambda x, b: rq.Dropout(0.5)(x, key=KEY, inference=b))(jnp.ones(4), True)


def test_a_traced_strength_is_the_functions_traced_rate():
  x = _normal((2, 8, 8, 3))

  @eqx.filter_jit
  def f(module, x):
    return module(x, key=KEY)

  for rate in (0.1, 0.6):
    module = rq.DropBlock(jnp.float32(rate), block_size=3)
    y = f(module, x)
    expected = jax.jit(regjax.dropblock, static_argnames="block_size")(
      x, jnp.float32(rate), key=KEY, block_size=3
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
  assert f._cached._cache_size() == 1  # one compilation for the schedule


def test_bad_strength_raises_at_construction():
  with pytest.raises(ValueError, match=r"rate"):
    rq.GaussianDropout(1.0)
  with pytest.raises(ValueError, match=r"beta"):
    rq.Uout(-0.1)
  with pytest.raises(ValueError, match=r"rng_impl"):
    rq.Dropout(0.5, rng_impl="numpy")


def test_dropconnect_is_eqx_linear_in_inference_and_the_function_in_training():
  key = jax.random.key(5)
  module = rq.DropConnect(7, 4, key=key, rate=0.4)
  linear = eqx.nn.Linear(7, 4, key=key)
  np.testing.assert_array_equal(np.asarray(module.weight), np.asarray(linear.weight))
  np.testing.assert_array_equal(np.asarray(module.bias), np.asarray(linear.bias))
  x = _normal((7,))
  np.testing.assert_allclose(
    np.asarray(module(x, inference=True)), np.asarray(linear(x)), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(
    np.asarray(eqx.nn.inference_mode(module)(x)), np.asarray(linear(x)), rtol=1e-6, atol=1e-6
  )
  y = module(x, key=KEY)
  expected = jax.jit(regjax.dropconnect_dense)(x, linear.weight.T, linear.bias, 0.4, key=KEY)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
  np.testing.assert_array_equal(np.asarray(_jit_call(module, x, KEY)), np.asarray(y))
  # Per example under vmap (a mask per example, Wan et al.) and on a batch (one mask).
  xb = _normal((5, 7))
  keys = jax.random.split(KEY, 5)
  per_example = eqx.filter_jit(jax.vmap(_call, in_axes=(None, 0, 0)))(module, xb, keys)
  one = _jit_call
  for i in (0, 4):
    np.testing.assert_array_equal(
      np.asarray(per_example[i]), np.asarray(one(module, xb[i], keys[i]))
    )
  assert not np.array_equal(np.asarray(per_example[0]), np.asarray(one(module, xb[0], keys[4])))
  assert jax.eval_shape(lambda x: module(x, key=KEY), xb).shape == (5, 4)
  half = rq.DropConnect(7, 4, dtype=jnp.bfloat16, key=key)
  x16 = jax.ShapeDtypeStruct((7,), jnp.bfloat16)
  assert jax.eval_shape(lambda x: half(x, key=KEY), x16).dtype == jnp.bfloat16
  with pytest.raises(RuntimeError, match="needs a key"):
    module(x)
  with pytest.raises(TypeError, match="in_features"):
    rq.DropConnect("scalar", 4, key=key)
