"""Tests of the NNX RandomErasing module, Cutout's probability and fill, and DropBlock on
3-D maps, against the pure functions and their linen twins.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import regjax
import regjax.linen as rnn
import regjax.nnx as rx

# name -> (module maker (rngs -> module), function of (x, key), input shape)
CASES = {
  "random_erasing": (
    lambda r: rx.RandomErasing(0.7, area=[0.1, 0.4], aspect=(0.5, 2.0), fill="random", rngs=r),
    lambda x, k: regjax.random_erasing(
      x, 0.7, key=k, area=(0.1, 0.4), aspect=(0.5, 2.0), fill="random"
    ),
    (8, 10, 12, 3),
  ),
  "random_erasing_nchw": (
    lambda r: rx.RandomErasing(data_format="NCHW", fill=-1.0, rngs=r),
    lambda x, k: regjax.random_erasing(x, key=k, data_format="NCHW", fill=-1.0),
    (8, 3, 10, 12),
  ),
  "cutout": (
    lambda r: rx.Cutout(4, probability=0.6, fill="random", rngs=r),
    lambda x, k: regjax.cutout(x, 4, key=k, probability=0.6, fill="random"),
    (8, 10, 10, 3),
  ),
  "dropblock_3d": (
    lambda r: rx.DropBlock(0.3, block_size=2, share_channels=True, rngs=r),
    lambda x, k: regjax.dropblock(x, 0.3, key=k, block_size=2, share_channels=True),
    (4, 5, 6, 7, 3),
  ),
  "dropblock_3d_ncdhw": (
    lambda r: rx.DropBlock(0.3, block_size=3, data_format="NCDHW", rngs=r),
    lambda x, k: regjax.dropblock(x, 0.3, key=k, block_size=3, data_format="NCDHW"),
    (4, 2, 5, 6, 7),
  ),
}


def _input(shape):
  return jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, shape), jnp.float32)


@pytest.mark.parametrize("name", tuple(CASES))
def test_module_equals_function_and_linen_twin(name):
  make, fn, shape = CASES[name]
  module = make(nnx.Rngs(dropout=9))
  x, key = _input(shape), jax.random.key(3)
  y = module(x, rngs=key)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, key)))
  assert not np.array_equal(np.asarray(y), np.asarray(x))
  # The linen class, built from the NNX module's attributes.
  linen = getattr(rnn, type(module).__name__)(
    **{
      k: getattr(module, k)
      for k in inspect.signature(type(module).__init__).parameters
      if k not in ("self", "rngs", "deterministic")
    }
  )
  np.testing.assert_array_equal(
    np.asarray(linen.apply({}, x, deterministic=False, rng=key)), np.asarray(y)
  )
  # The kept stream: rngs['dropout'].fork() at construction, one key per call.
  stream = nnx.Rngs(dropout=9)["dropout"].fork()
  np.testing.assert_array_equal(np.asarray(module(x)), np.asarray(fn(x, stream())))
  np.testing.assert_array_equal(np.asarray(module(x)), np.asarray(fn(x, stream())))
  np.testing.assert_array_equal(
    np.asarray(module(x, rngs=nnx.Rngs(dropout=5))),
    np.asarray(fn(x, nnx.Rngs(dropout=5).dropout())),
  )
  assert module(x, deterministic=True) is x
  module.eval()
  assert module(x) is x


def test_random_erasing_constructor_arguments_are_the_linen_fields():
  params = inspect.signature(rx.RandomErasing.__init__).parameters
  fields = {
    f.name: f.default
    for f in dataclasses.fields(rnn.RandomErasing)
    if f.name not in ("parent", "name")
  }
  assert set(params) - {"self"} == set(fields) | {"rngs"}
  for field, default in fields.items():
    if field != "deterministic":
      assert params[field].default == default, field
  assert params["deterministic"].default is False
  cutout = inspect.signature(rx.Cutout.__init__).parameters
  assert cutout["probability"].default == 1.0 and cutout["fill"].default == 0.0
  assert rx.RandomErasing(area=[0.1, 0.2]).area == (0.1, 0.2)  # a hashable static attribute


def test_zero_probability_needs_no_stream_and_bad_probability_raises_at_construction():
  x = jnp.ones((2, 6, 6, 3))
  for module in (rx.RandomErasing(0.0), rx.Cutout(3, probability=0.0)):
    assert module(x) is x
  with pytest.raises(ValueError, match=r"regjax.nnx.RandomErasing: `probability` must be in"):
    rx.RandomErasing(1.5)
  with pytest.raises(ValueError, match=r"regjax.nnx.Cutout: `probability` must be in"):
    rx.Cutout(2, probability=-0.5)
  with pytest.raises(ValueError, match="`aspect` must be a pair"):
    rx.RandomErasing(aspect=(0.0, 1.0), rngs=nnx.Rngs(dropout=0))(x)
  with pytest.raises(ValueError, match="no `rngs` argument was provided to RandomErasing"):
    rx.RandomErasing()(x)


def test_a_jax_scalar_probability_is_traced_so_a_schedule_compiles_once():
  traces = []

  @nnx.jit
  def step(erasing, cutout, x):
    traces.append(1)
    return cutout(erasing(x))

  erasing = rx.RandomErasing(jnp.float32(0.0), rngs=nnx.Rngs(dropout=0))
  cutout = rx.Cutout(2, probability=jnp.float32(0.0), fill=-1.0, rngs=nnx.Rngs(dropout=1))
  x = jnp.ones((256, 8, 8, 1))
  changed = []
  for p in (0.0, 0.3, 1.0):
    erasing.probability = cutout.probability = jnp.float32(p)
    changed.append(float((np.asarray(step(erasing, cutout, x)) != 1).any(axis=(1, 2, 3)).mean()))
  assert len(traces) == 1
  assert changed[0] == 0.0 < changed[1] < changed[2]
