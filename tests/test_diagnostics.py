"""Tests of the regjax.diagnostics front door, across linen and NNX models.

Uneven batches, missing batch_stats, lifted transforms (remat, jit, scan, vmap),
sharded batches, the lazy submodule, and linen and NNX giving the same answer.
The analytic variance-shift checks per framework live in tests/linen and tests/nnx.
"""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import LinenNet
from flax import nnx
from host_devices import run_on_host_devices

import regjax
import regjax.linen as rnn
import regjax.nnx as rx
from regjax import diagnostics

FEATURES = 6


SIZES = (32, 32, 1)  # a leftover last batch of one sample


def _uneven_batches(sizes=SIZES, seed=0):
  """Batches whose means and spreads differ, so pooling must weigh by count."""
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  return [
    3.0 * (i + 1) + (i + 1) * jax.random.normal(k, (n, FEATURES))
    for i, (k, n) in enumerate(zip(keys, sizes, strict=False))
  ]


def _pooled(batches, ddof=0):
  data = np.concatenate([np.asarray(b, np.float64) for b in batches])
  return data.mean(0), data.var(0, ddof=ddof)


# --------------------------------------------------------------------------
# 1. recalibration pools every sample exactly.
class RawBN(nn.Module):
  """BNs of both kinds straight on the input (each sees the raw data)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = nn.BatchNorm(use_running_average=not train, name="flax_bn")(x)
    b = rnn.BatchNorm(deterministic=not train, name="rj_bn")(x)
    c = rnn.BatchNorm(deterministic=not train, unbiased_running_var=True, name="rj_unbiased")(x)
    return a + b + c


def _linen_eval(model):
  return lambda v, x: model.apply(v, x, train=False)


def test_linen_recalibration_is_the_pooled_population_statistics():
  model = RawBN()
  batches = _uneven_batches()
  variables = model.init(jax.random.key(0), batches[0])
  new = diagnostics.recalibrate_batch_stats(_linen_eval(model), variables, batches)
  mean, var = _pooled(batches)
  _, var_unbiased = _pooled(batches, ddof=1)
  for name in ("flax_bn", "rj_bn"):
    np.testing.assert_allclose(np.asarray(new[name]["mean"]), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new[name]["var"]), var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new["rj_unbiased"]["mean"]), mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new["rj_unbiased"]["var"]), var_unbiased, rtol=1e-5)
  # Not the average of per-batch statistics, which the batch of 1 would skew.
  per_batch = np.mean([np.asarray(b, np.float64).var(0) for b in batches], 0)
  assert not np.allclose(np.asarray(new["rj_bn"]["var"]), per_batch, rtol=1e-2)
  assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(
    lambda a: a.dtype, variables["batch_stats"]
  )


def test_linen_recalibration_with_a_mask_weighs_only_selected_values():
  class Masked(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
      return rnn.BatchNorm(deterministic=True)(x, mask=mask)

  model = Masked()
  batches = _uneven_batches()
  masks = [jnp.arange(b.shape[0])[:, None] % 3 != 1 for b in batches]
  variables = model.init(jax.random.key(0), batches[0], masks[0])
  sizes = [b.shape[0] for b in batches]
  # The mask travels inside the input: x carries a mask column block.
  packed = [
    jnp.concatenate([b, m.astype(b.dtype).repeat(FEATURES, 1)], 1)
    for b, m in zip(batches, masks, strict=False)
  ]

  def apply_fn(v, xm):
    return model.apply(v, xm[:, :FEATURES], xm[:, FEATURES:] > 0.5)

  new = diagnostics.recalibrate_batch_stats(apply_fn, variables, packed)
  selected = np.concatenate(
    [np.asarray(b, np.float64)[np.asarray(m[:, 0])] for b, m in zip(batches, masks, strict=False)]
  )
  assert selected.shape[0] < sum(sizes)
  np.testing.assert_allclose(np.asarray(new["BatchNorm_0"]["mean"]), selected.mean(0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new["BatchNorm_0"]["var"]), selected.var(0), rtol=1e-5)


class NNXRaw(nnx.Module):
  def __init__(self, rngs):
    self.flax_bn = nnx.BatchNorm(FEATURES, rngs=rngs)
    self.rj_bn = rx.BatchNorm(FEATURES, rngs=rngs)
    self.rj_unbiased = rx.BatchNorm(FEATURES, unbiased_running_var=True, rngs=rngs)

  def __call__(self, x):
    return self.flax_bn(x) + self.rj_bn(x) + self.rj_unbiased(x)


def test_nnx_recalibration_is_the_pooled_population_statistics():
  model = NNXRaw(nnx.Rngs(0))
  batches = _uneven_batches()
  new = diagnostics.recalibrate_batch_stats(model, batches)
  mean, var = _pooled(batches)
  _, var_unbiased = _pooled(batches, ddof=1)
  for name in ("flax_bn", "rj_bn"):
    np.testing.assert_allclose(np.asarray(new[name]["mean"][...]), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new[name]["var"][...]), var, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new["rj_unbiased"]["var"][...]), var_unbiased, rtol=1e-5)
  # Applying it gives the model those statistics; the model itself was untouched before.
  np.testing.assert_array_equal(np.asarray(model.rj_bn.var[...]), np.ones(FEATURES))
  nnx.update(model, new)
  np.testing.assert_allclose(np.asarray(model.rj_bn.var[...]), var, rtol=1e-5)


# --------------------------------------------------------------------------
# 2. missing batch_stats: a clear ValueError naming `variables`.
def test_linen_variables_without_batch_stats_raise_a_clear_error():
  model = RawBN()
  x = _uneven_batches()[0]
  params_only = {"params": model.init(jax.random.key(0), x)["params"]}
  for fn in (diagnostics.variance_shift, diagnostics.recalibrate_batch_stats):
    with pytest.raises(ValueError, match=r"`variables`.*'batch_stats'"):
      fn(_linen_eval(model), params_only, [x])


def test_linen_model_without_batch_norm_names_the_missing_collection():
  dense = nn.Dense(3)
  x = jnp.ones((2, 4))
  variables = dense.init(jax.random.key(0), x)
  for fn in (diagnostics.variance_shift, diagnostics.recalibrate_batch_stats):
    with pytest.raises(ValueError, match=r"no BatchNorm call was seen.*'batch_stats'"):
      fn(dense.apply, variables, [x])


def test_nnx_model_without_batch_norm_raises_value_error():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  for fn in (diagnostics.variance_shift, diagnostics.recalibrate_batch_stats):
    with pytest.raises(ValueError, match="no BatchNorm module"):
      fn(model, [jnp.ones((2, 4))])


# --------------------------------------------------------------------------
# 3. lifted transforms and the jit cache.
class Block(nn.Module):
  @nn.compact
  def __call__(self, x, carry=None):
    x = nn.Dense(FEATURES)(x)
    return rnn.BatchNorm(deterministic=True)(x), None


def _wrapped(transform):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return transform(Block)(name="block")(x)[0]

  return Net()


@pytest.mark.parametrize("transform", [nn.remat, nn.jit], ids=["remat", "jit"])
def test_batch_norm_inside_remat_and_jit(transform):
  plain, wrapped = _wrapped(lambda cls: cls), _wrapped(transform)
  batches = _uneven_batches()
  variables = plain.init(jax.random.key(0), batches[0])
  # Same parameter tree: only the transform differs.
  assert jax.tree.structure(wrapped.init(jax.random.key(0), batches[0])) == jax.tree.structure(
    variables
  )
  dense = variables["params"]["block"]["Dense_0"]
  h = [
    np.asarray(b, np.float64) @ np.asarray(dense["kernel"], np.float64)
    + np.asarray(dense["bias"], np.float64)
    for b in batches
  ]
  mean, var = _pooled(h)

  shifts = diagnostics.variance_shift(wrapped.apply, variables, batches)
  assert list(shifts) == ["block/BatchNorm_0"]
  np.testing.assert_allclose(shifts["block/BatchNorm_0"].real_var, var, rtol=1e-4)
  assert shifts["block/BatchNorm_0"].count == sum(SIZES)

  new = diagnostics.recalibrate_batch_stats(wrapped.apply, variables, batches)
  np.testing.assert_allclose(
    np.asarray(new["block"]["BatchNorm_0"]["mean"]), mean, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(np.asarray(new["block"]["BatchNorm_0"]["var"]), var, rtol=1e-4)


def _stacked(transform_name):
  kwargs = {"variable_axes": {"params": 0, "batch_stats": 0}, "split_rngs": {"params": True}}

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      if transform_name == "scan":
        return nn.scan(Block, length=3, **kwargs)(name="stack")(x, None)[0]
      return nn.vmap(Block, in_axes=0, **kwargs)(name="stack")(x)[0]

  return Net()


@pytest.mark.parametrize("transform_name", ["scan", "vmap"])
def test_stacked_batch_norm_under_scan_or_vmap_is_refused_clearly(transform_name):
  model = _stacked(transform_name)
  x = jnp.ones((4, FEATURES)) if transform_name == "scan" else jnp.ones((3, 4, FEATURES))
  variables = model.init(jax.random.key(0), x)
  for fn in (diagnostics.variance_shift, diagnostics.recalibrate_batch_stats):
    with pytest.raises(
      NotImplementedError,
      match=r"nn\.scan or nn\.vmap.*'stack/BatchNorm_0'"
      r"|'stack/BatchNorm_0'.*nn\.scan or nn\.vmap",
    ):
      fn(model.apply, variables, [x])


def test_shared_batch_norm_under_broadcasting_scan_pools_every_call():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, carry=None):
      return rnn.BatchNorm(deterministic=True)(x) * 0 + x * 2, None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(
        Shared, variable_broadcast=["params", "batch_stats"], split_rngs={"params": False}, length=2
      )(name="loop")(x, None)[0]

  model = Net()
  batches = _uneven_batches()
  variables = model.init(jax.random.key(0), batches[0])
  shifts = diagnostics.variance_shift(model.apply, variables, batches)
  layer = shifts["loop/BatchNorm_0"]
  # The carry doubles: the first iteration sees x, the second 2 * x.
  assert layer.count == 2 * sum(SIZES)
  _, var = _pooled([*batches, *(2 * b for b in batches)])
  np.testing.assert_allclose(layer.real_var, var, rtol=1e-5)


def test_call_order_is_right_on_a_jit_cache_hit():
  class ShapeDependent(nn.Module):
    """Calls its two BNs in an order that depends on the batch size."""

    @nn.compact
    def __call__(self, x):
      a, b = (
        rnn.BatchNorm(deterministic=True, name="a"),
        rnn.BatchNorm(deterministic=True, name="b"),
      )
      if x.shape[0] % 2:
        return b(a(x))
      return a(b(x))

  model = ShapeDependent()
  variables = model.init(jax.random.key(0), jnp.ones((3, FEATURES)))
  odd, even = jnp.ones((3, FEATURES)), jnp.ones((4, FEATURES))
  apply_fn = model.apply  # one function object: one cached capture, several shapes
  for _ in range(2):
    assert list(diagnostics.variance_shift(apply_fn, variables, [odd])) == ["a", "b"]
    assert list(diagnostics.variance_shift(apply_fn, variables, [even])) == ["b", "a"]


def test_nnx_stack_under_vmap_and_scan_is_refused_clearly():
  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(FEATURES, FEATURES, rngs=rngs)
      self.bn = rx.BatchNorm(FEATURES, rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(x))

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Layer(rngs)

      self.layers = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return layer(x)

      return body(x, self.layers)

  model = Stack(nnx.Rngs(0))
  x = jnp.ones((4, FEATURES))
  assert model(x).shape == x.shape
  for fn in (diagnostics.variance_shift, diagnostics.recalibrate_batch_stats):
    with pytest.raises(NotImplementedError, match=r"'layers/bn'.*nnx\.vmap.*nnx\.scan"):
      fn(model, [x])


def test_linen_capture_works_with_a_batch_sharded_over_two_devices():
  """The records leave through unordered callbacks: ordered ones are refused on
  more than one device. Run in a fresh process with two host devices."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      import regjax.linen as rnn
      from regjax import diagnostics
      assert jax.device_count() == 2
      mesh = jax.make_mesh((2,), ("b",))
      model = rnn.BatchNorm(deterministic=True)
      x = jnp.arange(32.0).reshape(8, 4) ** 1.5
      variables = model.init(jax.random.key(0), x)
      xs = jax.device_put(x, NamedSharding(mesh, P("b")))
      shift = diagnostics.variance_shift(model.apply, variables, [xs])["<root>"]
      np.testing.assert_allclose(shift.real_var, np.asarray(x, np.float64).var(0), rtol=1e-5)
      new = diagnostics.recalibrate_batch_stats(model.apply, variables, [xs, x[:1]])
      data = np.concatenate([np.asarray(x, np.float64), np.asarray(x[:1], np.float64)])
      np.testing.assert_allclose(np.asarray(new["var"]), data.var(0), rtol=1e-5)
      print("ok")
  """)
  assert "ok" in run_on_host_devices(script, 2)


def test_diagnostics_is_a_lazy_submodule():
  assert regjax.diagnostics is diagnostics


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.dense0 = nnx.Linear(6, 16, rngs=rngs)
    self.drop = rx.Dropout(0.4, rngs=rngs)
    self.bn0 = rx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.uout = rx.Uout(0.5, rngs=rngs)
    self.dense1 = nnx.Linear(16, 4, rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)

  def __call__(self, x, train: bool):
    del train  # the mode comes from the module attributes
    x = self.bn0(self.drop(self.dense0(x)))
    return self.bn1(self.dense1(self.uout(nnx.relu(x))))


def test_nnx_and_linen_diagnostics_agree_with_the_same_weights():
  x = jax.random.normal(jax.random.key(0), (512, 6)) + 0.5
  lin = LinenNet()
  variables = lin.init(jax.random.key(1), x, train=False)
  _, upd = lin.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"]
  )
  variables = {**variables, **upd}
  model = NNXNet(nnx.Rngs(0, dropout=1))
  names = {"Dense_0": "dense0", "Dense_1": "dense1", "BatchNorm_0": "bn0", "BatchNorm_1": "bn1"}
  for _collection, tree in variables.items():
    for layer, leaves in tree.items():
      for name, value in leaves.items():
        getattr(getattr(model, names[layer]), name)[...] = value

  batches = [x[:256], x[256:]]
  # A `call` with extra arguments: the mode still comes from the eval view.
  call = lambda m, v: m(v, train=True)  # noqa: E731
  nnx_shift = diagnostics.variance_shift(model, batches, call=call)
  lin_shift = diagnostics.variance_shift(
    lambda v, x: lin.apply(v, x, train=False), variables, batches
  )
  assert list(nnx_shift) == ["bn0", "bn1"] and list(lin_shift) == ["BatchNorm_0", "BatchNorm_1"]
  for a, b in zip(nnx_shift.values(), lin_shift.values(), strict=False):
    for field in ("moving_mean", "moving_var", "real_mean", "real_var"):
      np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)
    assert a.count == b.count

  nnx_new = diagnostics.recalibrate_batch_stats(model, batches, call=call)
  lin_new = diagnostics.recalibrate_batch_stats(
    lambda v, x: lin.apply(v, x, train=False), variables, batches
  )
  for linen_name, nnx_name in (("BatchNorm_0", "bn0"), ("BatchNorm_1", "bn1")):
    for stat in ("mean", "var"):
      np.testing.assert_allclose(
        np.asarray(nnx_new[nnx_name][stat][...]),
        np.asarray(lin_new[linen_name][stat]),
        rtol=1e-5,
        atol=1e-6,
      )
