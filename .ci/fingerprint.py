"""Hash the outputs of every public op, module and diagnostic on fixed inputs.

Usage: python .ci/fingerprint.py OUT.json; then compare two such files with
`python .ci/fingerprint.py --compare A.json B.json`. Used to show that a
refactor keeps behaviour bit-identical on this machine (same jax, same CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np


def _fields(obj):
  """A dataclass (e.g. LayerShift) as its field values: it is not a pytree."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return dataclasses.astuple(obj)
  return obj


def digest(tree) -> str:
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves(tree)
  while any(dataclasses.is_dataclass(leaf) for leaf in leaves):
    leaves = jax.tree_util.tree_leaves([_fields(leaf) for leaf in leaves])
  for leaf in leaves:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
  return h.hexdigest()[:16]


def core_cases():
  import regjax
  from regjax import random as R

  key = jax.random.key(3)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 6))
  v = jax.random.normal(jax.random.key(1), (16, 33))
  for impl in ("hash", "jax"):
    for name, fn, arg in [
      ("dropout", regjax.dropout, 0.3),
      ("gaussian_dropout", regjax.gaussian_dropout, 0.3),
      ("uout", regjax.uout, 0.4),
      ("alpha_dropout", regjax.alpha_dropout, 0.2),
      ("gaussian_noise", regjax.gaussian_noise, 0.5),
    ]:
      for bd in ((), (1,)):
        yield (
          f"{name}/{impl}/bd{bd}",
          lambda fn=fn, arg=arg, bd=bd, impl=impl: fn(
            v, arg, key=key, broadcast_dims=bd, rng_impl=impl
          ),
        )
        yield (
          f"{name}/{impl}/bd{bd}/jit",
          lambda fn=fn, arg=arg, bd=bd, impl=impl: jax.jit(
            lambda r: fn(v, r, key=key, broadcast_dims=bd, rng_impl=impl)
          )(arg),
        )
      yield (
        f"{name}/{impl}/grad",
        lambda fn=fn, arg=arg, impl=impl: jax.grad(
          lambda y: jnp.sum(fn(y, arg, key=key, rng_impl=impl) ** 2)
        )(v),
      )
    yield (
      f"channel_dropout/{impl}",
      lambda impl=impl: regjax.channel_dropout(x, 0.3, key=key, rng_impl=impl),
    )
    yield (
      f"channel_dropout/{impl}/ax1",
      lambda impl=impl: regjax.channel_dropout(x, 0.3, key=key, channel_axis=1, rng_impl=impl),
    )
    for mode in ("row", "batch"):
      yield (
        f"drop_path/{impl}/{mode}",
        lambda impl=impl, mode=mode: regjax.drop_path(x, 0.3, key=key, mode=mode, rng_impl=impl),
      )
    for share in (False, True):
      for fmt in ("NHWC", "NCHW"):
        yield (
          f"dropblock/{impl}/{share}/{fmt}",
          lambda impl=impl, share=share, fmt=fmt: regjax.dropblock(
            x, 0.2, key=key, block_size=3, share_channels=share, data_format=fmt, rng_impl=impl
          ),
        )
      yield (
        f"dropblock/{impl}/{share}/jit",
        lambda impl=impl, share=share: jax.jit(
          lambda r: regjax.dropblock(
            x, r, key=key, block_size=3, share_channels=share, rng_impl=impl
          )
        )(0.2),
      )
    k = jax.random.normal(jax.random.key(5), (33, 7))
    b = jnp.arange(7.0)
    yield (
      f"dropconnect/{impl}",
      lambda impl=impl, k=k, b=b: regjax.dropconnect_dense(v, k, b, 0.4, key=key, rng_impl=impl),
    )
    yield (
      f"dropconnect/{impl}/grad",
      lambda impl=impl, k=k, b=b: jax.grad(
        lambda kk: jnp.sum(regjax.dropconnect_dense(v, kk, b, 0.4, key=key, rng_impl=impl) ** 2)
      )(k),
    )
  for fmt in ("NHWC", "NCHW"):
    yield f"cutout/{fmt}", lambda fmt=fmt: regjax.cutout(x, 3, key=key, data_format=fmt)
  yield "cutout/jit", lambda: jax.jit(lambda s: regjax.cutout(x, s, key=key))(3)
  yield "drop_path_rates", lambda: jnp.asarray(regjax.drop_path_rates(6, 0.5))
  yield (
    "drop_path_rates/linspace",
    lambda: jnp.asarray(regjax.drop_path_rates(6, 0.5, convention="linspace")),
  )
  yield (
    "dropblock_rate_schedule",
    lambda: jnp.asarray([regjax.dropblock_rate_schedule(s, 10, 0.3) for s in range(12)]),
  )
  yield (
    "variances",
    lambda: jnp.asarray(
      [
        regjax.dropout_noise_variance(0.3),
        regjax.uout_noise_variance(0.4),
        regjax.matched_uout_beta(0.3),
      ]
    ),
  )
  params = {
    "Dense_0": {"kernel": v, "bias": jnp.arange(33.0)},
    "BatchNorm_0": {"scale": jnp.arange(33.0)},
  }
  yield "max_norm", lambda: regjax.max_norm(params, 1.5)
  yield "max_norm/axis", lambda: regjax.max_norm(params, 1.5, axis=1)
  yield (
    "max_norm_projection",
    lambda: regjax.max_norm_projection(1.5).update(params, None, params)[0],
  )
  # batch_norm: train, eval, grads, mask, axes, dtypes
  stats = regjax.init_batch_stats(6)
  scale, bias = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
  xs = x * 3 + 100
  yield "bn/train", lambda: regjax.batch_norm(xs, stats, scale, bias)
  yield "bn/train/jit", lambda: jax.jit(lambda a: regjax.batch_norm(a, stats, scale, bias))(xs)
  yield (
    "bn/eval",
    lambda: regjax.batch_norm(
      xs, regjax.batch_norm(xs, stats, scale, bias)[1], scale, bias, deterministic=True
    ),
  )
  yield "bn/unbiased", lambda: regjax.batch_norm(xs, stats, unbiased_running_var=True, momentum=0.5)
  yield "bn/mask", lambda: regjax.batch_norm(xs, stats, scale, bias, mask=xs > 100)
  yield "bn/axis", lambda: regjax.batch_norm(xs, regjax.init_batch_stats((8, 6)), axis=(2, 3))
  yield "bn/bf16", lambda: regjax.batch_norm(xs.astype(jnp.bfloat16), stats, scale, bias)
  yield (
    "bn/bf16/nof32",
    lambda: regjax.batch_norm(
      xs.astype(jnp.bfloat16), stats, scale, bias, force_float32_reductions=False
    ),
  )
  yield "bn/dtype", lambda: regjax.batch_norm(xs, stats, scale, bias, dtype=jnp.bfloat16)

  def bn_loss(a, s, b):
    y, _ = regjax.batch_norm(a, stats, s, b)
    return jnp.sum(jnp.sin(y))

  yield "bn/grad", lambda: jax.grad(bn_loss, argnums=(0, 1, 2))(xs, scale, bias)
  yield "bn/grad/jit", lambda: jax.jit(jax.grad(bn_loss, argnums=(0, 1, 2)))(xs, scale, bias)
  yield (
    "bn/jvp",
    lambda: jax.jvp(lambda a: regjax.batch_norm(a, stats, scale, bias)[0], (xs,), (jnp.cos(xs),)),
  )
  yield (
    "bn/hessian",
    lambda: jax.hessian(
      lambda a: jnp.sum(jnp.sin(regjax.batch_norm(a, regjax.init_batch_stats(3))[0]))
    )(xs[:2, 0, 0, :3]),
  )
  yield (
    "bn/vmap",
    lambda: jax.vmap(
      lambda a: regjax.batch_norm(a, stats, scale, bias, axis_name="b")[0], axis_name="b"
    )(xs[:, 0]),
  )
  yield "bn/complex", lambda: regjax.batch_norm(xs + 1j * x, stats)
  # error messages are behaviour too
  yield "err/rate", lambda: regjax.dropout(v, 1.5, key=key)
  yield "err/key", lambda: regjax.dropout(v, 0.5)
  yield "err/impl", lambda: regjax.uout(v, 0.5, key=key, rng_impl="threefry")
  yield "err/int", lambda: regjax.gaussian_dropout(jnp.arange(4), 0.5, key=key)
  yield "err/bn_eps", lambda: regjax.batch_norm(xs, stats, epsilon=-1.0)
  yield "err/bn_stats", lambda: regjax.batch_norm(xs, regjax.init_batch_stats(5))
  yield "err/block", lambda: regjax.dropblock(x, 0.2, key=key, block_size=0)
  yield "err/format", lambda: regjax.cutout(x, 2, key=key, data_format="NWHC")
  yield "err/axis", lambda: regjax.channel_dropout(x, 0.2, key=key, channel_axis=7)
  yield "err/max_norm", lambda: regjax.max_norm(params, -1.0)
  # random module
  yield "random/bits", lambda: R.bits(key, (1000,))
  yield "random/uniform", lambda: R.uniform(key, (1000,))
  yield "random/normal", lambda: R.normal(key, (1000,))
  yield "random/bernoulli", lambda: R.bernoulli(key, 0.3, (1000,))


