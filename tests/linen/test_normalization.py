"""Tests of regjax.linen.BatchNorm beyond flax parity (tests/test_parity.py)."""

import jax
import numpy as np
import pytest
from _helpers import _close, _problem, _randomize, reference_batch_norm

import regjax.linen as rnn


def test_linen_use_running_average_is_an_alias_of_deterministic():
  x, _, _, _ = _problem((16, 3), -1, seed=27)
  variables = _randomize(rnn.BatchNorm().init(jax.random.key(0), x, deterministic=True), 28)
  stats = variables["batch_stats"]
  eval_ref = reference_batch_norm(
    x,
    stats["mean"],
    stats["var"],
    variables["params"]["scale"],
    variables["params"]["bias"],
    deterministic=True,
  )[0]
  train_ref = reference_batch_norm(
    x, stats["mean"], stats["var"], variables["params"]["scale"], variables["params"]["bias"]
  )[0]
  evals = [
    rnn.BatchNorm(use_running_average=True).apply(variables, x),
    rnn.BatchNorm(deterministic=True).apply(variables, x),
    rnn.BatchNorm(deterministic=True, use_running_average=True).apply(variables, x),
    rnn.BatchNorm().apply(variables, x, True),
    rnn.BatchNorm().apply(variables, x, use_running_average=True),
    rnn.BatchNorm().apply(variables, x, deterministic=True),
  ]
  for y in evals:
    _close(y, eval_ref)
  for module, call in [
    (rnn.BatchNorm(use_running_average=False), {}),
    (rnn.BatchNorm(deterministic=False), {}),
    (rnn.BatchNorm(), dict(use_running_average=False)),
    (rnn.BatchNorm(), dict(deterministic=False)),
  ]:
    y, upd = module.apply(variables, x, mutable=["batch_stats"], **call)
    _close(y, train_ref)
    assert not np.allclose(upd["batch_stats"]["var"], stats["var"])

  with pytest.raises(ValueError, match="disagree"):
    rnn.BatchNorm(deterministic=True, use_running_average=False).apply(variables, x)
  with pytest.raises(ValueError, match="disagree"):
    rnn.BatchNorm().apply(variables, x, use_running_average=True, deterministic=False)


# ----------------------------------------------------------------------------
# No running statistics; ghost batches
def test_linen_no_running_stats_has_no_batch_stats_and_uses_batch_statistics():
  import flax.linen as nn
  import jax.numpy as jnp
  from flax.core import unfreeze

  import regjax

  x, _, _, _ = _problem((16, 3), -1, seed=29)
  module = rnn.BatchNorm(track_running_stats=False)
  variables = _randomize(module.init(jax.random.key(0), x), 30)
  assert set(unfreeze(variables)) == {"params"}
  params = variables["params"]
  want, none = regjax.batch_norm(x, None, params["scale"], params["bias"])
  assert none is None
  # Either mode (module or call), or none: the batch statistics, and nothing to mutate.
  for y in [
    module.apply(variables, x),
    module.apply(variables, x, use_running_average=True),
    module.apply(variables, x, deterministic=False),
    rnn.BatchNorm(track_running_stats=False, use_running_average=True).apply(variables, x),
  ]:
    np.testing.assert_array_equal(y, want)
  with pytest.raises(ValueError, match="disagree"):
    module.apply(variables, x, use_running_average=True, deterministic=False)
  plain = rnn.BatchNorm(track_running_stats=False, use_scale=False, use_bias=False)
  assert not unfreeze(plain.init(jax.random.key(0), x))
  # Default: flax's variables exactly.
  ours = rnn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  theirs = nn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)


def test_linen_virtual_batch_size_matches_the_function():
  import regjax

  x, _, _, _ = _problem((12, 2, 3), -1, seed=31)
  mask = np.random.default_rng(32).random((12, 2, 1)) < 0.8
  module = rnn.BatchNorm(momentum=0.8, virtual_batch_size=4, unbiased_running_var=True)
  # init with one sample in train mode: the ghost batches are not applied at init.
  variables = _randomize(module.init(jax.random.key(0), x[:1], use_running_average=False), 33)
  y, upd = module.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
  p, s = variables["params"], variables["batch_stats"]
  want_y, want_stats = regjax.batch_norm(
    x,
    s,
    p["scale"],
    p["bias"],
    momentum=0.8,
    virtual_batch_size=4,
    unbiased_running_var=True,
    mask=mask,
  )
  np.testing.assert_array_equal(y, want_y)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(upd["batch_stats"][k], want_stats[k])
  # Eval: any batch size.
  _close(
    module.apply(variables, x[:3], use_running_average=True),
    reference_batch_norm(x[:3], s["mean"], s["var"], p["scale"], p["bias"], deterministic=True)[0],
  )
  with pytest.raises(ValueError, match="must divide the batch size"):
    module.apply(variables, x[:6], use_running_average=False, mutable=["batch_stats"])
  with pytest.raises(ValueError, match="`virtual_batch_size` must be None or an int >= 1"):
    rnn.BatchNorm(virtual_batch_size=0).init(jax.random.key(0), x, use_running_average=True)
  # Without running statistics too: per-group batch statistics in both modes.
  free = rnn.BatchNorm(track_running_stats=False, virtual_batch_size=4)
  v = free.init(jax.random.key(0), x)
  want, _ = regjax.batch_norm(
    x, None, v["params"]["scale"], v["params"]["bias"], virtual_batch_size=4
  )
  np.testing.assert_array_equal(free.apply(v, x, use_running_average=True), want)
