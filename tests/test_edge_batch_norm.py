"""BatchNorm edge cases: masks, non-finite padding, empty batches, bad arguments, flax parity.

Each test states the failure it guards against; the references are float64
NumPy (statistics) or flax 0.12 (drop-in behaviour).
"""

import json
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import regjax
import regjax.linen as rnn
import regjax.nnx as rnnx
from host_devices import run_on_host_devices

# float32 input at mean 1e4, std 1: a half ulp of 1e4 is 4.9e-4, so a float32
# mean is off by up to a few of those, and y by that over the feature's std;
# the naive E[x^2]-E[x]^2 loses the variance entirely (its cancellation error
# is ~1e4**2 * 6e-8 = 6).
_BIG_MEAN = 1e4
_MEAN_ATOL = 4 * 4.9e-4
_VAR_RTOL = 1e-4


def _masked_reference(x, mask, axis=-1):
  """float64 mean and (biased) variance over the positions ``mask`` selects."""
  x = np.asarray(x, np.float64)
  m = np.broadcast_to(np.asarray(mask), x.shape)
  red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  n = m.sum(red)
  mean = np.where(m, x, 0).sum(red) / n
  keep = tuple(1 if a in red else x.shape[a] for a in range(x.ndim))
  var = (np.where(m, x - mean.reshape(keep), 0) ** 2).sum(red) / n
  return mean, var


def _big_mean(shape, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(_BIG_MEAN + rng.standard_normal(shape), jnp.float32)


def _check_against_reference(x, mask, pad_value=0.0):
  x = jnp.where(mask, x, pad_value)
  c = x.shape[-1]
  y, new = regjax.batch_norm(x, regjax.init_batch_stats(c), momentum=0.0, mask=mask)
  mean, var = _masked_reference(x, mask)
  np.testing.assert_allclose(new["var"], var, rtol=_VAR_RTOL)
  np.testing.assert_allclose(new["mean"], mean, rtol=0, atol=_MEAN_ATOL)
  keep = (1,) * (x.ndim - 1) + (c,)
  want_y = (np.asarray(x, np.float64) - mean.reshape(keep)) / np.sqrt(var.reshape(keep) + 1e-5)
  m = np.broadcast_to(np.asarray(mask), x.shape)
  err = np.abs(np.where(m, np.asarray(y, np.float64) - want_y, 0))
  assert np.all(err <= _MEAN_ATOL / np.sqrt(var.reshape(keep) + 1e-5)), err.max()


def test_mask_first_row_masked_tall():
  # (256, 6), row 0 masked: used to give running var 0.0 (float64: 0.91-1.02).
  mask = jnp.ones((256, 1), bool).at[0].set(False)
  _check_against_reference(_big_mean((256, 6)), mask)


def test_mask_first_row_masked_wide():
  # (4, 64): the dot-product path (short, wide input).
  mask = jnp.asarray([[False], [True], [True], [True]])
  _check_against_reference(_big_mean((4, 64), seed=1), mask)


def test_mask_left_padded_sequence():
  # Batch 8, length 16, 4 features; sequence b has b + 1 left pads (never position 0).
  pads = np.arange(8) + 1
  mask = jnp.asarray(np.arange(16)[None, :] >= pads[:, None])[..., None]
  _check_against_reference(_big_mean((8, 16, 4), seed=2), mask)


def test_mask_per_feature_first_selected_differs():
  # Each feature selects a different first position (mask of x's full shape).
  rng = np.random.default_rng(3)
  mask = jnp.asarray(rng.uniform(size=(64, 5)) < 0.5).at[0].set(False)
  _check_against_reference(_big_mean((64, 5), seed=3), mask, pad_value=-3e4)


_SHARD_MAP_SCRIPT = textwrap.dedent(r"""
  import json
  import numpy as np, jax, jax.numpy as jnp, regjax
  from jax.sharding import PartitionSpec as P
  assert jax.device_count() == 4
  rng = np.random.default_rng(0)
  x = jnp.asarray(1e4 + rng.standard_normal((32, 6)), jnp.float32)
  keep = np.ones((32, 1), bool)
  keep[::8] = False  # each device's first local row
  x = jnp.where(keep, x, 0.0)
  mesh = jax.make_mesh((4,), ("batch",))
  fn = lambda x, s, m: regjax.batch_norm(x, s, momentum=0.0, axis_name="batch", mask=m)
  run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
                              out_specs=(P("batch"), P())))
  from jax.sharding import NamedSharding
  rows = NamedSharding(mesh, P("batch"))
  y, new = run(jax.device_put(x, rows), regjax.init_batch_stats(6),
               jax.device_put(jnp.asarray(keep), rows))
  print(json.dumps({"x": np.asarray(x).tolist(), "keep": keep.tolist(),
                    "y": np.asarray(y).tolist(), "mean": np.asarray(new["mean"]).tolist(),
                    "var": np.asarray(new["var"]).tolist()}))
""")


def test_mask_first_local_row_masked_under_shard_map():
  out = json.loads(run_on_host_devices(_SHARD_MAP_SCRIPT, 4).strip().splitlines()[-1])
  keep = np.asarray(out["keep"])
  mean, var = _masked_reference(np.asarray(out["x"], np.float32), keep)
  np.testing.assert_allclose(out["var"], var, rtol=_VAR_RTOL)
  np.testing.assert_allclose(out["mean"], mean, rtol=0, atol=_MEAN_ATOL)
  want_y = (np.asarray(out["x"], np.float64) - mean) / np.sqrt(var + 1e-5)
  err = np.abs(np.where(keep, np.asarray(out["y"]) - want_y, 0))
  assert np.all(err <= _MEAN_ATOL / np.sqrt(var + 1e-5)), err.max()


# ----------------------------------------------------------------------------
# Non-finite values in masked-out positions


@pytest.mark.parametrize("shape", [(16, 4), (4, 64)], ids=["reduce", "dot"])
def test_nonfinite_padding_leaves_statistics_and_gradients_finite(shape):
  rng = np.random.default_rng(4)
  n, c = shape
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  mask = jnp.ones((n, 1), bool).at[0].set(False).at[n - 1].set(False)
  bad = x.at[0].set(jnp.nan).at[n - 1].set(jnp.inf)
  clean = x.at[0].set(0.0).at[n - 1].set(0.0)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
  bias = jnp.asarray(rng.normal(size=c), jnp.float32)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def loss(x, scale, bias):
    y, new = regjax.batch_norm(x, regjax.init_batch_stats(c), scale, bias, mask=mask)
    return jnp.sum(jnp.where(mask, y * w, 0.0)), new

  (got, got_stats), got_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
      bad, scale, bias)
  (want, want_stats), want_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(
      clean, scale, bias)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(got_stats[k], want_stats[k])
  for g, h in zip(got_grads, want_grads):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)


