"""Tests of regjax.nnx's modules against the pure functions and their linen
twins (parametrized over every module), and a model trained under nnx.jit against
the same model in linen.
"""

import dataclasses
import functools
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import _x
from flax import nnx

import regjax
import regjax.linen as rnn
import regjax.nnx as rx

# module name -> (class, function, rate/beta attribute, a value)
NOISE = {
  "Dropout": (rx.Dropout, regjax.dropout, "rate", 0.3),
  "GaussianDropout": (rx.GaussianDropout, regjax.gaussian_dropout, "rate", 0.3),
  "Uout": (rx.Uout, regjax.uout, "beta", 0.2),
  "AlphaDropout": (rx.AlphaDropout, regjax.alpha_dropout, "rate", 0.3),
  "GaussianNoise": (rx.GaussianNoise, regjax.gaussian_noise, "stddev", 0.5),
}


# The modules without broadcast_dims: name -> (class, function, attribute, value,
# extra constructor arguments, input shape).
STRUCTURED = {
  "ChannelDropout": (
    rx.ChannelDropout,
    regjax.channel_dropout,
    "rate",
    0.3,
    {"channel_axis": 1},
    (4, 6, 5, 3),
  ),
  "DropPath": (rx.DropPath, regjax.drop_path, "rate", 0.3, {"mode": "row"}, (16, 5)),
  "DropBlock": (
    rx.DropBlock,
    regjax.dropblock,
    "rate",
    0.3,
    {"block_size": 3, "share_channels": True},
    (2, 8, 8, 3),
  ),
  "Cutout": (rx.Cutout, regjax.cutout, "size", 3, {"data_format": "NCHW"}, (2, 3, 8, 8)),
}


NOISE_NAMES = tuple(NOISE)


ALL_NAMES = NOISE_NAMES + tuple(STRUCTURED)


def _noise(name, **kwargs):
  cls, fn, field, value = NOISE[name]
  return cls(value, **kwargs), fn, value


def _any(name, **kwargs):
  """(module, function of (x, key), input shape) for any noise module."""
  if name in NOISE:
    cls, fn, field, value = NOISE[name]
    extra, shape = {}, (8, 30)
  else:
    cls, fn, field, value, extra, shape = STRUCTURED[name]
  return (cls(value, **extra, **kwargs), lambda x, **kw: fn(x, value, **extra, **kw), shape)


# ---------------------------------------------------------------- noise modules
@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_module_equals_function_and_linen_twin_for_an_explicit_key(name):
  extra = {"broadcast_dims": (0,)} if name in NOISE else {}
  module, fn, shape = _any(name, **extra, rngs=nnx.Rngs(dropout=9))
  fn = functools.partial(fn, **extra)
  # The linen class, built from the NNX module's attributes.
  linen_module = getattr(rnn, name)(
    **{
      k: getattr(module, k)
      for k in inspect.signature(type(module).__init__).parameters
      if k not in ("self", "rngs", "deterministic")
    }
  )
  x, key = 1.0 + _x(shape), jax.random.key(3)
  y = module(x, rngs=key)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, key=key)))
  np.testing.assert_array_equal(
    np.asarray(y), np.asarray(linen_module.apply({}, x, deterministic=False, rng=key))
  )
  assert not np.array_equal(np.asarray(y), np.asarray(x))
  # An Rngs (or RngStream) at call is used the same way: one key from its stream.
  np.testing.assert_array_equal(
    np.asarray(module(x, rngs=nnx.Rngs(dropout=5))),
    np.asarray(fn(x, key=nnx.Rngs(dropout=5).dropout())),
  )


@pytest.mark.parametrize("name", ALL_NAMES)
def test_constructor_arguments_are_the_linen_fields(name):
  cls, linen_cls = getattr(rx, name), getattr(rnn, name)
  params = inspect.signature(cls.__init__).parameters
  fields = {
    f.name: f.default for f in dataclasses.fields(linen_cls) if f.name not in ("parent", "name")
  }
  assert set(params) - {"self"} == set(fields) | {"rngs"}
  for field, default in fields.items():  # linen's None means "give it somewhere"
    if default is not dataclasses.MISSING and field != "deterministic":
      assert params[field].default == default, field
  assert params["deterministic"].default is False  # nnx.Dropout's default


