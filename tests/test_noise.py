"""Strengths that cannot be checked at trace time (regjax._noise's rule), for every op.

A traced NaN or +-inf strength makes every random op the identity (``x`` back
bit for bit, the identity's gradient); a traced finite strength outside the
op's range is clipped into it; a concrete bad strength raises ``ValueError``
naming the argument. The comparisons are exact: the identity branch returns
``x`` itself, and a clipped strength gives the same compiled program the same
parameter as the in-range value it is clipped to.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import regjax
from regjax import affine_noise, stochastic, structured, weights

_KERNEL = jnp.asarray(np.random.default_rng(11).standard_normal((3, 5)), jnp.float32)


_BIAS = jnp.asarray(np.random.default_rng(12).standard_normal(5), jnp.float32)


def _dropconnect(x, rate, **kw):
  return weights.dropconnect_dense(x, _KERNEL, _BIAS, rate, **kw)


# name: (op, keyword args, argument name, [(finite out-of-range value, the value it clips to)])
OPS = {
  "dropout": (stochastic.dropout, {}, "rate", [(-0.5, 0.0), (1.5, 1.0), (1e30, 1.0)]),
  "gaussian_dropout": (
    stochastic.gaussian_dropout,
    {},
    "rate",
    [(-0.5, 0.0), (1.0, 1.0 - 2.0**-24), (7.0, 1.0 - 2.0**-24)],
  ),
  "uout": (stochastic.uout, {}, "beta", [(-2.0, 0.0), (-1e30, 0.0)]),
  "alpha_dropout": (affine_noise.alpha_dropout, {}, "rate", [(-0.5, 0.0), (2.0, 1.0)]),
  "gaussian_noise": (affine_noise.gaussian_noise, {}, "stddev", [(-1.0, 0.0), (-1e30, 0.0)]),
  "dropblock": (structured.dropblock, {"block_size": 3}, "rate", [(-0.5, 0.0), (2.0, 1.0)]),
  "channel_dropout": (structured.channel_dropout, {}, "rate", [(-0.5, 0.0), (2.0, 1.0)]),
  "drop_path": (structured.drop_path, {}, "rate", [(-0.5, 0.0), (2.0, 1.0)]),
  "dropconnect_dense": (_dropconnect, {}, "rate", [(-0.5, 0.0), (2.0, 1.0)]),
}


NON_FINITE = [math.nan, math.inf, -math.inf]


RNG_IMPLS = ["hash", "jax"]


def _x(name, dtype=jnp.float32):
  shape = (2, 3) if name == "dropconnect_dense" else (2, 6, 6, 3)
  x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
  x.flat[0] = -0.0  # the identity keeps a signed zero too
  return jnp.asarray(x, dtype)


def _identity(name, x):
  """What the op returns when nothing is dropped: ``x``, or the plain dense layer."""
  if name == "dropconnect_dense":
    return _dropconnect(x, 0.0, deterministic=True)
  return x


@functools.cache
def _jitted(name, rng_impl):
  op, kw, _, _ = OPS[name]
  return jax.jit(lambda x, s, key: op(x, s, key=key, rng_impl=rng_impl, **kw))


@functools.cache
def _jitted_grad(name, rng_impl):
  op, kw, _, _ = OPS[name]

  def loss(x, s, w, key):
    return jnp.sum(op(x, s, key=key, rng_impl=rng_impl, **kw).astype(jnp.float32) * w)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("rng_impl", RNG_IMPLS)
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("name", sorted(OPS))
def test_traced_non_finite_strength_is_identity(name, value, rng_impl):
  x = _x(name)
  key = jax.random.key(0)
  y = _jitted(name, rng_impl)(x, jnp.float32(value), key)
  expected = _identity(name, x)
  if name == "dropconnect_dense":
    # The same dense layer, compiled inside another program: XLA may order the
    # 3-term dot product's additions alike or not, so allow float32 rounding.
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-6, atol=1e-6)
  else:
    assert y.dtype == x.dtype
    assert np.asarray(y).tobytes() == np.asarray(x).tobytes()  # bit for bit, -0.0 included

  w = jnp.asarray(np.random.default_rng(4).standard_normal(y.shape), jnp.float32)
  gx, gs = _jitted_grad(name, rng_impl)(x, jnp.float32(value), w, key)
  assert np.all(np.isfinite(np.asarray(gx))) and np.isfinite(float(gs))
  assert float(gs) == 0.0
  if name == "dropconnect_dense":
    np.testing.assert_allclose(np.asarray(gx), np.asarray(w @ _KERNEL.T), rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(w))  # the identity's gradient


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(set(OPS) - {"dropconnect_dense"}))
def test_traced_nan_is_identity_in_half_precision(name, dtype):
  x = _x(name, dtype)
  y = _jitted(name, "hash")(x, jnp.float32(math.nan), jax.random.key(1))
  assert y.dtype == x.dtype
  assert np.asarray(y).tobytes() == np.asarray(x).tobytes()


@pytest.mark.parametrize("rng_impl", RNG_IMPLS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_traced_out_of_range_strength_is_clipped(name, rng_impl):
  x = _x(name)
  key = jax.random.key(2)
  fn = _jitted(name, rng_impl)
  for bad, clipped in OPS[name][3]:
    y = np.asarray(fn(x, jnp.float32(bad), key))
    assert np.all(np.isfinite(y)), (bad, y)
    np.testing.assert_array_equal(y, np.asarray(fn(x, jnp.float32(clipped), key)))


@pytest.mark.parametrize("name", sorted(OPS))
def test_traced_in_range_strength_is_unchanged(name):
  """The guard does not touch a finite strength: the traced result is the concrete one."""
  op, kw, _, _ = OPS[name]
  x = _x(name)
  key = jax.random.key(5)
  setting = 0.3
  traced = np.asarray(_jitted(name, "hash")(x, jnp.float32(setting), key))
  concrete = np.asarray(op(x, setting, key=key, **kw))
  if name == "dropconnect_dense":
    np.testing.assert_allclose(traced, concrete, rtol=1e-6, atol=1e-6)  # dot order, as above
  else:
    np.testing.assert_array_equal(traced, concrete)


@pytest.mark.parametrize("name", sorted(OPS))
def test_vmapped_strengths_guard_each_row(name):
  """Under vmap the cond is a select; a non-finite row is still x and gradients stay finite."""
  op, kw, _, _ = OPS[name]
  x = _x(name)
  key = jax.random.key(6)
  rates = jnp.asarray([0.3, math.nan, math.inf, -math.inf], jnp.float32)
  ys = jax.jit(jax.vmap(lambda s: op(x, s, key=key, **kw)))(rates)
  single = np.asarray(_jitted(name, "hash")(x, jnp.float32(0.3), key))
  # A select fused into the kernel may change one multiply-add's rounding: one ulp.
  np.testing.assert_allclose(np.asarray(ys[0]), single, rtol=1e-6, atol=1e-6)
  expected = np.asarray(_identity(name, x))
  for row in ys[1:]:
    np.testing.assert_allclose(np.asarray(row), expected, rtol=1e-6, atol=1e-6)
    if name != "dropconnect_dense":
      np.testing.assert_array_equal(np.asarray(row), expected)
  grads = jax.jit(
    jax.vmap(
      jax.grad(lambda x, s: jnp.sum(op(x, s, key=key, **kw) ** 2), argnums=(0, 1)),
      in_axes=(None, 0),
    )
  )(x, rates)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5, 1.5])
@pytest.mark.parametrize("name", sorted(OPS))
def test_concrete_bad_strength_raises(name, value):
  op, kw, arg, _ = OPS[name]
  if arg in ("beta", "stddev") and value == 1.5:
    return  # no upper bound: 1.5 is valid
  x = _x(name)
  for concrete in (value, np.float32(value), jnp.float32(value)):
    with pytest.raises(ValueError, match=f"`{arg}` must be in"):
      op(x, concrete, key=jax.random.key(0), **kw)
    # A Python or NumPy value closed over by jit is concrete too: it raises at trace time.
    if not isinstance(concrete, jax.Array):
      with pytest.raises(ValueError, match=f"`{arg}` must be in"):
        jax.jit(lambda x, k, c=concrete: op(x, c, key=k, **kw))(x, jax.random.key(0))


def test_public_names():
  assert regjax.dropout is stochastic.dropout
  assert regjax.dropblock is structured.dropblock