def test_masked_finite_positions_keep_their_exact_derivative():
  # Finite padding still differentiates exactly (check_grads, both modes).
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((12, 3)), jnp.float64 if jax.config.x64_enabled
                  else jnp.float32)
  mask = jnp.ones((12, 1), bool).at[0].set(False)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 3), x.dtype)
  f = lambda x, s: regjax.batch_norm(x, regjax.init_batch_stats(3), s, mask=mask)[0]
  check_grads(f, (x, scale), order=1, modes=("fwd", "rev"), atol=5e-2,
                            rtol=5e-2)


# ----------------------------------------------------------------------------
# Empty batches, traced momentum


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_empty_batch_keeps_statistics(use_mask, jit):
  stats = {"mean": jnp.arange(8.0), "var": jnp.arange(1.0, 9.0)}
  mask = jnp.ones((0, 8), bool) if use_mask else None
  fn = lambda x: regjax.batch_norm(x, stats, mask=mask)
  y, new = (jax.jit(fn) if jit else fn)(jnp.ones((0, 8)))
  assert y.shape == (0, 8)
  np.testing.assert_array_equal(new["mean"], stats["mean"])
  np.testing.assert_array_equal(new["var"], stats["var"])
  g = jax.grad(lambda x: jnp.sum(fn(x)[0]))(jnp.ones((0, 8)))
  assert g.shape == (0, 8)


def test_empty_batch_in_modules():
  x0 = jnp.ones((0, 8))
  variables = rnn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((2, 8)))
  y, upd = rnn.BatchNorm(use_running_average=False).apply(variables, x0, mutable=["batch_stats"])
  assert y.shape == (0, 8)
  np.testing.assert_array_equal(upd["batch_stats"]["var"], variables["batch_stats"]["var"])
  bn = rnnx.BatchNorm(8, rngs=nnx.Rngs(0))
  assert bn(x0).shape == (0, 8)
  np.testing.assert_array_equal(bn.var[...], jnp.ones(8))


@pytest.mark.parametrize("momentum", [np.nan, np.inf, -np.inf, 1.5, -0.5])
def test_traced_momentum_nonfinite_keeps_statistics_out_of_range_clips(momentum):
  stats = {"mean": jnp.full(3, 2.0), "var": jnp.full(3, 3.0)}
  x = jnp.asarray(np.random.default_rng(6).standard_normal((10, 3)), jnp.float32)
  _, new = jax.jit(lambda x, m: regjax.batch_norm(x, stats, momentum=m))(x, momentum)
  if momentum == -0.5:  # clipped to 0: the batch statistics replace the old ones
    np.testing.assert_allclose(new["var"], np.var(np.asarray(x, np.float64), 0), rtol=1e-5)
  else:  # NaN and +-inf keep the statistics; 1.5 clips to 1, which keeps them too
    np.testing.assert_array_equal(new["mean"], stats["mean"])
    np.testing.assert_array_equal(new["var"], stats["var"])