# The stream handling is shared by every module: three representatives.
@pytest.mark.parametrize("name", ("Dropout", "Uout", "DropBlock"))
def test_noise_module_stream_is_reproducible_and_advances_under_nnx_jit(name):
  shape = (64,) if name in NOISE else _any(name)[2]
  x = 1.0 + _x(shape)
  eager = _any(name, rngs=nnx.Rngs(dropout=4))[0]
  jitted = _any(name, rngs=nnx.Rngs(dropout=4))[0]
  call = nnx.jit(lambda m, x: m(x))
  a, b = eager(x), eager(x)
  a_jit, b_jit = call(jitted, x), call(jitted, x)
  assert not np.array_equal(np.asarray(a), np.asarray(b))  # the stream advances
  # The same draws (values up to XLA's fusion of the arithmetic).
  np.testing.assert_allclose(np.asarray(a), np.asarray(a_jit), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b), np.asarray(b_jit), rtol=1e-6, atol=1e-6)
  other = _any(name, rngs=nnx.Rngs(dropout=5))[0](x)
  assert not np.array_equal(np.asarray(a), np.asarray(other))


class _Noisy(nnx.Module):
  def __init__(self, rngs):
    self.drop = rx.Dropout(0.5, rngs=rngs)
    self.gauss = rx.GaussianDropout(0.5, rngs=rngs)
    self.uout = rx.Uout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.uout(self.gauss(self.drop(x)))


def test_train_eval_and_view_switch_deterministic():
  model = _Noisy(nnx.Rngs(dropout=0))
  x = jnp.ones((32,))
  assert not np.array_equal(np.asarray(model(x)), np.asarray(x))  # default: train
  model.eval()
  assert all(m.deterministic for m in (model.drop, model.gauss, model.uout))
  assert model(x) is x
  model.train()
  assert not any(m.deterministic for m in (model.drop, model.gauss, model.uout))
  assert not np.array_equal(np.asarray(model(x)), np.asarray(x))
  # nnx.view: a new view in eval mode; the original keeps its mode.
  view = nnx.view(model, deterministic=True)
  assert view(x) is x and not model.drop.deterministic
  assert nnx.view(view, deterministic=False).drop.deterministic is False
  # A call-time value takes precedence over the attribute.
  assert model.drop(x, deterministic=True) is x


@pytest.mark.parametrize("name", ALL_NAMES)
def test_train_mode_without_the_stream_raises_naming_it(name):
  module, _, shape = _any(name)
  x = jnp.ones(shape)
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
    module(x)
  # A plain nnx.Rngs(seed) has only the 'default' stream: no silent fallback.
  module = _any(name, rngs=nnx.Rngs(0))[0]
  assert module.rngs is None
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream.*'default'"):
    module(x)
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream.*only \\['params'\\]"):
    _any(name)[0](x, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match="needs the 'noise' PRNG stream"):
    _any(name, rng_collection="noise", rngs=nnx.Rngs(dropout=0))[0](x)
  # A custom collection is drawn from that stream.
  module = _any(name, rng_collection="noise", rngs=nnx.Rngs(noise=3))[0]
  assert module(x).shape == x.shape


@pytest.mark.parametrize("name", ALL_NAMES)
def test_eval_or_zero_rate_needs_no_rngs(name):
  module, _, shape = _any(name, deterministic=True)
  x = _x(shape)
  assert module(x) is x
  assert _any(name)[0](x, deterministic=True) is x
  assert getattr(rx, name)(0)(x) is x  # nothing is drawn at rate 0
  with pytest.raises(ValueError, match="no `deterministic` value"):
    _any(name, deterministic=None)[0](x)
  # train()/eval() switch every module.
  module.train()
  assert module.deterministic is False and module(x, rngs=jax.random.key(0)) is not x
  module.eval()
  assert module.deterministic is True and module(x) is x


@pytest.mark.parametrize(
  "cls, arg, bad, match",
  [
    (rx.Dropout, "rate", 1.5, r"`rate` must be in \[0, 1\]"),
    (rx.Dropout, "rate", -0.1, r"`rate` must be in \[0, 1\]"),
    (rx.GaussianDropout, "rate", 1.0, r"`rate` must be in \[0, 1\)"),
    (rx.Uout, "beta", -0.1, r"`beta` must be in \[0, inf\)"),
    (rx.Uout, "beta", float("nan"), r"`beta` must be in"),
    (rx.AlphaDropout, "rate", 1.5, r"`rate` must be in \[0, 1\]"),
    (rx.GaussianNoise, "stddev", -1.0, r"`stddev` must be in \[0, inf\)"),
    (rx.ChannelDropout, "rate", 2.0, r"`rate` must be in \[0, 1\]"),
    (rx.DropPath, "rate", -0.5, r"`rate` must be in \[0, 1\]"),
    (rx.DropBlock, "rate", 1.1, r"`rate` must be in \[0, 1\]"),
    (rx.DropConnect, "rate", 1.1, r"`rate` must be in \[0, 1\]"),
  ],
)
def test_bad_rates_raise_at_construction(cls, arg, bad, match):
  with pytest.raises(ValueError, match=match):
    if cls is rx.DropConnect:
      cls(3, 2, rate=bad, rngs=nnx.Rngs(0))
    else:
      cls(bad, rngs=nnx.Rngs(dropout=0))


