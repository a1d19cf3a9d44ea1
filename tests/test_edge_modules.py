"""Edge cases of the linen and NNX noise modules: traced ``deterministic``,
unusual keys, missing ``rngs``, flax transforms (jit, remat, scan, vmap),
nnx.split/merge, serialization and reproducibility.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

import regjax
import regjax.linen as rl
import regjax.nnx as rn

X = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3) + 2.0  # NHWC, no zeros

# name -> (linen module, nnx module maker (rngs -> module))
MODULES = {
  "Dropout": (rl.Dropout(0.5), lambda r: rn.Dropout(0.5, rngs=r)),
  "GaussianDropout": (rl.GaussianDropout(0.3), lambda r: rn.GaussianDropout(0.3, rngs=r)),
  "Uout": (rl.Uout(0.2), lambda r: rn.Uout(0.2, rngs=r)),
  "AlphaDropout": (rl.AlphaDropout(0.3), lambda r: rn.AlphaDropout(0.3, rngs=r)),
  "GaussianNoise": (rl.GaussianNoise(0.1), lambda r: rn.GaussianNoise(0.1, rngs=r)),
  "ChannelDropout": (rl.ChannelDropout(0.5), lambda r: rn.ChannelDropout(0.5, rngs=r)),
  "DropPath": (rl.DropPath(0.5), lambda r: rn.DropPath(0.5, rngs=r)),
  "DropBlock": (rl.DropBlock(0.3, block_size=2), lambda r: rn.DropBlock(0.3, block_size=2, rngs=r)),
  "Cutout": (rl.Cutout(2), lambda r: rn.Cutout(2, rngs=r)),
  "DropConnect": (
    rl.DropConnect(3),
    lambda r: rn.DropConnect(
      3, 3, rngs=nnx.Rngs(params=0, **({"dropout": r["dropout"]} if r is not None else {}))
    ),
  ),
}
NAMES = tuple(MODULES)

PURE = {
  "dropout": lambda x, k, d: regjax.dropout(x, 0.5, key=k, deterministic=d),
  "gaussian_dropout": lambda x, k, d: regjax.gaussian_dropout(x, 0.3, key=k, deterministic=d),
  "uout": lambda x, k, d: regjax.uout(x, 0.2, key=k, deterministic=d),
  "alpha_dropout": lambda x, k, d: regjax.alpha_dropout(x, 0.3, key=k, deterministic=d),
  "gaussian_noise": lambda x, k, d: regjax.gaussian_noise(x, 0.1, key=k, deterministic=d),
  "channel_dropout": lambda x, k, d: regjax.channel_dropout(x, 0.5, key=k, deterministic=d),
  "drop_path": lambda x, k, d: regjax.drop_path(x, 0.5, key=k, deterministic=d),
  "dropblock": lambda x, k, d: regjax.dropblock(x, 0.3, key=k, deterministic=d, block_size=2),
  "cutout": lambda x, k, d: regjax.cutout(x, 2, key=k, deterministic=d),
  "dropconnect_dense": lambda x, k, d: regjax.dropconnect_dense(
    x, jnp.ones((3, 3)), None, 0.5, key=k, deterministic=d
  ),
}

TRACED_MSG = r"`deterministic` must be a Python bool \(concrete\), not a traced.*trace time"


def linen_apply(module, key, x=X, deterministic=False):
  variables = module.init({"params": jax.random.key(0)}, x, deterministic=True)
  return module.apply(variables, x, deterministic=deterministic, rngs={"dropout": key})


# --- 1. a traced `deterministic` -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_linen_traced_deterministic_raises_clear_type_error(name):
  module = MODULES[name][0]
  variables = module.init({"params": jax.random.key(0)}, X, deterministic=True)

  @jax.jit
  def f(deterministic):
    return module.apply(
      variables, X, deterministic=deterministic, rngs={"dropout": jax.random.key(1)}
    )

  with pytest.raises(TypeError, match=TRACED_MSG) as info:
    f(False)
  assert f"regjax.linen.{name}" in str(info.value)
  assert "jax.lax.cond" in str(info.value) and "static_argnums" in str(info.value)


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


@pytest.mark.parametrize("name", tuple(PURE))
def test_pure_traced_deterministic_raises_clear_type_error(name):
  fn = PURE[name]
  with pytest.raises(TypeError, match=TRACED_MSG):
    jax.jit(lambda d: fn(X, jax.random.key(0), d))(False)


def test_static_deterministic_under_jit_works():
  module = rl.Dropout(0.5)
  f = jax.jit(
    lambda d: module.apply({}, X, deterministic=d, rngs={"dropout": jax.random.key(0)}),
    static_argnums=0,
  )
  np.testing.assert_array_equal(f(True), X)
  assert not np.array_equal(f(False), X)


# --- 2. keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
  "bad",
  [
    pytest.param(lambda: jax.random.PRNGKey(0, impl="rbg"), id="raw-rbg"),
    pytest.param(lambda: jnp.zeros((3,), jnp.uint32), id="uint32-3"),
  ],
)
@pytest.mark.parametrize("name", tuple(PURE))
def test_bad_raw_key_raises_clear_type_error(bad, name):
  with pytest.raises(TypeError, match="`key` must be a PRNG key: a typed key") as info:
    PURE[name](X, bad(), False)
  message = str(info.value)
  assert "jax.random.key" in message and "(2,)" in message
  assert "jax.random.wrap_key_data(data, impl='rbg')" in message


def test_bad_raw_key_through_modules():
  raw = jax.random.PRNGKey(0, impl="rbg")
  with pytest.raises(TypeError, match="`key`.*wrap_key_data"):
    rl.Dropout(0.5).apply({}, X, deterministic=False, rng=raw)
  with pytest.raises(TypeError, match="`key`.*wrap_key_data"):
    rn.Dropout(0.5)(X, rngs=raw)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
@pytest.mark.parametrize("rng_impl", ["hash", "jax"])
def test_typed_keys_of_any_impl_work(impl, rng_impl):
  key = jax.random.key(3, impl=impl)
  a = regjax.dropout(X, 0.5, key=key, rng_impl=rng_impl)
  b = regjax.dropout(X, 0.5, key=key, rng_impl=rng_impl)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, X)
  out = rl.Dropout(0.5, rng_impl=rng_impl).apply({}, X, deterministic=False, rngs={"dropout": key})
  assert out.shape == X.shape
  out = rn.Dropout(0.5, rng_impl=rng_impl)(X, rngs=key)
  assert out.shape == X.shape


def test_wrapped_rbg_data_and_raw_threefry_key_work():
  data = jax.random.PRNGKey(0, impl="rbg")
  wrapped = jax.random.wrap_key_data(data, impl="rbg")
  assert regjax.dropout(X, 0.5, key=wrapped).shape == X.shape
  raw = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(
    regjax.dropout(X, 0.5, key=raw), regjax.dropout(X, 0.5, key=jax.random.wrap_key_data(raw))
  )


# --- 3. NNX without rngs --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_nnx_without_rngs_gives_flax_message(name):
  module = MODULES[name][1](None)
  phrase = f"`deterministic` is False, but no `rngs` argument was provided to {name}"
  with pytest.raises(ValueError, match=phrase):
    module(X)
  np.testing.assert_array_equal(module(X, deterministic=True), module(X, deterministic=True))


def test_flax_nnx_dropout_message_is_the_same_phrase():
  phrase = "`deterministic` is False, but no `rngs` argument was provided to Dropout"
  with pytest.raises(ValueError, match=phrase):
    nnx.Dropout(0.5)(X)
  with pytest.raises(ValueError, match=phrase):
    rn.Dropout(0.5)(X)


# --- linen transforms -----------------------------------------------------------------


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(3)(x)
    return rl.Dropout(0.5)(x, deterministic=not train)


def test_linen_under_nn_jit():
  x = X.reshape(-1, 3)
  params = Block().init(jax.random.key(0), x, train=False)
  key = jax.random.key(1)
  # nn.jit forks the rng streams (flax.linen.Dropout's mask changes too), so the
  # jitted draw is compared with itself and, with rng_impl='jax', with flax's.
  jitted = nn.jit(Block)().apply(params, x, rngs={"dropout": key})
  again = nn.jit(Block)().apply(params, x, rngs={"dropout": key})
  np.testing.assert_array_equal(jitted, again)
  other = nn.jit(Block)().apply(params, x, rngs={"dropout": jax.random.key(2)})
  assert not np.array_equal(jitted, other)
  eager = Block().apply(params, x, rngs={"dropout": key})
  via_jax_jit = jax.jit(lambda p, k: Block().apply(p, x, rngs={"dropout": k}))(params, key)
  np.testing.assert_allclose(via_jax_jit, eager, rtol=1e-6)

  class Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
      return rl.Dropout(0.5, deterministic=False, rng_impl="jax")(x)

  class Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dropout(0.5, deterministic=False)(x)

  ours = nn.jit(Ours)().apply({}, x, rngs={"dropout": key})
  np.testing.assert_array_equal(ours, nn.jit(Flax)().apply({}, x, rngs={"dropout": key}))


def test_linen_under_nn_remat_matches_and_differentiates():
  x = X.reshape(-1, 3)
  params = Block().init(jax.random.key(0), x, train=False)
  key = jax.random.key(1)

  def loss(cls, p):
    return jnp.sum(cls().apply(p, x, rngs={"dropout": key}) ** 2)

  np.testing.assert_allclose(loss(nn.remat(Block), params), loss(Block, params), rtol=1e-6)
  g_remat = jax.grad(lambda p: loss(nn.remat(Block), p))(params)
  g_plain = jax.grad(lambda p: loss(Block, p))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_remat, g_plain
  )


class Step(nn.Module):
  @nn.compact
  def __call__(self, carry, x):
    return carry, rl.Dropout(0.5, deterministic=False)(x)


def test_linen_under_nn_scan_draws_a_new_mask_each_step():
  scan = nn.scan(
    Step,
    variable_broadcast="params",
    split_rngs={"params": False, "dropout": True},
    in_axes=0,
    out_axes=0,
  )
  xs = jnp.ones((4, 64))

  def run(seed):
    return scan().apply({}, None, xs, rngs={"dropout": jax.random.key(seed)})[1]

  ys = run(0)
  assert ys.shape == xs.shape
  for i in range(4):
    for j in range(i):
      assert not np.array_equal(ys[i], ys[j])
  np.testing.assert_array_equal(run(0), ys)
  assert not np.array_equal(run(1), ys)


class Member(nn.Module):
  @nn.compact
  def __call__(self, x):
    return rl.Dropout(0.5, deterministic=False)(x)


@pytest.mark.parametrize("split", [True, False])
def test_linen_under_nn_vmap(split):
  vmapped = nn.vmap(Member, variable_axes={}, split_rngs={"dropout": split}, in_axes=0, out_axes=0)
  xs = jnp.ones((4, 64))

  def run(seed):
    return vmapped().apply({}, xs, rngs={"dropout": jax.random.key(seed)})

  ys = run(0)
  for i in range(1, 4):
    assert np.array_equal(ys[i], ys[0]) != split  # split: each member its own mask
  np.testing.assert_array_equal(run(0), ys)


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


@pytest.mark.parametrize("name", NAMES)
def test_linen_serialization_round_trip(name):
  module = MODULES[name][0]
  variables = module.init({"params": jax.random.key(0)}, X, deterministic=True)
  restored = serialization.from_bytes(variables, serialization.to_bytes(variables))
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  key = jax.random.key(4)
  np.testing.assert_array_equal(
    module.apply(restored, X, deterministic=False, rngs={"dropout": key}),
    module.apply(variables, X, deterministic=False, rngs={"dropout": key}),
  )


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
def test_linen_same_key_same_output(name):
  module = MODULES[name][0]
  a = linen_apply(module, jax.random.key(7))
  b = linen_apply(module, jax.random.key(7))
  np.testing.assert_array_equal(a, b)
  if name != "DropPath":
    assert not np.array_equal(a, linen_apply(module, jax.random.key(8)))


@pytest.mark.parametrize("name", NAMES)
def test_nnx_same_seed_same_output(name):
  a = MODULES[name][1](nnx.Rngs(dropout=7))(X)
  b = MODULES[name][1](nnx.Rngs(dropout=7))(X)
  np.testing.assert_array_equal(a, b)
  key = jax.random.key(3)
  module = MODULES[name][1](None)
  np.testing.assert_array_equal(module(X, rngs=key), module(X, rngs=key))


@pytest.mark.parametrize("name", tuple(PURE))
def test_pure_same_key_same_output(name):
  fn = PURE[name]
  key = jax.random.key(11)
  np.testing.assert_array_equal(fn(X, key, False), fn(X, key, False))
  np.testing.assert_array_equal(jax.jit(lambda x, k: fn(x, k, False))(X, key), fn(X, key, False))
