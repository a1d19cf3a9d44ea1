"""BatchNorm cases on (N, C): regjax.linen.BatchNorm against flax.linen.BatchNorm.

Modes: "train fwd+bwd" (vjp w.r.t. x, scale and bias, plus the running-statistics
update), "train fwd" and "eval fwd". The reference is flax's default,
``use_fast_variance=True``; flax with ``use_fast_variance=False`` is timed too.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

import regjax.linen as rnn
from benchmarks.timing import Case, mark_identical_programs

FLAX_BN = "flax BatchNorm(fast_var=True)"
# name -> the module in train (False) or eval (True) mode.
MODULES: dict[str, Callable[[bool], nn.Module]] = {
  "regjax BatchNorm": lambda eval_mode: rnn.BatchNorm(use_running_average=eval_mode),
  FLAX_BN: lambda eval_mode: nn.BatchNorm(use_running_average=eval_mode, use_fast_variance=True),
  "flax BatchNorm(fast_var=False)": lambda eval_mode: nn.BatchNorm(
    use_running_average=eval_mode, use_fast_variance=False
  ),
}


def trained_variables(module: nn.Module, x: jax.Array):
  """Initial parameters, and running statistics as after some training (so that eval
  does not divide by 1)."""
  variables = module.init(jax.random.key(0), x)
  return {
    "params": variables["params"],
    "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"]),
  }


def module_cases(
  name: str, make: Callable[[bool], nn.Module], x: jax.Array, cotangent: jax.Array
) -> list[Case]:
  """The three modes of one BatchNorm module; all but flax's default refer to it."""
  ref = None if name == FLAX_BN else FLAX_BN
  train_module, eval_module = make(False), make(True)
  variables = trained_variables(train_module, x)

  def train_fwd_bwd(variables, x, ct):
    def f(params, x):
      return train_module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
      )

    y, vjp, updates = jax.vjp(f, variables["params"], x, has_aux=True)
    grad_params, grad_x = vjp(ct.astype(y.dtype))
    return y, grad_params, grad_x, updates

  def train_fwd(variables, x):
    return train_module.apply(variables, x, mutable=["batch_stats"])

  def eval_fwd(variables, x):
    return eval_module.apply(variables, x)

  return [
    Case(
      "batchnorm", name, "train fwd+bwd", train_fwd_bwd, lambda i: (variables, x, cotangent), ref
    ),
    Case("batchnorm", name, "train fwd", train_fwd, lambda i: (variables, x), ref),
    Case("batchnorm", name, "eval fwd", eval_fwd, lambda i: (variables, x), ref),
  ]


def batch_norm_cases(x: jax.Array, cotangent: jax.Array) -> list[Case]:
  """Every module's three modes; eval rows learn whether they compile to flax's program."""
  cases = [c for name, make in MODULES.items() for c in module_cases(name, make, x, cotangent)]
  mark_identical_programs([c for c in cases if c.meta["mode"] == "eval fwd"])
  return cases