def linen_cases():
  import flax.linen as nn

  import regjax.linen as L

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 6)) * 2 + 5
  rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2)}
  mods = {
    "Dropout": L.Dropout(0.3),
    "GaussianDropout": L.GaussianDropout(0.3),
    "Uout": L.Uout(0.4),
    "AlphaDropout": L.AlphaDropout(0.2),
    "GaussianNoise": L.GaussianNoise(0.5),
    "ChannelDropout": L.ChannelDropout(0.3),
    "Cutout": L.Cutout(3),
    "DropBlock": L.DropBlock(0.2, block_size=3),
    "DropPath": L.DropPath(0.3),
    "DropConnect": L.DropConnect(5, rate=0.4),
    "BatchNorm": L.BatchNorm(),
  }
  for name, m in mods.items():

    def run(m=m, name=name):
      variables = (
        m.init(rngs, x, deterministic=True)
        if name != "BatchNorm"
        else m.init(rngs, x, use_running_average=False)
      )
      if name == "BatchNorm":
        return variables, m.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      return (
        variables,
        m.apply(variables, x, deterministic=False, rngs=rngs),
        m.apply(variables, x, deterministic=True),
      )

    yield f"linen/{name}", run

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(16)(x)
      x = L.Dropout(0.3)(x, deterministic=not train)
      x = L.BatchNorm()(x, use_running_average=not train)
      x = nn.relu(x)
      x = L.Uout(0.2)(x, deterministic=not train)
      x = nn.Dense(16)(x)
      return L.BatchNorm()(x, use_running_average=not train)

  from regjax import diagnostics

  net = Net()
  data = jax.random.normal(jax.random.key(4), (32, 10))
  variables = net.init(rngs, data, train=False)
  batches = [data[:16], data[16:]]

  def apply_eval(v, b):
    return net.apply(v, b, train=False)

  yield (
    "linen/diag/variance_shift",
    lambda: diagnostics.variance_shift(apply_eval, variables, batches),
  )
  yield (
    "linen/diag/recalibrate",
    lambda: diagnostics.recalibrate_batch_stats(apply_eval, variables, batches),
  )