def test_concrete_bad_momentum_is_rejected():
  with pytest.raises(ValueError, match="momentum"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), momentum=float("nan"))


# ----------------------------------------------------------------------------
# Bad arguments get errors that name them


@pytest.mark.parametrize("axis", [1.0, None, "0", (0, 1.5)])
def test_axis_must_be_int_or_tuple_of_ints(axis):
  with pytest.raises(TypeError, match="`axis` must be an int or a tuple of ints"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), axis=axis)
  with pytest.raises(TypeError, match="`axis`"):
    rnn.BatchNorm(use_running_average=False, axis=axis).init(jax.random.key(0), jnp.ones((4, 3)))


def test_none_statistics_are_rejected():
  with pytest.raises(ValueError, match=r"batch_stats\['mean'\]` is None"):
    regjax.batch_norm(jnp.ones((4, 3)), {"mean": None, "var": None})


def test_one_dimensional_input_train_mode_is_an_error_eval_is_not():
  stats = regjax.init_batch_stats(8)
  with pytest.raises(ValueError, match="needs a batch axis"):
    regjax.batch_norm(jnp.ones(8), stats)
  y, _ = regjax.batch_norm(jnp.full(8, 2.0), stats, deterministic=True)
  np.testing.assert_allclose(y, 2.0 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_integer_output_dtype_is_rejected():
  with pytest.raises(TypeError, match="`dtype` must be a floating-point"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), dtype=jnp.int32)


@pytest.mark.parametrize("eps", [np.float32(1e-3), np.float64(1e-3), 1e-3])
def test_numpy_epsilon_is_accepted_everywhere(eps):
  x = jnp.asarray(np.random.default_rng(7).standard_normal((6, 3)), jnp.float32)
  want, _ = regjax.batch_norm(x, regjax.init_batch_stats(3), epsilon=1e-3)
  got, _ = regjax.batch_norm(x, regjax.init_batch_stats(3), epsilon=eps)
  np.testing.assert_array_equal(got, want)
  variables = rnn.BatchNorm(use_running_average=False, epsilon=eps).init(jax.random.key(0), x)
  got, _ = rnn.BatchNorm(use_running_average=False, epsilon=eps).apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(rnnx.BatchNorm(3, epsilon=eps, rngs=nnx.Rngs(0))(x), want)


@pytest.mark.parametrize("eps", [0.0, -1e-3, np.float32(np.nan), np.inf, True])
def test_bad_epsilon_is_rejected(eps):
  with pytest.raises(ValueError, match="epsilon"):
    regjax.batch_norm(jnp.ones((4, 3)), regjax.init_batch_stats(3), epsilon=eps)
  with pytest.raises(ValueError, match="epsilon"):
    rnnx.BatchNorm(3, epsilon=eps, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------
# Parity with flax 0.12: complex input, force_float32_reductions, promote_dtype


def _complex_input(shape=(16, 4), seed=8):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + 3 - 2j,
                     jnp.complex64)


@pytest.mark.parametrize("use_running_average", [False, True])
def test_complex_input_matches_flax(use_running_average):
  x = _complex_input()
  kw = dict(momentum=0.9, epsilon=1e-3)
  ours, theirs = rnn.BatchNorm(**kw), nn.BatchNorm(**kw)
  variables = theirs.init(jax.random.key(0), x, use_running_average=False)
  if use_running_average:  # statistics from a previous (complex) training step
    _, upd = theirs.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **upd}
  got, got_upd = ours.apply(variables, x, use_running_average=use_running_average,
                            mutable=["batch_stats"])
  want, want_upd = theirs.apply(variables, x, use_running_average=use_running_average,
                                mutable=["batch_stats"])
  assert got.dtype == want.dtype == jnp.complex64
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    assert got_upd["batch_stats"][k].dtype == want_upd["batch_stats"][k].dtype
    np.testing.assert_allclose(got_upd["batch_stats"][k], want_upd["batch_stats"][k],
                               rtol=1e-5, atol=1e-6)


def test_complex_statistics_against_float64():
  x = _complex_input((32, 3), seed=9)
  _, new = regjax.batch_norm(x, regjax.init_batch_stats(3), momentum=0.0)
  xn = np.asarray(x, np.complex128)
  np.testing.assert_allclose(new["mean"], xn.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new["var"], (np.abs(xn - xn.mean(0)) ** 2).mean(0), rtol=1e-5)
  assert not jnp.iscomplexobj(new["var"])


@pytest.mark.parametrize("force", [True, False])
def test_force_float32_reductions_matches_flax(force):
  x = jnp.asarray(3 + np.random.default_rng(10).standard_normal((32, 4)), jnp.bfloat16)
  kw = dict(use_running_average=False, param_dtype=jnp.bfloat16,
            force_float32_reductions=force)
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
