"""regjax._specs: each op's strength range and no-draw values, as the ops and modules use them."""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import regjax
import regjax.linen as L
import regjax.nnx as N
from regjax import _checks, _specs, constraints, weights

X = jnp.linspace(-2.0, 2.0, 2 * 6 * 6 * 3).reshape(2, 6, 6, 3)
KERNEL = jnp.linspace(-1.0, 1.0, 3 * 4).reshape(3, 4)


def _dropconnect(x, rate, **kw):
  return regjax.dropconnect_dense(x[..., :3], KERNEL, None, rate, **kw)


# op, its spec, a value inside the range that draws
OPS = {
  "dropout": (regjax.dropout, _specs.DROPOUT, 0.3),
  "gaussian_dropout": (regjax.gaussian_dropout, _specs.GAUSSIAN_DROPOUT, 0.3),
  "uout": (regjax.uout, _specs.UOUT, 0.3),
  "alpha_dropout": (regjax.alpha_dropout, _specs.ALPHA_DROPOUT, 0.3),
  "gaussian_noise": (regjax.gaussian_noise, _specs.GAUSSIAN_NOISE, 0.3),
  "channel_dropout": (regjax.channel_dropout, _specs.CHANNEL_DROPOUT, 0.3),
  "drop_path": (regjax.drop_path, _specs.DROP_PATH, 0.3),
  "dropblock": (
    lambda x, r, **kw: regjax.dropblock(x, r, block_size=3, **kw),
    _specs.DROPBLOCK,
    0.3,
  ),
  "dropconnect_dense": (_dropconnect, _specs.DROPCONNECT, 0.3),
  "cutout": (regjax.cutout, _specs.CUTOUT, 2),
}
RANGED = [name for name in OPS if name != "cutout"]  # cutout's bound is the image's side


@pytest.mark.parametrize("name", list(OPS))
def test_no_draw_values_need_no_key_and_give_the_spec_result(name):
  op, spec, _ = OPS[name]
  for value in spec.identity_at + spec.zeros_at:
    value = int(value) if name == "cutout" else value
    assert spec.needs_no_draw(value)
    y = op(X, value)  # no key
    if name == "dropconnect_dense":
      continue  # its no-draw results are dropout's, on the kernel
    expected = X if value in spec.identity_at else jnp.zeros_like(X)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert spec.result_without_draw(X, value, False) is not None


@pytest.mark.parametrize("name", list(OPS))
def test_other_values_need_a_key(name):
  op, spec, value = OPS[name]
  assert not spec.needs_no_draw(value)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    op(X, value)


def test_a_traced_strength_always_needs_a_draw():
  seen = []
  jax.jit(lambda r: seen.append(_specs.DROPOUT.needs_no_draw(r)) or r)(0.0)
  assert seen == [False]


@pytest.mark.parametrize("name", RANGED)
def test_the_op_rejects_what_the_spec_rejects_with_the_same_message(name):
  op, spec, _ = OPS[name]
  outside = [spec.low - 0.5, math.nan]
  outside.append(spec.high if not spec.high_inclusive else spec.high + 0.5)
  for value in outside:
    with pytest.raises(ValueError) as from_spec:
      spec.check(value, "OP")
    with pytest.raises(ValueError) as from_op:
      op(X, value, key=jax.random.key(0))
    assert str(from_op.value).split(": ", 1)[1] == str(from_spec.value).split(": ", 1)[1]
  assert spec.check(spec.low, "OP") == spec.low


def test_spec_table():
  drop = (
    _specs.DROPOUT,
    _specs.CHANNEL_DROPOUT,
    _specs.DROP_PATH,
    _specs.DROPCONNECT,
    _specs.ALPHA_DROPOUT,
  )
  for spec in drop:
    assert (spec.name, spec.low, spec.high, spec.high_inclusive) == ("rate", 0.0, 1.0, True)
    assert spec.identity_at == (0.0,) and spec.zeros_at == (1.0,)
  assert _specs.GAUSSIAN_DROPOUT.high_inclusive is False
  assert _specs.DROPBLOCK.zeros_at == ()  # rate 1 still draws seeds
  assert _specs.UOUT.name == "beta" and _specs.GAUSSIAN_NOISE.name == "stddev"
  assert _specs.CUTOUT.name == "size"
  with pytest.raises(dataclasses.FrozenInstanceError):
    _specs.DROPOUT.low = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
  "name, ctor, spec",
  [
    ("Dropout", N.Dropout, _specs.DROPOUT),
    ("GaussianDropout", N.GaussianDropout, _specs.GAUSSIAN_DROPOUT),
    ("Uout", N.Uout, _specs.UOUT),
    ("AlphaDropout", N.AlphaDropout, _specs.ALPHA_DROPOUT),
    ("GaussianNoise", N.GaussianNoise, _specs.GAUSSIAN_NOISE),
    ("ChannelDropout", N.ChannelDropout, _specs.CHANNEL_DROPOUT),
    ("DropPath", N.DropPath, _specs.DROP_PATH),
    ("DropBlock", N.DropBlock, _specs.DROPBLOCK),
  ],
)
def test_nnx_constructors_check_with_the_op_spec(name, ctor, spec):
  bad = spec.high if not spec.high_inclusive else spec.high + 0.5
  with pytest.raises(ValueError, match=rf"regjax\.nnx\.{name}: `{spec.name}` must be in"):
    ctor(bad)
  with pytest.raises(ValueError, match=rf"regjax\.nnx\.{name}: `{spec.name}` must be in"):
    ctor(-0.5)
  rate = jnp.float32(0.25)
  assert getattr(ctor(rate), spec.name) is rate  # kept as given: pytree data