def _safe(fn):
  try:
    return fn()
  except Exception as e:  # the signature is the fingerprint's business, not the outcome's
    return f"{type(e).__name__}: {e}"


def nnx_cases():
  from flax import nnx

  import regjax.nnx as N

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 6)) * 2 + 5
  ctors = {
    "Dropout": lambda r: N.Dropout(0.3, rngs=r),
    "GaussianDropout": lambda r: N.GaussianDropout(0.3, rngs=r),
    "Uout": lambda r: N.Uout(0.4, rngs=r),
    "AlphaDropout": lambda r: N.AlphaDropout(0.2, rngs=r),
    "GaussianNoise": lambda r: N.GaussianNoise(0.5, rngs=r),
    "ChannelDropout": lambda r: N.ChannelDropout(0.3, rngs=r),
    "Cutout": lambda r: N.Cutout(3, rngs=r),
    "DropBlock": lambda r: N.DropBlock(0.2, block_size=3, rngs=r),
    "DropPath": lambda r: N.DropPath(0.3, rngs=r),
    "DropConnect": lambda r: N.DropConnect(6, 5, rngs=r, rate=0.4),
    "BatchNorm": lambda r: N.BatchNorm(6, rngs=r),
  }
  for name, ctor in ctors.items():

    def run(ctor=ctor):
      m = ctor(nnx.Rngs(params=1, dropout=2))
      y1 = m(x)
      y2 = m(x)
      m.eval()
      y3 = m(x)
      return y1, y2, y3, nnx.state(m)

    yield f"nnx/{name}", run

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(10, 16, rngs=rngs)
      self.d = N.Dropout(0.3, rngs=rngs)
      self.bn1 = N.BatchNorm(16, rngs=rngs)
      self.u = N.Uout(0.2, rngs=rngs)
      self.l2 = nnx.Linear(16, 16, rngs=rngs)
      self.bn2 = N.BatchNorm(16, rngs=rngs)

    def __call__(self, x):
      return self.bn2(self.l2(self.u(jax.nn.relu(self.bn1(self.d(self.l1(x)))))))

  from regjax import diagnostics

  data = jax.random.normal(jax.random.key(4), (32, 10))
  batches = [data[:16], data[16:]]
  yield (
    "nnx/diag/variance_shift",
    lambda: diagnostics.variance_shift(Net(nnx.Rngs(params=1, dropout=2)), batches),
  )

  def recal():
    m = Net(nnx.Rngs(params=1, dropout=2))
    diagnostics.recalibrate_batch_stats(m, batches)
    return nnx.state(m, nnx.BatchStat)

  yield "nnx/diag/recalibrate", recal


def main(argv):
  if argv[0] == "--compare":
    a, b = (json.loads(pathlib.Path(p).read_text()) for p in argv[1:3])
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print(f"{len(a)} vs {len(b)} entries; {len(diff)} differ")
    for k in diff:
      print(f"  {k}: {a.get(k)} != {b.get(k)}")
    sys.exit(1 if diff else 0)
  out = {}
  for gen in (core_cases, linen_cases, nnx_cases):
    for name, fn in gen():
      r = _safe(fn)
      out[name] = r if isinstance(r, str) else digest(r)
  pathlib.Path(argv[0]).write_text(json.dumps(out, indent=1, sort_keys=True))
  errors = {k: v for k, v in out.items() if " " in v}
  print(f"{len(out)} entries; {len(errors)} raised")
  for k, v in errors.items():
    print(f"  {k}: {v[:200]}")


if __name__ == "__main__":
  main(sys.argv[1:])
