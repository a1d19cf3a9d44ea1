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
