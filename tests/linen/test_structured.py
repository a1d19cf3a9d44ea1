"""Tests of the linen RandomErasing module, Cutout's probability and fill, and DropBlock on
3-D maps: each module must equal its function (explicit key, and the key its stream
gives), use the 'dropout' stream and honour `deterministic`.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import regjax
import regjax.linen as rnn

# name -> (module, function of (x, key), input shape)
CASES = {
  "random_erasing": (
    rnn.RandomErasing(0.7, area=(0.1, 0.4), aspect=(0.5, 2.0), fill="random"),
    lambda x, k: regjax.random_erasing(
      x, 0.7, key=k, area=(0.1, 0.4), aspect=(0.5, 2.0), fill="random"
    ),
    (8, 10, 12, 3),
  ),
  "random_erasing_nchw": (
    rnn.RandomErasing(data_format="NCHW", fill=-1.0),
    lambda x, k: regjax.random_erasing(x, key=k, data_format="NCHW", fill=-1.0),
    (8, 3, 10, 12),
  ),
  "cutout": (
    rnn.Cutout(4, probability=0.6, fill="random"),
    lambda x, k: regjax.cutout(x, 4, key=k, probability=0.6, fill="random"),
    (8, 10, 10, 3),
  ),
  "dropblock_3d": (
    rnn.DropBlock(0.3, block_size=2, share_channels=True),
    lambda x, k: regjax.dropblock(x, 0.3, key=k, block_size=2, share_channels=True),
    (4, 5, 6, 7, 3),
  ),
  "dropblock_3d_ncdhw": (
    rnn.DropBlock(0.3, block_size=3, data_format="NCDHW"),
    lambda x, k: regjax.dropblock(x, 0.3, key=k, block_size=3, data_format="NCDHW"),
    (4, 2, 5, 6, 7),
  ),
}


class _StreamKey(nn.Module):
  """The key a top-level module's first make_rng('dropout') gives."""

  @nn.compact
  def __call__(self):
    return self.make_rng("dropout")


def _input(shape):
  return jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, shape), jnp.float32)


class StructuredNewModulesTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in CASES])
  def test_module_equals_function_for_an_explicit_and_a_stream_key(self, name):
    module, fn, shape = CASES[name]
    x, key = _input(shape), jax.random.key(3)
    y = module.apply({}, x, deterministic=False, rng=key)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, key)))
    assert not np.array_equal(np.asarray(y), np.asarray(x))
    stream = module.apply({}, x, deterministic=False, rngs={"dropout": key})
    derived = _StreamKey().apply({}, rngs={"dropout": key})
    np.testing.assert_array_equal(np.asarray(stream), np.asarray(fn(x, derived)))
    with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
      module.apply({}, x, deterministic=False, rngs={"params": key})
    assert module.apply({}, x, deterministic=True) is x
    with pytest.raises(ValueError, match="deterministic"):
      module.apply({}, x)  # neither given: flax's merge_param error

  def test_fields_are_the_function_keywords(self):
    fields = {f.name: f.default for f in dataclasses.fields(rnn.RandomErasing)}
    assert fields["probability"] == 0.5
    assert fields["area"] == (0.02, 0.33) and fields["aspect"] == (0.3, 3.3)
    assert fields["fill"] == 0.0 and fields["data_format"] == "NHWC"
    assert fields["rng_collection"] == "dropout" and fields["deterministic"] is None
    cutout = {f.name: f.default for f in dataclasses.fields(rnn.Cutout)}
    assert cutout["probability"] == 1.0 and cutout["fill"] == 0.0

  def test_zero_probability_needs_no_stream(self):
    x = jnp.ones((2, 6, 6, 3))
    for module in (rnn.RandomErasing(0.0), rnn.Cutout(3, probability=0.0), rnn.Cutout(0)):
      assert module.apply({}, x, deterministic=False) is x

  def test_bad_settings_raise_through_the_module(self):
    x, rngs = jnp.ones((2, 6, 6, 3)), {"dropout": jax.random.key(0)}
    with pytest.raises(ValueError, match=r"`probability` must be in \[0, 1\]"):
      rnn.RandomErasing(1.5).apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match="`area` must be a pair"):
      rnn.RandomErasing(area=(0.5, 0.1)).apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match=r"`probability` must be in \[0, 1\]"):
      rnn.Cutout(2, probability=-0.1).apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match="`fill` must be a finite number or 'random'"):
      rnn.Cutout(2, fill="noise").apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match=r"`block_size` must be in \[1, 4\]"):
      rnn.DropBlock(0.1, block_size=5).apply(
        {}, jnp.ones((2, 4, 6, 6, 3)), deterministic=False, rngs=rngs
      )

  def test_traced_probability_from_a_schedule_compiles_once(self):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, p):
        x = rnn.RandomErasing(p, deterministic=False)(x)
        return rnn.Cutout(2, probability=p, deterministic=False, fill=-1.0)(x)

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(x, step, key):
      return Net().apply({}, x, optax.linear_schedule(0.0, 1.0, 10)(step), rngs={"dropout": key})

    x = jnp.ones((256, 8, 8, 1))
    changed = [
      float((np.asarray(forward(x, s, jax.random.key(s))) != 1).any(axis=(1, 2, 3)).mean())
      for s in (0, 3, 10)
    ]
    assert changed[0] == 0.0 < changed[1] < changed[2]