@pytest.mark.parametrize(
  "name", ("AlphaDropout", "GaussianNoise", "ChannelDropout", "DropPath", "DropBlock")
)
def test_rng_impl_modules_pass_rng_impl_through_and_check_it(name):
  cls = getattr(rx, name)
  shape = _any(name)[2]
  x, key = 1.0 + _x(shape), jax.random.key(8)
  assert _any(name)[0].rng_impl == "hash"
  draws = []
  for impl in ("hash", "jax"):
    module, fn, _ = _any(name, rng_impl=impl, rngs=nnx.Rngs(dropout=0))
    y = module(x, rngs=key)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, key=key, rng_impl=impl)))
    draws.append(np.asarray(y))
  assert not np.array_equal(*draws)
  # Checked at construction, naming the module.
  with pytest.raises(ValueError, match=rf"regjax.nnx.{name}: `rng_impl` must be one of"):
    cls(0.3, rng_impl="philox", rngs=nnx.Rngs(dropout=0))


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_bad_call_inputs_raise_through_the_module(name):
  module = _noise(name, rngs=nnx.Rngs(dropout=0))[0]
  with pytest.raises(TypeError, match="floating-point"):
    module(jnp.ones((4, 3), jnp.int32))
  with pytest.raises(TypeError, match="`key` must be a PRNG key"):
    module(jnp.ones((4, 3)), rngs=jnp.ones((3,)))
  with pytest.raises(TypeError, match="`rngs` at call must be"):
    module(jnp.ones((4, 3)), rngs=3)
  with pytest.raises(ValueError, match="`broadcast_dims` entry 5 is out of range"):
    _noise(name, broadcast_dims=(5,), rngs=nnx.Rngs(dropout=0))[0](jnp.ones((4, 3)))
  with pytest.raises(TypeError, match="`rngs` must be an nnx.Rngs"):
    _noise(name, rngs=jax.random.key(0))
  # A rate changed after construction is still checked, by the function.
  setattr(module, NOISE[name][2], -1.0)
  with pytest.raises(ValueError, match="must be in"):
    module(jnp.ones((4, 3)))


@pytest.mark.parametrize("name", tuple(STRUCTURED))
def test_structured_modules_bad_call_inputs_raise(name):
  module, _, shape = _any(name, rngs=nnx.Rngs(dropout=0))
  with pytest.raises(TypeError, match="floating-point"):
    module(jnp.ones(shape, jnp.int32))
  with pytest.raises(ValueError, match="rank"):
    module(jnp.ones((2,) * (len(shape) - 2 if name != "DropPath" else 0)))


@pytest.mark.parametrize(
  "name, kwargs, match",
  [
    ("DropBlock", {"data_format": "NWHC"}, "`data_format` must be one of"),
    ("DropBlock", {"block_size": 9}, "`block_size` must be in"),
    ("Cutout", {"data_format": "HWC"}, "`data_format` must be one of"),
    ("DropPath", {"mode": "col"}, "`mode` must be"),
  ],
)
def test_structured_modules_bad_arguments_raise_at_call(name, kwargs, match):
  cls, _, _, value, extra, shape = STRUCTURED[name]
  module = cls(value, **{**extra, **kwargs}, rngs=nnx.Rngs(dropout=0))
  with pytest.raises(ValueError, match=match):
    module(jnp.ones(shape))
  with pytest.raises(ValueError, match="`size` must be in"):
    rx.Cutout(9, rngs=nnx.Rngs(dropout=0))(jnp.ones((2, 8, 8, 3)))


def test_a_jax_scalar_rate_is_traced_so_a_schedule_compiles_once():
  traces = []

  @nnx.jit
  def step(module, x):
    traces.append(1)
    return module(x)

  module = rx.DropBlock(jnp.float32(0.0), block_size=3, rngs=nnx.Rngs(dropout=0))
  x = jnp.ones((2, 8, 8, 3))
  dropped = []
  for rate in (0.0, 0.2, 0.5):
    module.rate = jnp.float32(rate)
    dropped.append(float(jnp.mean(step(module, x) == 0)))
  assert len(traces) == 1
  assert dropped[0] == 0.0 < dropped[1] < dropped[2]


