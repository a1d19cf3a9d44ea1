"""Drop-in parity with flax's own modules.

Outputs, fields, checkpoints and messages are compared with flax.linen's
Dropout/BatchNorm/Dense and flax.nnx's Dropout/BatchNorm/Linear.

The references are flax 0.12 itself (drop-in behaviour). Parity checks that are
one method of a module test class stay in that class (tests/linen/test_stochastic.py).
"""

import inspect

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import (
  ATOL,
  RTOL,
  X,
  _close,
  _complex_input,
  _large_mean_data,
  _problem,
  _randomize,
  _x,
  reference_batch_norm,
)
from flax import nnx

import regjax
import regjax.linen as rnn
import regjax.nnx as rn
import regjax.nnx as rnnx
import regjax.nnx as rx


def test_flax_default_fails_on_large_mean_data():
  """Documents that the large-mean data is hard: flax's default one-pass
  variance (use_fast_variance=True) is off by > 1e3 where regjax is within 1e-2."""
  x = _large_mean_data()
  ry, _, _ = reference_batch_norm(x, np.zeros(16), np.ones(16))
  bn = nn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y_flax, _ = bn.apply(variables, x, mutable=["batch_stats"])
  y_ours = rnn.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])[0]
  err_flax = np.max(np.abs(np.asarray(y_flax, np.float64) - ry))
  err_ours = np.max(np.abs(np.asarray(y_ours, np.float64) - ry))
  assert err_flax > 1e3, err_flax  # ~1.4e3 with jax 0.10.2 / flax 0.12.8
  assert err_ours < 1e-2, err_ours


# ----------------------------------------------------------------------------
# Linen module against flax.linen.BatchNorm
def _shapes_dtypes(tree):
  return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), tree)


_LINEN_CASES = [
  ("default", dict(), (32, 4), jnp.float32),
  ("no_scale", dict(use_scale=False), (32, 4), jnp.float32),
  ("no_bias", dict(use_bias=False), (32, 4), jnp.float32),
  ("no_affine", dict(use_scale=False, use_bias=False), (32, 4), jnp.float32),
  ("axis_1", dict(axis=1), (8, 3, 4, 4), jnp.float32),
  ("momentum_epsilon", dict(momentum=0.9, epsilon=1e-2), (32, 4), jnp.float32),
  ("param_bf16", dict(param_dtype=jnp.bfloat16), (32, 4), jnp.float32),
  ("dtype_bf16", dict(dtype=jnp.bfloat16), (32, 4), jnp.float32),
  ("x_bf16", dict(), (32, 4), jnp.bfloat16),
  ("x_bf16_dtype_f32", dict(dtype=jnp.float32), (32, 4), jnp.bfloat16),
  ("all_bf16", dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), (32, 4), jnp.bfloat16),
]


