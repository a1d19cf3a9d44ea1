"""Tests of the linen modules of affine_noise and structured: AlphaDropout,
GaussianNoise, ChannelDropout, DropPath, DropBlock and Cutout (one parametrized
class over all of them), and a residual model built from them.

The ops' statistics are tested on the functions (tests/test_<module>.py); here each
module must equal its function, use the 'dropout' stream (and refuse to run
without it) and honour `deterministic`.
"""

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

# module name -> (class, function, setting field, value, extra fields, input shape)
MODULES = {
  "AlphaDropout": (rnn.AlphaDropout, regjax.alpha_dropout, "rate", 0.3, {}, (8, 30)),
  "GaussianNoise": (rnn.GaussianNoise, regjax.gaussian_noise, "stddev", 0.5, {}, (8, 30)),
  "ChannelDropout": (
    rnn.ChannelDropout,
    regjax.channel_dropout,
    "rate",
    0.3,
    {"channel_axis": 1},
    (8, 16, 5, 5),
  ),
  "DropPath": (rnn.DropPath, regjax.drop_path, "rate", 0.3, {"mode": "row"}, (32, 5, 5, 4)),
  "DropBlock": (
    rnn.DropBlock,
    regjax.dropblock,
    "rate",
    0.3,
    {"block_size": 3, "share_channels": True},
    (8, 10, 10, 4),
  ),
  "Cutout": (rnn.Cutout, regjax.cutout, "size", 4, {"data_format": "NCHW"}, (8, 3, 10, 10)),
}


MODULE_CASES = tuple((name, name) for name in MODULES)


def _make(name, **kwargs):
  cls, fn, field, value, extra, shape = MODULES[name]
  module = cls(**{field: value}, **extra, **kwargs)
  x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, shape), jnp.float32)
  return module, (lambda x, **kw: fn(x, value, **extra, **kw)), x


class NoiseModuleTest(parameterized.TestCase):
  @parameterized.named_parameters(*MODULE_CASES)
  def test_module_equals_function_with_explicit_rng(self, name):
    module, fn, x = _make(name)
    key = jax.random.key(3)
    y = module.apply({}, x, deterministic=False, rng=key)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, key=key)))
    assert not np.array_equal(np.asarray(y), np.asarray(x))

  @parameterized.named_parameters(*MODULE_CASES)
  def test_stream_draws_follow_the_stream_key(self, name):
    module, _, x = _make(name)
    a = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    a2 = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    b = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    assert not np.array_equal(np.asarray(a), np.asarray(b))

  @parameterized.named_parameters(*MODULE_CASES)
  def test_train_mode_without_stream_raises_instead_of_using_params(self, name):
    module, _, x = _make(name)
    with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream.*rngs="):
      module.init(jax.random.key(0), x, deterministic=False)
    with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
      module.apply({}, x, deterministic=False, rngs={"params": jax.random.key(0)})

  @parameterized.named_parameters(*MODULE_CASES)
  def test_custom_rng_collection(self, name):
    module, _, x = _make(name, rng_collection="noise")
    with pytest.raises(ValueError, match="'noise' PRNG stream"):
      module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    y = module.apply({}, x, deterministic=False, rngs={"noise": jax.random.key(0)})
    assert not np.array_equal(np.asarray(y), np.asarray(x))

  @parameterized.named_parameters(*MODULE_CASES)
  def test_deterministic_from_attribute_or_call(self, name):
    module, _, x = _make(name, deterministic=True)
    assert module.apply({}, x) is x
    module, _, x = _make(name)
    assert module.apply({}, x, True) is x
    with pytest.raises(ValueError, match="deterministic"):
      module.apply({}, x)  # neither given: flax's merge_param error
    both, _, _ = _make(name, deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
      both.apply({}, x, deterministic=False)

  def test_zero_and_full_rates_need_no_stream(self):
    x = jnp.ones((2, 6, 6, 3))
    for module in (
      rnn.AlphaDropout(0.0),
      rnn.GaussianNoise(0.0),
      rnn.ChannelDropout(0.0),
      rnn.DropPath(0.0),
      rnn.DropBlock(0.0, block_size=3),
      rnn.Cutout(0),
    ):
      assert module.apply({}, x, deterministic=False) is x
    for module in (rnn.AlphaDropout(1.0), rnn.ChannelDropout(1.0), rnn.DropPath(1.0)):
      np.testing.assert_array_equal(np.asarray(module.apply({}, x, deterministic=False)), 0)

  def test_bad_settings_raise_through_the_module(self):
    x, rngs = jnp.ones((2, 6, 6, 3)), {"dropout": jax.random.key(0)}
    with pytest.raises(ValueError, match=r"`rate` must be in \[0, 1\]"):
      rnn.ChannelDropout(1.5).apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match=r"`stddev` must be in"):
      rnn.GaussianNoise(-1.0).apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match=r"`block_size` must be in \[1, 6\]"):
      rnn.DropBlock(0.1).apply({}, x, deterministic=False, rngs=rngs)  # default 7 > 6
    with pytest.raises(ValueError, match="`mode` must be one of"):
      rnn.DropPath(0.1, mode="rows").apply({}, x, deterministic=False, rngs=rngs)
    with pytest.raises(ValueError, match=r"`size` must be in \[0, 6\]"):
      rnn.Cutout(8).apply({}, x, deterministic=False, rngs=rngs)

  @parameterized.named_parameters(
    *[(n, n) for n in ("AlphaDropout", "GaussianNoise", "ChannelDropout", "DropPath", "DropBlock")]
  )
  def test_rng_impl_is_passed_through_and_checked(self, name):
    cls, fn, field, value, extra, shape = MODULES[name]
    x = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, shape), jnp.float32)
    key = jax.random.key(7)
    assert cls(value).rng_impl == "hash"  # the functions' default
    draws = []
    for impl in ("hash", "jax"):
      y = cls(**{field: value}, **extra, rng_impl=impl).apply({}, x, deterministic=False, rng=key)
      np.testing.assert_array_equal(
        np.asarray(y), np.asarray(fn(x, value, key=key, **extra, rng_impl=impl))
      )
      draws.append(np.asarray(y))
    assert not np.array_equal(*draws)  # two generators, two draws
    with pytest.raises(ValueError, match="`rng_impl` must be one of"):
      cls(value, **extra, rng_impl="philox").apply({}, x, deterministic=False, rng=key)

  @parameterized.named_parameters(("hash", "hash"), ("jax", "jax"))
  def test_traced_dropblock_rate_from_a_schedule_compiles_once(self, impl):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, rate, train):
        return rnn.DropBlock(rate, block_size=3, deterministic=not train, rng_impl=impl)(x)

    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(x, step, key):
      rate = optax.linear_schedule(0.0, 0.3, 10)(step)
      return Net().apply({}, x, rate, True, rngs={"dropout": key})

    x = jnp.ones((8, 10, 10, 4))
    dropped = [
      float((np.asarray(forward(x, s, jax.random.key(s))) == 0).mean()) for s in (0, 5, 10)
    ]
    assert dropped[0] == 0 and dropped[1] < dropped[2]