# --------------------------------------- an NNX model trains exactly as its linen twin
class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool, keys=None):
    key = (lambda i: keys[i]) if train else (lambda i: None)
    x = nn.Dense(16)(x)
    x = rnn.BatchNorm(momentum=0.9)(x, deterministic=not train)
    x = rnn.Uout(0.3)(nn.relu(x), deterministic=not train, rng=key(0))
    x = nn.Dense(16)(x)
    x = rnn.BatchNorm(momentum=0.9)(x, deterministic=not train)
    x = rnn.GaussianDropout(0.2)(nn.relu(x), deterministic=not train, rng=key(1))
    x = rnn.Dropout(0.3)(x, deterministic=not train, rng=key(2))
    return nn.Dense(3)(x)


class NNXNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense0 = nnx.Linear(4, 16, rngs=rngs)
    self.bn0 = rx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.uout = rx.Uout(0.3, rngs=rngs)
    self.dense1 = nnx.Linear(16, 16, rngs=rngs)
    self.bn1 = rx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.gauss = rx.GaussianDropout(0.2, rngs=rngs)
    self.drop = rx.Dropout(0.3, rngs=rngs)
    self.dense2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, keys=None):
    key = (lambda i: None) if keys is None else (lambda i: keys[i])
    x = self.bn0(self.dense0(x))
    x = self.uout(nnx.relu(x), rngs=key(0))
    x = self.bn1(self.dense1(x))
    x = self.gauss(nnx.relu(x), rngs=key(1))
    x = self.drop(x, rngs=key(2))
    return self.dense2(x)


_LINEN_TO_NNX = {
  "Dense_0": "dense0",
  "Dense_1": "dense1",
  "Dense_2": "dense2",
  "BatchNorm_0": "bn0",
  "BatchNorm_1": "bn1",
}


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_nnx_model_trains_exactly_like_the_linen_model():
  x = 1.5 + _x((32, 4), seed=0)
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  tx = optax.adam(3e-2)
  steps = 6
  step_keys = [jax.random.split(jax.random.fold_in(jax.random.key(42), s), 3) for s in range(steps)]

  # linen
  net = LinenNet()
  variables = net.init(jax.random.key(0), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def linen_step(params, batch_stats, opt_state, keys):
    def loss_fn(p):
      logits, updates = net.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, keys=keys, mutable=["batch_stats"]
      )
      return _loss(logits, labels), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  # nnx, from the same initial values
  model = NNXNet(nnx.Rngs(params=7, dropout=8))
  for linen_name, attr in _LINEN_TO_NNX.items():
    for var, value in params[linen_name].items():
      getattr(getattr(model, attr), var)[...] = value
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, keys):
    loss, grads = nnx.value_and_grad(lambda m: _loss(m(x, keys), labels))(model)
    optimizer.update(model, grads)
    return loss

  model.train()
  linen_losses, nnx_losses = [], []
  for keys in step_keys:
    params, batch_stats, opt_state, loss = linen_step(params, batch_stats, opt_state, keys)
    linen_losses.append(float(loss))
    nnx_losses.append(float(nnx_step(model, optimizer, keys)))

  np.testing.assert_allclose(nnx_losses, linen_losses, rtol=1e-5)
  assert linen_losses[-1] < linen_losses[0]  # it trained
  for linen_name, attr in _LINEN_TO_NNX.items():
    module = getattr(model, attr)
    for var, value in params[linen_name].items():
      np.testing.assert_allclose(
        np.asarray(getattr(module, var)[...]),
        np.asarray(value),
        rtol=1e-5,
        atol=1e-6,
        err_msg=f"{linen_name}/{var}",
      )
    for var, value in batch_stats.get(linen_name, {}).items():
      np.testing.assert_allclose(
        np.asarray(getattr(module, var)[...]),
        np.asarray(value),
        rtol=1e-5,
        atol=1e-6,
        err_msg=f"{linen_name}/{var}",
      )
  assert set(batch_stats) == {"BatchNorm_0", "BatchNorm_1"}
  assert not np.allclose(np.asarray(batch_stats["BatchNorm_0"]["mean"]), 0.0)
  # Eval mode uses the running statistics and no noise, in both.
  model.eval()
  np.testing.assert_allclose(
    np.asarray(model(x)),
    np.asarray(net.apply({"params": params, "batch_stats": batch_stats}, x, train=False)),
    rtol=1e-5,
    atol=1e-5,
  )