def test_nnx_dropconnect_checks_its_rate():
  from flax import nnx

  with pytest.raises(ValueError, match=r"regjax\.nnx\.DropConnect: `rate` must be in \[0, 1\]"):
    N.DropConnect(3, 4, rngs=nnx.Rngs(0), rate=1.5)


@pytest.mark.parametrize(
  "module",
  [
    L.Dropout(1.0),
    L.Dropout(0.0),
    L.AlphaDropout(1.0),
    L.GaussianDropout(0.0),
    L.Uout(0.0),
    L.GaussianNoise(0.0),
    L.ChannelDropout(1.0),
    L.DropPath(1.0),
    L.DropBlock(0.0, block_size=3),
    L.Cutout(0),
  ],
)
def test_linen_modules_ask_for_no_key_where_the_spec_needs_no_draw(module):
  module.apply({}, X, deterministic=False)  # no 'dropout' stream


def test_linen_modules_ask_for_a_key_otherwise():
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
    L.DropBlock(1.0, block_size=3).apply({}, X, deterministic=False)


def test_nnx_modules_ask_for_no_key_where_the_spec_needs_no_draw():
  for module in (
    N.Dropout(1.0),
    N.AlphaDropout(0.0),
    N.Uout(0.0),
    N.DropPath(1.0),
    N.Cutout(0),
    N.DropBlock(0.0, block_size=3),
  ):
    module(X)  # train mode by default, and no stream kept
  with pytest.raises(ValueError, match="no `rngs` argument was provided"):
    N.DropBlock(1.0, block_size=3)(X)


def test_check_rate_with_an_open_lower_bound():
  def check(value):
    return _checks.check_rate(
      value, "OP", "c", low=0.0, high=math.inf, low_inclusive=False, high_inclusive=False
    )

  assert check(0.5) == 0.5
  for bad in (0.0, -0.0, -1.0, math.nan, math.inf):
    with pytest.raises(ValueError, match=r"^OP: `c` must be in \(0, inf\); got "):
      check(bad)
  with pytest.raises(ValueError, match="must be a scalar"):
    check(np.ones(2))
  with pytest.raises(TypeError, match="must be a real number"):
    check("3")


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_max_norm_states_the_open_range(bad):
  params = {"kernel": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match=r"regjax\.max_norm: `max_value` must be in \(0, inf\)"):
    regjax.max_norm(params, bad)
  with pytest.raises(ValueError, match=r"max_norm_projection: `max_value` must be in \(0, inf\)"):
    regjax.max_norm_projection(bad)


def test_max_norm_lives_in_constraints_and_is_reexported():
  for name in ("max_norm", "max_norm_projection", "default_max_norm_filter"):
    assert getattr(weights, name) is getattr(constraints, name) is getattr(regjax, name)
    assert name in weights.__all__ and name in constraints.__all__


def test_check_key_returns_the_key():
  key = jax.random.key(0)
  assert _checks.check_key(key, "OP") is key
  raw = jax.random.PRNGKey(0)
  assert _checks.check_key(raw, "OP") is raw


def _old_schedule(step, total_steps, final_rate):
  """The ramp as regjax computed it before the deprecation."""
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return jnp.clip(jnp.asarray(final_rate, jnp.float32), 0.0, 1.0) * fraction


@pytest.mark.parametrize(
  "total_steps, final_rate", [(10, 0.3), (100, 0.1), (7, 0.25), (1000, 0.15), (3, 1.0), (1, 0.5)]
)
def test_dropblock_rate_schedule_is_deprecated_for_optax_with_equal_values(total_steps, final_rate):
  ramp = optax.linear_schedule(0.0, final_rate, total_steps)
  ulp = float(np.spacing(np.float32(final_rate)))
  for step in range(-2, total_steps + 3):
    with pytest.warns(DeprecationWarning, match=r"optax\.linear_schedule\(0\.0, final_rate"):
      value = regjax.dropblock_rate_schedule(step, total_steps, final_rate)
    assert value.dtype == jnp.float32 and value.shape == ()
    assert float(value) == float(_old_schedule(step, total_steps, final_rate))  # unchanged
    assert abs(float(value) - float(ramp(step))) <= ulp  # optax's, to float32 rounding
  assert float(ramp(total_steps)) == pytest.approx(final_rate) and float(ramp(0)) == 0.0


def test_dropblock_rate_schedule_still_traces_and_checks():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    value = jax.jit(lambda s: regjax.dropblock_rate_schedule(s, 10, 0.3))(5)
    assert float(value) == float(_old_schedule(5, 10, 0.3))
    with pytest.raises(ValueError, match=r"`final_rate` must be in \[0, 1\]"):
      regjax.dropblock_rate_schedule(0, 10, 1.5)
