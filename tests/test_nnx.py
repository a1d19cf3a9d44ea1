"""Tests of regjax.nnx: the NNX modules against the pure functions, against
flax.nnx, and a model trained under nnx.jit against the same model in linen.
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
    "ChannelDropout": (rx.ChannelDropout, regjax.channel_dropout, "rate", 0.3,
                       {"channel_axis": 1}, (4, 6, 5, 3)),
    "DropPath": (rx.DropPath, regjax.drop_path, "rate", 0.3, {"mode": "row"}, (16, 5)),
    "DropBlock": (rx.DropBlock, regjax.dropblock, "rate", 0.3,
                  {"block_size": 3, "share_channels": True}, (2, 8, 8, 3)),
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
  return (cls(value, **extra, **kwargs),
          lambda x, **kw: fn(x, value, **extra, **kw), shape)


def _x(shape=(8, 30), seed=2):
  return jax.random.normal(jax.random.key(seed), shape)


# ---------------------------------------------------------------- noise modules


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_module_equals_function_and_linen_twin_for_an_explicit_key(name):
  extra = {"broadcast_dims": (0,)} if name in NOISE else {}
  module, fn, shape = _any(name, **extra, rngs=nnx.Rngs(dropout=9))
  fn = functools.partial(fn, **extra)
  # The linen class, built from the NNX module's attributes.
  linen_module = getattr(rnn, name)(
      **{k: getattr(module, k) for k in inspect.signature(type(module).__init__).parameters
         if k not in ("self", "rngs", "deterministic")})
  x, key = 1.0 + _x(shape), jax.random.key(3)
  y = module(x, rngs=key)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x, key=key)))
  np.testing.assert_array_equal(
      np.asarray(y), np.asarray(linen_module.apply({}, x, deterministic=False, rng=key)))
  assert not np.array_equal(np.asarray(y), np.asarray(x))
  # An Rngs (or RngStream) at call is used the same way: one key from its stream.
  np.testing.assert_array_equal(np.asarray(module(x, rngs=nnx.Rngs(dropout=5))),
                                np.asarray(fn(x, key=nnx.Rngs(dropout=5).dropout())))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_constructor_arguments_are_the_linen_fields(name):
  cls, linen_cls = getattr(rx, name), getattr(rnn, name)
  params = inspect.signature(cls.__init__).parameters
  fields = {f.name: f.default for f in dataclasses.fields(linen_cls)
            if f.name not in ("parent", "name")}
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


def test_dropout_matches_flax_nnx_dropout_key_for_key():
  x = _x((16, 40), seed=0)
  # rng_impl='jax' draws with jax.random.bernoulli, as flax does.
  ours = rx.Dropout(0.4, rng_impl="jax", rngs=nnx.Rngs(dropout=1))
  theirs = nnx.Dropout(0.4, rngs=nnx.Rngs(dropout=1))
  for _ in range(2):  # the kept stream forks and advances exactly as flax's does
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-6)
  key = jax.random.key(7)
  np.testing.assert_allclose(np.asarray(ours(x, rngs=key)), np.asarray(theirs(x, rngs=key)),
                             rtol=1e-6)


def test_noise_constructor_matches_flax_nnx_dropout():
  ours = dict(inspect.signature(rx.Dropout.__init__).parameters)
  theirs = inspect.signature(nnx.Dropout.__init__).parameters
  # Our one addition, the generator choice, is keyword-only with a default.
  extra = ours.pop("rng_impl")
  assert extra.kind == inspect.Parameter.KEYWORD_ONLY and extra.default == "hash"
  assert list(ours) == list(theirs)
  assert all(ours[p].default == theirs[p].default and ours[p].kind == theirs[p].kind
             for p in ours)
  call_ours = inspect.signature(rx.Dropout.__call__).parameters
  call_theirs = inspect.signature(nnx.Dropout.__call__).parameters
  assert list(call_ours) == list(call_theirs)


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


def test_dropout_rate_one_returns_zeros_without_a_key():
  y = rx.Dropout(1.0)(_x((4, 3)))
  np.testing.assert_array_equal(np.asarray(y), 0.0)


@pytest.mark.parametrize("cls, arg, bad, match", [
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
])
def test_bad_rates_raise_at_construction(cls, arg, bad, match):
  with pytest.raises(ValueError, match=match):
    if cls is rx.DropConnect:
      cls(3, 2, rate=bad, rngs=nnx.Rngs(0))
    else:
      cls(bad, rngs=nnx.Rngs(dropout=0))


@pytest.mark.parametrize("name", ("AlphaDropout", "GaussianNoise", "ChannelDropout", "DropPath",
                                  "DropBlock"))
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


@pytest.mark.parametrize("name, kwargs, match", [
    ("DropBlock", {"data_format": "NWHC"}, "`data_format` must be one of"),
    ("DropBlock", {"block_size": 9}, "`block_size` must be in"),
    ("Cutout", {"data_format": "HWC"}, "`data_format` must be one of"),
    ("DropPath", {"mode": "col"}, "`mode` must be"),
])
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


# ---------------------------------------------------------------- DropConnect


def test_drop_connect_passes_rng_impl_through():
  x, key = _x((4, 5)), jax.random.key(5)
  for impl in ("hash", "jax"):
    ours = rx.DropConnect(5, 4, rate=0.4, rng_impl=impl, rngs=nnx.Rngs(0, dropout=1))
    y = ours(x, rngs=key)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(regjax.dropconnect_dense(
        x, ours.kernel[...], ours.bias[...], 0.4, key=key, rng_impl=impl)))
  with pytest.raises(ValueError, match="regjax.nnx.DropConnect: `rng_impl` must be one of"):
    rx.DropConnect(5, 4, rng_impl="philox", rngs=nnx.Rngs(0))


def test_drop_connect_is_an_nnx_linear_drop_in():
  ours = rx.DropConnect(5, 4, rate=0.4, rngs=nnx.Rngs(0, dropout=1))
  linear = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
  # The same parameters (names, types, shapes, values from the same rngs draws).
  assert set(nnx.state(ours)) == {"kernel", "bias", "rngs"}
  assert set(nnx.state(ours, nnx.Param)) == set(nnx.state(linear, nnx.Param))
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(np.asarray(getattr(ours, name)[...]),
                                  np.asarray(getattr(linear, name)[...]))
  assert ours.kernel.shape == (5, 4) and ours.bias.shape == (4,)
  params_ours = inspect.signature(rx.DropConnect.__init__).parameters
  params_linear = inspect.signature(nnx.Linear.__init__).parameters
  assert set(params_ours) - set(params_linear) == {"rate", "deterministic", "rng_collection",
                                                   "rng_impl"}
  for p in params_linear:
    assert params_ours[p].default == params_linear[p].default, p
  x = _x((3, 5))
  # Eval mode is nnx.Linear, bit for bit.
  ours.eval()
  np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(linear(x)))
  # Train mode is regjax.dropconnect_dense and regjax.linen.DropConnect.
  ours.train()
  key = jax.random.key(5)
  y = ours(x, rngs=key)
  expected = regjax.dropconnect_dense(x, linear.kernel[...], linear.bias[...], 0.4, key=key)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
  linen = rnn.DropConnect(4, rate=0.4)
  variables = {"params": {"kernel": linear.kernel[...], "bias": linear.bias[...]}}
  np.testing.assert_array_equal(
      np.asarray(y), np.asarray(linen.apply(variables, x, deterministic=False, rng=key)))
  assert not np.allclose(np.asarray(y), np.asarray(linear(x)))
  # The kept stream advances; rate 0 and eval need no stream.
  assert not np.array_equal(np.asarray(ours(x)), np.asarray(ours(x)))
  no_stream = rx.DropConnect(5, 4, use_bias=False, rngs=nnx.Rngs(0))
  assert no_stream.bias is None and set(nnx.state(no_stream)) == {"kernel"}
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
    no_stream(x)
  np.testing.assert_array_equal(np.asarray(no_stream(x, deterministic=True)),
                                np.asarray(x @ no_stream.kernel[...]))
  with pytest.raises(ValueError, match="`kernel` must have shape"):
    ours(_x((3, 6)), deterministic=True)


# ---------------------------------------------------------------- BatchNorm


def test_batch_norm_variables_names_types_and_dtypes():
  bn = rx.BatchNorm(6, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  state = nnx.state(bn)
  assert set(state) == {"mean", "var", "scale", "bias"}
  assert set(nnx.state(bn, nnx.BatchStat)) == {"mean", "var"}
  assert set(nnx.state(bn, nnx.Param)) == {"scale", "bias"}
  assert bn.mean.dtype == bn.var.dtype == jnp.float32
  assert bn.scale.dtype == bn.bias.dtype == jnp.bfloat16
  bn(_x((16, 6)).astype(jnp.bfloat16))  # train step on half-precision input
  assert bn.mean.dtype == bn.var.dtype == jnp.float32
  # The variables are those of nnx.BatchNorm (so state trees and checkpoints match).
  ref = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  mine = rx.BatchNorm(6, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(mine)) == jax.tree.structure(nnx.state(ref))
  no_affine = rx.BatchNorm(6, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
  assert set(nnx.state(no_affine)) == {"mean", "var"}
  assert no_affine.scale is None and no_affine.bias is None


def test_batch_norm_constructor_matches_flax_nnx():
  ours = inspect.signature(rx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  missing = set(theirs) - set(ours)
  assert missing == set()
  for p in set(theirs) & set(ours) - {"bias_init", "scale_init"}:
    assert ours[p].default == theirs[p].default and ours[p].kind == theirs[p].kind, p
  mine, ref = rx.BatchNorm(5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  for attr in ("num_features", "use_running_average", "axis", "momentum", "epsilon", "dtype",
               "param_dtype", "use_bias", "use_scale", "axis_name", "axis_index_groups",
               "use_fast_variance"):
    assert getattr(mine, attr) == getattr(ref, attr), attr
  for a, b in zip(jax.tree.leaves(nnx.state(mine)), jax.tree.leaves(nnx.state(ref))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kwargs, shape", [
    ({}, (32, 5)),
    ({"momentum": 0.9, "epsilon": 1e-3}, (8, 4, 4, 3)),
    ({"axis": 1, "momentum": 0.8}, (8, 3, 4)),
    ({"use_scale": False, "use_bias": False}, (16, 5)),
])
def test_batch_norm_matches_flax_nnx_batch_norm(kwargs, shape):
  n = shape[kwargs.get("axis", -1)]
  ours = rx.BatchNorm(n, **kwargs, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(n, **kwargs, rngs=nnx.Rngs(0))
  both = nnx.jit(lambda a, b, x: (a(x), b(x)))  # one compilation per mode, not per op
  for step in range(3):
    y_ours, y_theirs = both(ours, theirs, 2.0 + 3.0 * _x(shape, seed=step))
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), atol=2e-5)
    for name in ("mean", "var"):
      np.testing.assert_allclose(np.asarray(getattr(ours, name)[...]),
                                 np.asarray(getattr(theirs, name)[...]), rtol=1e-5, atol=1e-6)
  ours.eval()
  theirs.eval()
  y_ours, y_theirs = both(ours, theirs, _x(shape, seed=9))
  np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), atol=2e-5)


@pytest.mark.parametrize("kwargs", [
    {},
    {"momentum": 0.9, "unbiased_running_var": True},
    {"axis": (1, 2), "use_bias": False},
])
def test_batch_norm_matches_regjax_linen(kwargs):
  shape = (6, 3, 4)
  axis = kwargs.get("axis", -1)
  num_features = tuple(shape[a] for a in axis) if isinstance(axis, tuple) else shape[axis]
  ours = rx.BatchNorm(num_features, **kwargs, rngs=nnx.Rngs(0))
  linen = rnn.BatchNorm(**kwargs)
  variables = linen.init(jax.random.key(0), _x(shape), use_running_average=True)
  mask = jnp.arange(shape[0])[:, None, None] < 4
  for step in range(3):
    x = _x(shape, seed=step)
    m = mask if step == 2 else None
    y_linen, updates = linen.apply(variables, x, use_running_average=False, mask=m,
                                   mutable=["batch_stats"])
    variables = {**variables, **updates}
    np.testing.assert_allclose(np.asarray(ours(x, mask=m)), np.asarray(y_linen), atol=1e-6)
    for name in ("mean", "var"):
      np.testing.assert_allclose(np.asarray(getattr(ours, name)[...]),
                                 np.asarray(variables["batch_stats"][name]), rtol=1e-6)
  x = _x(shape, seed=7)
  np.testing.assert_allclose(
      np.asarray(ours(x, use_running_average=True)),
      np.asarray(linen.apply(variables, x, use_running_average=True)), atol=1e-6)


def test_batch_norm_deterministic_is_an_alias_of_use_running_average():
  x = _x((8, 4))
  bn = rx.BatchNorm(4, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False and bn.deterministic is False
  bn.eval()
  assert bn.use_running_average is True and bn.deterministic is True
  before = np.asarray(bn.mean[...])
  bn(x)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), before)  # eval: no update
  bn.train()
  assert bn.use_running_average is False
  bn(x)
  assert not np.array_equal(np.asarray(bn.mean[...]), before)
  bn.deterministic = True
  assert bn.use_running_average is True
  # nnx.view with either name; the original keeps its mode.
  bn.train()
  assert nnx.view(bn, use_running_average=True).use_running_average is True
  assert nnx.view(bn, deterministic=True).use_running_average is True
  assert bn.use_running_average is False
  # nnx.view broadcasts its arguments to every module: the specific name wins, so
  # "noise off, BatchNorm on batch statistics" (re-estimating statistics) works.
  assert nnx.view(bn, deterministic=True, use_running_average=False).use_running_average is False
  model = nnx.Dict(bn=rx.BatchNorm(4, rngs=nnx.Rngs(0)), drop=rx.Dropout(0.5))
  view = nnx.view(model, deterministic=True, use_running_average=False)
  assert view["drop"].deterministic is True and view["bn"].use_running_average is False
  # Constructor and call arguments.
  assert rx.BatchNorm(4, deterministic=True, rngs=nnx.Rngs(0)).use_running_average is True
  assert rx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0)).deterministic is True
  with pytest.raises(ValueError, match="disagree"):
    rx.BatchNorm(4, use_running_average=True, deterministic=False, rngs=nnx.Rngs(0))
  before = np.asarray(bn.mean[...])
  bn(x, deterministic=True)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), before)
  with pytest.raises(ValueError, match="disagree"):
    bn(x, True, deterministic=False)
  with pytest.raises(ValueError, match="no `use_running_average`/`deterministic` value"):
    rx.BatchNorm(4, use_running_average=None, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize("kwargs, shape, error, match", [
    ({"num_features": 0}, (4, 3), ValueError, "`num_features` must be a positive int"),
    ({"num_features": 3, "epsilon": 0.0}, (4, 3), ValueError, "`epsilon` must be"),
    ({"num_features": 3, "momentum": 1.5}, (4, 3), ValueError, r"`momentum` must be in \[0, 1\]"),
    ({"num_features": 3, "axis": (0, 1)}, (4, 3), ValueError, "names 2 axis"),
    ({"num_features": 5}, (4, 3), ValueError, r"have sizes \(3,\); expected \(5,\)"),
    ({"num_features": 3, "axis": 2}, (4, 3), ValueError, "`axis`=2 is out of range"),
])
def test_batch_norm_bad_inputs_raise(kwargs, shape, error, match):
  with pytest.raises(error, match=match):
    rx.BatchNorm(**kwargs, rngs=nnx.Rngs(0))(jnp.ones(shape))


def test_batch_norm_integer_input_raises():
  with pytest.raises(TypeError, match="floating-point"):
    rx.BatchNorm(3, rngs=nnx.Rngs(0))(jnp.ones((4, 3), jnp.int32))


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


_LINEN_TO_NNX = {"Dense_0": "dense0", "Dense_1": "dense1", "Dense_2": "dense2",
                 "BatchNorm_0": "bn0", "BatchNorm_1": "bn1"}


def _loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_nnx_model_trains_exactly_like_the_linen_model():
  x = 1.5 + _x((32, 4), seed=0)
  labels = jax.random.randint(jax.random.key(1), (32,), 0, 3)
  tx = optax.adam(3e-2)
  steps = 6
  step_keys = [jax.random.split(jax.random.fold_in(jax.random.key(42), s), 3)
               for s in range(steps)]

  # linen
  net = LinenNet()
  variables = net.init(jax.random.key(0), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  @jax.jit
  def linen_step(params, batch_stats, opt_state, keys):
    def loss_fn(p):
      logits, updates = net.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                  keys=keys, mutable=["batch_stats"])
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
      np.testing.assert_allclose(np.asarray(getattr(module, var)[...]), np.asarray(value),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{linen_name}/{var}")
    for var, value in batch_stats.get(linen_name, {}).items():
      np.testing.assert_allclose(np.asarray(getattr(module, var)[...]), np.asarray(value),
                                 rtol=1e-5, atol=1e-6, err_msg=f"{linen_name}/{var}")
  assert set(batch_stats) == {"BatchNorm_0", "BatchNorm_1"}
  assert not np.allclose(np.asarray(batch_stats["BatchNorm_0"]["mean"]), 0.0)
  # Eval mode uses the running statistics and no noise, in both.
  model.eval()
  np.testing.assert_allclose(
      np.asarray(model(x)),
      np.asarray(net.apply({"params": params, "batch_stats": batch_stats}, x, train=False)),
      rtol=1e-5, atol=1e-5)