class ResidualNet(nn.Module):
  """Cutout on the input, conv blocks with DropBlock/ChannelDropout, a DropPath
  residual, alpha dropout and additive noise before a DropConnect head."""

  @nn.compact
  def __call__(self, x, train: bool):
    det = not train
    x = rnn.Cutout(3, deterministic=det)(x)
    x = nn.Conv(8, (3, 3))(x)
    x = rnn.DropBlock(0.1, block_size=3, deterministic=det)(nn.relu(x))
    branch = rnn.ChannelDropout(0.2, deterministic=det)(nn.relu(nn.Conv(8, (3, 3))(x)))
    x = x + rnn.DropPath(0.2, deterministic=det)(branch)
    x = nn.selu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    x = rnn.AlphaDropout(0.1, deterministic=det)(x)
    x = rnn.GaussianNoise(0.1, deterministic=det)(x)
    return rnn.DropConnect(3, rate=0.3, deterministic=det)(x)


def test_model_trains_under_jit_and_eval_is_deterministic():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32))
  model = ResidualNet()
  # LeCun-normal kernels and zero biases drawn with NumPy: flax's initializers
  # would cost a compilation per shape; eval_shape gives the shapes for free.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
  params = jax.tree_util.tree_map_with_path(
    lambda path, s: jnp.asarray(
      rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
      if path[-1].key == "kernel"
      else np.zeros(s.shape),
      jnp.float32,
    ),
    shapes,
  )
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(params):
      logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = regjax.max_norm(optax.apply_updates(params, updates), 3.0)
    return params, opt_state, loss

  losses = []
  for i in range(15):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i + 1))
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0]
  for kernel in (params["Dense_0"]["kernel"], params["DropConnect_0"]["kernel"]):
    assert np.sqrt((np.asarray(kernel) ** 2).sum(axis=0)).max() <= 3.0 * (1 + 1e-6)
  evaluate = jax.jit(lambda params: model.apply({"params": params}, x, train=False))
  np.testing.assert_array_equal(np.asarray(evaluate(params)), np.asarray(evaluate(params)))
