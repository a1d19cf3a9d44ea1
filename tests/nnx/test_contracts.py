"""Contracts every NNX module shares: traced ``deterministic``, missing
``rngs``, nnx.split/merge, serialization and reproducibility.
"""

import jax
import numpy as np
import pytest
from _helpers import MODULES, NAMES, TRACED_MSG, X
from flax import nnx, serialization

import regjax.nnx as rn


@pytest.mark.parametrize("name", NAMES)
def test_nnx_traced_deterministic_raises_clear_type_error(name):
  module = MODULES[name][1](nnx.Rngs(dropout=1))

  @nnx.jit
  def f(m, deterministic):
    return m(X, deterministic=deterministic)

  with pytest.raises(TypeError, match=TRACED_MSG) as info:
    f(module, False)
  assert f"regjax.nnx.{name}" in str(info.value)
  with pytest.raises(TypeError, match=TRACED_MSG):
    jax.jit(lambda d: module.set_view(deterministic=d))(True)


def test_nnx_traced_deterministic_at_construction_raises():
  with pytest.raises(TypeError, match=TRACED_MSG):
    jax.jit(lambda d: rn.Dropout(0.5, deterministic=d).rate)(False)


# --- 3. NNX without rngs --------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_nnx_without_rngs_gives_flax_message(name):
  module = MODULES[name][1](None)
  phrase = f"`deterministic` is False, but no `rngs` argument was provided to {name}"
  with pytest.raises(ValueError, match=phrase):
    module(X)
  np.testing.assert_array_equal(module(X, deterministic=True), module(X, deterministic=True))


# --- NNX split / merge, serialization, reproducibility --------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_nnx_split_merge_round_trip(name):
  # merge(copy=True): an independent clone, same state, so the same draws.
  model = MODULES[name][1](nnx.Rngs(dropout=5))
  graphdef, state = nnx.split(model)
  clone = nnx.merge(graphdef, state, copy=True)
  first, first_clone = model(X), clone(X)
  np.testing.assert_array_equal(first, first_clone)
  second, second_clone = model(X), clone(X)
  np.testing.assert_array_equal(second, second_clone)
  if name != "DropPath":  # two DropPath draws on 2 rows may coincide
    assert not np.array_equal(first, second)
  np.testing.assert_array_equal(model(X, deterministic=True), clone(X, deterministic=True))
  # Plain merge shares the Variables (flax semantics): the clone continues the stream.
  fresh = MODULES[name][1](nnx.Rngs(dropout=5))
  graphdef, state = nnx.split(fresh)
  shared = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(fresh(X), first)
  np.testing.assert_array_equal(shared(X), second)


def test_nnx_split_merge_through_nnx_jit():
  model = rn.Dropout(0.5, rngs=nnx.Rngs(dropout=5))
  graphdef, state = nnx.split(model)
  eager = nnx.merge(graphdef, state, copy=True)(X)
  jitted = nnx.jit(lambda m, x: m(x))(nnx.merge(graphdef, state, copy=True), X)
  np.testing.assert_array_equal(eager, jitted)


def test_nnx_params_serialization_round_trip():
  model = rn.DropConnect(3, 3, rngs=nnx.Rngs(params=0, dropout=1), rate=0.5)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  restored = serialization.from_bytes(params, serialization.to_bytes(params))
  other = rn.DropConnect(3, 3, rngs=nnx.Rngs(params=9, dropout=1), rate=0.5)
  state = nnx.state(other, nnx.Param)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(other, state)
  key = jax.random.key(2)
  np.testing.assert_array_equal(other(X, rngs=key), model(X, rngs=key))
  np.testing.assert_array_equal(other(X, deterministic=True), model(X, deterministic=True))


@pytest.mark.parametrize("name", NAMES)
def test_nnx_same_seed_same_output(name):
  a = MODULES[name][1](nnx.Rngs(dropout=7))(X)
  b = MODULES[name][1](nnx.Rngs(dropout=7))(X)
  np.testing.assert_array_equal(a, b)
  key = jax.random.key(3)
  module = MODULES[name][1](None)
  np.testing.assert_array_equal(module(X, rngs=key), module(X, rngs=key))