@pytest.mark.parametrize(
  "kwargs,shape,x_dtype", [c[1:] for c in _LINEN_CASES], ids=[c[0] for c in _LINEN_CASES]
)
def test_linen_matches_flax(kwargs, shape, x_dtype):
  x, _, _, _ = _problem(shape, kwargs.get("axis", -1), seed=21, dtype=x_dtype)
  ours, theirs = rnn.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  key = jax.random.key(0)
  ours_vars = ours.init(key, x, use_running_average=False)
  theirs_vars = theirs.init(key, x, use_running_average=False)
  assert _shapes_dtypes(ours_vars) == _shapes_dtypes(theirs_vars)
  chex.assert_trees_all_equal(ours_vars, theirs_vars)  # same initial values too

  variables = _randomize(theirs_vars, seed=22)
  y_ours, upd_ours = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  y_theirs, upd_theirs = theirs.apply(
    variables, x, use_running_average=False, mutable=["batch_stats"]
  )
  e_ours = ours.apply(variables, x, use_running_average=True)
  e_theirs = theirs.apply(variables, x, use_running_average=True)
  assert y_ours.dtype == y_theirs.dtype and e_ours.dtype == e_theirs.dtype
  assert _shapes_dtypes(upd_ours) == _shapes_dtypes(upd_theirs)
  # Both compute in float32 and round once; a bf16 result may differ by one bf16 ulp.
  tol = 2.0**-7 if y_theirs.dtype == jnp.bfloat16 else RTOL
  _close(y_ours, y_theirs, rtol=tol, atol=ATOL)
  _close(e_ours, e_theirs, rtol=tol, atol=ATOL)
  chex.assert_trees_all_close(upd_ours, upd_theirs, rtol=RTOL, atol=ATOL)
  # ... and both really updated the statistics.
  assert not np.allclose(upd_ours["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def test_linen_mask_matches_flax():
  x, _, _, _ = _problem((32, 4), -1, seed=23)
  mask = jnp.asarray(np.random.default_rng(0).random((32, 4)) < 0.7)
  variables = _randomize(nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True), 24)
  kw = dict(use_running_average=False, mask=mask, mutable=["batch_stats"])
  y_ours, upd_ours = rnn.BatchNorm().apply(variables, x, **kw)
  y_theirs, upd_theirs = nn.BatchNorm().apply(variables, x, **kw)
  _close(y_ours, y_theirs)
  chex.assert_trees_all_close(upd_ours, upd_theirs, rtol=RTOL, atol=ATOL)


def test_flax_checkpoint_loads_into_regjax():
  x, _, _, _ = _problem((16, 2, 5), -1, seed=25)
  theirs = nn.BatchNorm(momentum=0.9)
  trained = _randomize(theirs.init(jax.random.key(1), x, use_running_average=True), 26)
  blob = flax.serialization.to_bytes(trained)

  ours = rnn.BatchNorm(momentum=0.9)
  template = ours.init(jax.random.key(2), x, use_running_average=True)
  restored = flax.serialization.from_bytes(template, blob)
  chex.assert_trees_all_equal(restored, trained)
  _close(
    ours.apply(restored, x, use_running_average=True),
    theirs.apply(trained, x, use_running_average=True),
  )
  y_ours, upd_ours = ours.apply(restored, x, use_running_average=False, mutable=["batch_stats"])
  y_theirs, upd_theirs = theirs.apply(
    trained, x, use_running_average=False, mutable=["batch_stats"]
  )
  _close(y_ours, y_theirs)
  chex.assert_trees_all_close(upd_ours, upd_theirs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("module_cls", [rnn.BatchNorm, nn.BatchNorm], ids=["regjax", "flax"])
def test_init_does_not_update_statistics(module_cls):
  x, _, _, _ = _problem((32, 3), -1, seed=29, loc=5.0, std=3.0)
  # axis_name is ignored at init: no named axis needs to exist there.
  variables = module_cls(use_running_average=False, axis_name="batch").init(jax.random.key(0), x)
  chex.assert_trees_all_equal(variables["batch_stats"], {"mean": jnp.zeros(3), "var": jnp.ones(3)})


def test_jax_generator_masks_are_flax_dropout_masks_for_broadcast_ops():
  # With rng_impl='jax', channel dropout and drop path draw the mask flax.linen.Dropout
  # draws with the same key and broadcast_dims (the values differ only by x / keep
  # versus x * (1 / keep)).
  import flax.linen as nn

  x = jax.random.normal(jax.random.key(62), (8, 5, 5, 6))
  key = jax.random.key(63)
  cases = ((regjax.channel_dropout, (1, 2)), (regjax.drop_path, (1, 2, 3)))
  for op, dims in cases:
    ours = np.asarray(op(x, 0.4, key=key, rng_impl="jax"))
    theirs = np.asarray(
      nn.Dropout(0.4, broadcast_dims=dims, deterministic=False).apply({}, x, rng=key)
    )
    np.testing.assert_array_equal(ours != 0, theirs != 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("use_running_average", [False, True])
def test_complex_input_matches_flax(use_running_average):
  x = _complex_input()
  kw = dict(momentum=0.9, epsilon=1e-3)
  ours, theirs = rnn.BatchNorm(**kw), nn.BatchNorm(**kw)
  variables = theirs.init(jax.random.key(0), x, use_running_average=False)
  if use_running_average:  # statistics from a previous (complex) training step
    _, upd = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **upd}
  got, got_upd = ours.apply(
    variables, x, use_running_average=use_running_average, mutable=["batch_stats"]
  )
  want, want_upd = theirs.apply(
    variables, x, use_running_average=use_running_average, mutable=["batch_stats"]
  )
  assert got.dtype == want.dtype == jnp.complex64
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    assert got_upd["batch_stats"][k].dtype == want_upd["batch_stats"][k].dtype
    np.testing.assert_allclose(
      got_upd["batch_stats"][k], want_upd["batch_stats"][k], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("force", [True, False])
def test_force_float32_reductions_matches_flax(force):
  x = jnp.asarray(3 + np.random.default_rng(10).standard_normal((32, 4)), jnp.bfloat16)
  kw = dict(use_running_average=False, param_dtype=jnp.bfloat16, force_float32_reductions=force)
  ours, theirs = rnn.BatchNorm(**kw), nn.BatchNorm(**kw)
  variables = theirs.init(jax.random.key(0), x)
  ours_vars = ours.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: a.dtype, ours_vars) == jax.tree.map(lambda a: a.dtype, variables)
  got, got_upd = ours.apply(variables, x, mutable=["batch_stats"])
  want, want_upd = theirs.apply(variables, x, mutable=["batch_stats"])
  assert got.dtype == want.dtype
  for k in ("mean", "var"):
    assert got_upd["batch_stats"][k].dtype == want_upd["batch_stats"][k].dtype
  # Against float64 (flax's bfloat16 E[x^2]-E[x]^2 is itself off by 0.096 here
  # without float32 reductions): within 4 bfloat16 ulps at |y| ~ 2 (ulp 2**-7).
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=4 * 2.0**-7)


def test_nnx_promote_dtype_is_applied_like_flax():
  seen = []

  def promote(arrays, *, dtype=None):
    seen.append(len(arrays))
    return nnx.nn.dtypes.promote_dtype(arrays, dtype=jnp.float32)

  x = jnp.asarray(np.random.default_rng(11).standard_normal((8, 3)), jnp.bfloat16)
  ours = rnnx.BatchNorm(3, promote_dtype=promote, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(3, promote_dtype=promote, rngs=nnx.Rngs(0))
  got, want = ours(x), theirs(x)
  assert seen == [5, 5]
  assert got.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert ours.mean.dtype == jnp.float32
  # Default promotion: same output dtype as flax for bf16 input and bf16 params.
  ours = rnnx.BatchNorm(3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert ours(x).dtype == theirs(x).dtype


def test_flax_nnx_dropout_message_is_the_same_phrase():
  phrase = "`deterministic` is False, but no `rngs` argument was provided to Dropout"
  with pytest.raises(ValueError, match=phrase):
    nnx.Dropout(0.5)(X)
  with pytest.raises(ValueError, match=phrase):
    rn.Dropout(0.5)(X)


def test_dropout_matches_flax_nnx_dropout_key_for_key():
  x = _x((16, 40), seed=0)
  # rng_impl='jax' draws with jax.random.bernoulli, as flax does.
  ours = rx.Dropout(0.4, rng_impl="jax", rngs=nnx.Rngs(dropout=1))
  theirs = nnx.Dropout(0.4, rngs=nnx.Rngs(dropout=1))
  for _ in range(2):  # the kept stream forks and advances exactly as flax's does
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-6)
  key = jax.random.key(7)
  np.testing.assert_allclose(
    np.asarray(ours(x, rngs=key)), np.asarray(theirs(x, rngs=key)), rtol=1e-6
  )


def test_noise_constructor_matches_flax_nnx_dropout():
  ours = dict(inspect.signature(rx.Dropout.__init__).parameters)
  theirs = inspect.signature(nnx.Dropout.__init__).parameters
  # Our additions, the generator choice and classic dropout, are keyword-only with defaults.
  for name, default in (("rng_impl", "hash"), ("inverted", True)):
    extra = ours.pop(name)
    assert extra.kind == inspect.Parameter.KEYWORD_ONLY and extra.default == default, name
  assert list(ours) == list(theirs)
  assert all(ours[p].default == theirs[p].default and ours[p].kind == theirs[p].kind for p in ours)
  call_ours = inspect.signature(rx.Dropout.__call__).parameters
  call_theirs = inspect.signature(nnx.Dropout.__call__).parameters
  assert list(call_ours) == list(call_theirs)


def test_drop_connect_is_an_nnx_linear_drop_in():
  ours = rx.DropConnect(5, 4, rate=0.4, rngs=nnx.Rngs(0, dropout=1))
  linear = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
  # The same parameters (names, types, shapes, values from the same rngs draws).
  assert set(nnx.state(ours)) == {"kernel", "bias", "rngs"}
  assert set(nnx.state(ours, nnx.Param)) == set(nnx.state(linear, nnx.Param))
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(
      np.asarray(getattr(ours, name)[...]), np.asarray(getattr(linear, name)[...])
    )
  assert ours.kernel.shape == (5, 4) and ours.bias.shape == (4,)
  params_ours = inspect.signature(rx.DropConnect.__init__).parameters
  params_linear = inspect.signature(nnx.Linear.__init__).parameters
  assert set(params_ours) - set(params_linear) == {
    "rate",
    "deterministic",
    "rng_collection",
    "rng_impl",
  }
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
    np.asarray(y), np.asarray(linen.apply(variables, x, deterministic=False, rng=key))
  )
  assert not np.allclose(np.asarray(y), np.asarray(linear(x)))
  # The kept stream advances; rate 0 and eval need no stream.
  assert not np.array_equal(np.asarray(ours(x)), np.asarray(ours(x)))
  no_stream = rx.DropConnect(5, 4, use_bias=False, rngs=nnx.Rngs(0))
  assert no_stream.bias is None and set(nnx.state(no_stream)) == {"kernel"}
  with pytest.raises(ValueError, match="needs the 'dropout' PRNG stream"):
    no_stream(x)
  np.testing.assert_array_equal(
    np.asarray(no_stream(x, deterministic=True)), np.asarray(x @ no_stream.kernel[...])
  )
  with pytest.raises(ValueError, match="`kernel` must have shape"):
    ours(_x((3, 6)), deterministic=True)


def test_batch_norm_constructor_matches_flax_nnx():
  ours = inspect.signature(rx.BatchNorm.__init__).parameters
  theirs = inspect.signature(nnx.BatchNorm.__init__).parameters
  missing = set(theirs) - set(ours)
  assert missing == set()
  for p in set(theirs) & set(ours) - {"bias_init", "scale_init"}:
    assert ours[p].default == theirs[p].default and ours[p].kind == theirs[p].kind, p
  mine, ref = rx.BatchNorm(5, rngs=nnx.Rngs(0)), nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  for attr in (
    "num_features",
    "use_running_average",
    "axis",
    "momentum",
    "epsilon",
    "dtype",
    "param_dtype",
    "use_bias",
    "use_scale",
    "axis_name",
    "axis_index_groups",
    "use_fast_variance",
  ):
    assert getattr(mine, attr) == getattr(ref, attr), attr
  for a, b in zip(jax.tree.leaves(nnx.state(mine)), jax.tree.leaves(nnx.state(ref)), strict=False):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
  "kwargs, shape",
  [
    ({}, (32, 5)),
    ({"momentum": 0.9, "epsilon": 1e-3}, (8, 4, 4, 3)),
    ({"axis": 1, "momentum": 0.8}, (8, 3, 4)),
    ({"use_scale": False, "use_bias": False}, (16, 5)),
  ],
)
def test_batch_norm_matches_flax_nnx_batch_norm(kwargs, shape):
  n = shape[kwargs.get("axis", -1)]
  ours = rx.BatchNorm(n, **kwargs, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(n, **kwargs, rngs=nnx.Rngs(0))
  both = nnx.jit(lambda a, b, x: (a(x), b(x)))  # one compilation per mode, not per op
  for step in range(3):
    y_ours, y_theirs = both(ours, theirs, 2.0 + 3.0 * _x(shape, seed=step))
    np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), atol=2e-5)
    for name in ("mean", "var"):
      np.testing.assert_allclose(
        np.asarray(getattr(ours, name)[...]),
        np.asarray(getattr(theirs, name)[...]),
        rtol=1e-5,
        atol=1e-6,
      )
  ours.eval()
  theirs.eval()
  y_ours, y_theirs = both(ours, theirs, _x(shape, seed=9))
  np.testing.assert_allclose(np.asarray(y_ours), np.asarray(y_theirs), atol=2e-5)
