"""Contracts every functional op shares, checked on all of them at once.

Shape, dtype, eval and zero-setting identity, reproducibility with and without jit,
traced settings, gradients, missing keys and bad arguments (a parametrized class
over the ops of affine_noise, structured and weights; stochastic's ops have their
own in test_stochastic.py); traced ``deterministic`` and unusual keys for every op.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import _DC_BIAS, _DC_KERNEL, IMPLS, TRACED_MSG, X, _dropconnect, _normal, _uniform
from absl.testing import parameterized
from jax.test_util import check_grads

import regjax
import regjax.linen as rl
import regjax.nnx as rn

PURE = {
  "dropout": lambda x, k, d: regjax.dropout(x, 0.5, key=k, deterministic=d),
  "gaussian_dropout": lambda x, k, d: regjax.gaussian_dropout(x, 0.3, key=k, deterministic=d),
  "uout": lambda x, k, d: regjax.uout(x, 0.2, key=k, deterministic=d),
  "alpha_dropout": lambda x, k, d: regjax.alpha_dropout(x, 0.3, key=k, deterministic=d),
  "gaussian_noise": lambda x, k, d: regjax.gaussian_noise(x, 0.1, key=k, deterministic=d),
  "channel_dropout": lambda x, k, d: regjax.channel_dropout(x, 0.5, key=k, deterministic=d),
  "drop_path": lambda x, k, d: regjax.drop_path(x, 0.5, key=k, deterministic=d),
  "join_drop_path": lambda x, k, d: regjax.join_drop_path(x, 0.5, key=k, deterministic=d),
  "dropblock": lambda x, k, d: regjax.dropblock(x, 0.3, key=k, deterministic=d, block_size=2),
  "cutout": lambda x, k, d: regjax.cutout(x, 2, key=k, deterministic=d),
  "random_erasing": lambda x, k, d: regjax.random_erasing(x, 0.5, key=k, deterministic=d),
  "dropconnect_dense": lambda x, k, d: regjax.dropconnect_dense(
    x, jnp.ones((3, 3)), None, 0.5, key=k, deterministic=d
  ),
}


@pytest.mark.parametrize("name", tuple(PURE))
def test_pure_traced_deterministic_raises_clear_type_error(name):
  fn = PURE[name]
  with pytest.raises(TypeError, match=TRACED_MSG):
    jax.jit(lambda d: fn(X, jax.random.key(0), d))(False)


# --- 2. keys ------------------------------------------------------------------------
@pytest.mark.parametrize(
  "bad",
  [
    pytest.param(lambda: jax.random.PRNGKey(0, impl="rbg"), id="raw-rbg"),
    pytest.param(lambda: jnp.zeros((3,), jnp.uint32), id="uint32-3"),
  ],
)
@pytest.mark.parametrize("name", tuple(PURE))
def test_bad_raw_key_raises_clear_type_error(bad, name):
  with pytest.raises(TypeError, match="`key` must be a PRNG key: a typed key") as info:
    PURE[name](X, bad(), False)
  message = str(info.value)
  assert "jax.random.key" in message and "(2,)" in message
  assert "jax.random.wrap_key_data(data, impl='rbg')" in message


def test_bad_raw_key_through_modules():
  raw = jax.random.PRNGKey(0, impl="rbg")
  with pytest.raises(TypeError, match="`key`.*wrap_key_data"):
    rl.Dropout(0.5).apply({}, X, deterministic=False, rng=raw)
  with pytest.raises(TypeError, match="`key`.*wrap_key_data"):
    rn.Dropout(0.5)(X, rngs=raw)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@pytest.mark.parametrize("rng_impl", ["hash", "jax"])
def test_typed_keys_of_any_impl_work(impl, rng_impl):
  key = jax.random.key(3, impl=impl)
  a = regjax.dropout(X, 0.5, key=key, rng_impl=rng_impl)
  b = regjax.dropout(X, 0.5, key=key, rng_impl=rng_impl)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, X)
  out = rl.Dropout(0.5, rng_impl=rng_impl).apply({}, X, deterministic=False, rngs={"dropout": key})
  assert out.shape == X.shape
  out = rn.Dropout(0.5, rng_impl=rng_impl)(X, rngs=key)
  assert out.shape == X.shape


def test_wrapped_rbg_data_and_raw_threefry_key_work():
  data = jax.random.PRNGKey(0, impl="rbg")
  wrapped = jax.random.wrap_key_data(data, impl="rbg")
  assert regjax.dropout(X, 0.5, key=wrapped).shape == X.shape
  raw = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(
    regjax.dropout(X, 0.5, key=raw), regjax.dropout(X, 0.5, key=jax.random.wrap_key_data(raw))
  )


@pytest.mark.parametrize("name", tuple(PURE))
def test_pure_same_key_same_output(name):
  fn = PURE[name]
  key = jax.random.key(11)
  np.testing.assert_array_equal(fn(X, key, False), fn(X, key, False))
  np.testing.assert_array_equal(jax.jit(lambda x, k: fn(x, k, False))(X, key), fn(X, key, False))


# name -> (op(x, setting, key=, deterministic=), input shape, customary setting,
#          the setting's argument name, regex of its range in the error message,
#          one out-of-range setting, does setting 1 zero the output)
OPS = {
  **{
    f"alpha_dropout_{impl}": (
      functools.partial(regjax.alpha_dropout, rng_impl=impl),
      (64, 32),
      0.3,
      "rate",
      r"\[0, 1\]",
      1.5,
    )
    for impl in IMPLS
  },
  **{
    f"gaussian_noise_{impl}": (
      functools.partial(regjax.gaussian_noise, rng_impl=impl),
      (64, 32),
      0.5,
      "stddev",
      r"\[0, inf\)",
      -0.1,
    )
    for impl in IMPLS
  },
  "channel_dropout": (regjax.channel_dropout, (8, 6, 6, 16), 0.3, "rate", r"\[0, 1\]", -0.1),
  "drop_path": (regjax.drop_path, (64, 4, 4), 0.3, "rate", r"\[0, 1\]", 1.01),
  **{
    f"dropblock_{impl}": (
      functools.partial(regjax.dropblock, block_size=3, rng_impl=impl),
      (4, 12, 12, 8),
      0.3,
      "rate",
      r"\[0, 1\]",
      2.0,
    )
    for impl in IMPLS
  },
  "cutout": (regjax.cutout, (4, 12, 12, 3), 5, "size", r"\[0, 12\]", 13),
  "random_erasing": (
    functools.partial(regjax.random_erasing, fill="random"),
    (4, 12, 12, 3),
    0.5,
    "probability",
    r"\[0, 1\]",
    1.5,
  ),
  "dropblock_3d": (
    functools.partial(regjax.dropblock, block_size=2),
    (4, 6, 6, 6, 4),
    0.3,
    "rate",
    r"\[0, 1\]",
    2.0,
  ),
  "dropconnect_dense": (_dropconnect, (16, 32), 0.3, "rate", r"\[0, 1\]", -1.0),
}


OP_CASES = tuple((name, name) for name in OPS)


FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _input(name, dtype=jnp.float32, seed=0):
  shape = OPS[name][1]
  # Positive inputs, so a zero in the output can only come from the op.
  return _uniform(seed, shape, 0.5, 1.5).astype(dtype)


# ----------------------------------------------------------------------------
# Contracts shared by every op
class ContractTest(chex.TestCase):
  # Eager: jit and eager agree (test_same_key_same_draw_with_and_without_jit),
  # and eager primitives are compiled once per shape, not once per test.
  @parameterized.named_parameters(
    *[(f"{name}_{jnp.dtype(d).name}", name, d) for name in OPS for d in FLOAT_DTYPES]
  )
  def test_shape_dtype_and_finiteness(self, name, dtype):
    op, _, setting, *_ = OPS[name]
    x = _input(name, dtype)

    def apply(x, k):
      return op(x, setting, key=k)

    y = apply(x, jax.random.key(1))
    expected_shape = x.shape[:-1] + (24,) if name == "dropconnect_dense" else x.shape
    chex.assert_shape(y, expected_shape)
    chex.assert_type(y, dtype)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    if dtype != jnp.float32 and name != "dropconnect_dense":
      # Half precision is computed in float32 and rounded once.
      y32 = apply(x.astype(jnp.float32), jax.random.key(1))
      np.testing.assert_array_equal(np.asarray(y), np.asarray(y32.astype(dtype)))

  @parameterized.named_parameters(*OP_CASES)
  def test_eval_and_zero_setting_return_x_without_key(self, name):
    op, *_ = OPS[name]
    x = _input(name)
    if name == "dropconnect_dense":
      eval_y = op(x, 0.3, deterministic=True)
      np.testing.assert_array_equal(np.asarray(eval_y), np.asarray(x @ _DC_KERNEL + _DC_BIAS))
      np.testing.assert_array_equal(np.asarray(op(x, 0.0)), np.asarray(eval_y))
      return
    assert op(x, OPS[name][2], deterministic=True) is x
    assert op(x, 0) is x

  @parameterized.named_parameters(*OP_CASES)
  def test_same_key_same_draw_with_and_without_jit(self, name):
    op, _, setting, *_ = OPS[name]
    x = _input(name)
    key = jax.random.key(2)
    eager = np.asarray(op(x, setting, key=key))
    np.testing.assert_array_equal(eager, np.asarray(op(x, setting, key=key)))
    jitted = np.asarray(jax.jit(lambda x, k: op(x, setting, key=k))(x, key))
    # jit may fuse a multiply-add differently: a few ulp, not a new draw.
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    other = np.asarray(op(x, setting, key=jax.random.key(3)))
    assert not np.allclose(other, eager)
    raw = np.asarray(op(x, setting, key=jax.random.PRNGKey(2)))
    np.testing.assert_array_equal(raw, eager)

  @parameterized.named_parameters(*OP_CASES)
  def test_changing_traced_setting_traces_once_and_is_clipped(self, name):
    op, _, setting, _, _, bad = OPS[name]
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(x, setting, key):
      return op(x, setting, key=key)

    x = _input(name)
    dtype = jnp.int32 if name == "cutout" else jnp.float32
    outs = [
      np.asarray(apply(x, jnp.asarray(s, dtype), jax.random.key(4))) for s in (0, setting, setting)
    ]
    reference = np.asarray(op(x, setting, key=jax.random.key(4)))
    np.testing.assert_allclose(outs[1], reference, rtol=1e-6, atol=1e-6)
    zero = np.asarray(x @ _DC_KERNEL + _DC_BIAS) if name == "dropconnect_dense" else np.asarray(x)
    np.testing.assert_allclose(outs[0], zero, rtol=1e-6, atol=1e-6)  # traced 0: identity
    # An out-of-range traced value cannot raise; it is clipped, never NaN.
    y = apply(x, jnp.asarray(bad, dtype), jax.random.key(5))
    assert np.all(np.isfinite(np.asarray(y)))

  @parameterized.named_parameters(*OP_CASES)
  def test_check_grads(self, name):
    op, _, setting, *_ = OPS[name]
    x = _normal(6, OPS[name][1])
    key = jax.random.key(7)
    # Every op is linear in x for a fixed key, so first order is the whole story.
    check_grads(
      lambda x: op(x, setting, key=key),
      (x,),
      order=1,
      modes=("fwd", "rev"),
      atol=1e-2,
      rtol=1e-2,
      eps=1e-2,
    )

  @parameterized.named_parameters(*OP_CASES)
  def test_missing_key_in_train_mode(self, name):
    op, _, setting, *_ = OPS[name]
    x = _input(name)
    with pytest.raises(ValueError, match=r"needs a PRNG key.*key="):
      op(x, setting)
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
      jax.jit(lambda x: op(x, setting))(x)

  @parameterized.named_parameters(*OP_CASES)
  def test_setting_out_of_range_names_the_argument(self, name):
    op, _, _, arg, range_re, bad = OPS[name]
    with pytest.raises(ValueError, match=rf"`{arg}` must be in {range_re}"):
      op(_input(name), bad, key=jax.random.key(0))

  @parameterized.named_parameters(*OP_CASES)
  def test_bad_keys_and_inputs(self, name):
    op, shape, setting, *_ = OPS[name]
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      op(_input(name), setting, key=42)
    with pytest.raises(TypeError, match="`x` must be a floating-point array"):
      op(jnp.ones(shape, jnp.int32), setting, key=jax.random.key(0))
    with pytest.raises(TypeError, match="`deterministic` must be a Python bool"):
      jax.jit(lambda x, d: op(x, setting, key=jax.random.key(0), deterministic=d))(
        _input(name), True
      )
