"""Measure and undo the variance shift between train and eval mode at each BatchNorm.

Li, Chen, Hu, Yang (CVPR 2019, arXiv:1801.05134): noise before a BatchNorm
makes its running variance ``moving_var`` estimate the variance of the *noisy*
input, while at test time the noise is off and the layer sees ``real_var``.
Per BN layer and feature::

    delta = real_var / moving_var                  # < 1: eval activations shrink
    shift = max(real_var / moving_var, moving_var / real_var)   # the paper's plot

``real_var`` is the variance of the layer's input over training data with the
parameters frozen and every regularizer off (the model in eval mode).
:func:`recalibrate_batch_stats` is the fix of Hendrycks & Gimpel (2016) and Li
et al.: re-estimate every BN layer's population statistics on training data with
the regularizers off, as an equal-weight average over batches.

Both work on an unmodified Flax linen model: BatchNorm calls are intercepted
with ``flax.linen.intercept_methods``. The functions take ``apply_fn(variables,
x)``, which must run the model in eval mode, e.g.
``lambda v, x: model.apply(v, x, train=False)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes

from regjax import normalization
from regjax._checks import canonical_axes

__all__ = ["LayerShift", "variance_shift", "recalibrate_batch_stats"]


def _default_bn_types() -> tuple[type, ...]:
  import regjax.linen  # here, not at import time: the core never needs flax
  return (nn.BatchNorm, regjax.linen.BatchNorm)


@dataclasses.dataclass(frozen=True)
class LayerShift:
  """Train/eval statistics of one BatchNorm layer's input, per feature (float64)."""
  moving_mean: np.ndarray
  moving_var: np.ndarray
  real_mean: np.ndarray
  real_var: np.ndarray
  count: int  # values per feature that entered real_mean / real_var

  @property
  def delta(self) -> np.ndarray:
    """``real_var / moving_var``: the variance ratio eval/train (``< 1`` after dropout)."""
    return self.real_var / self.moving_var

  @property
  def shift(self) -> np.ndarray:
    """``max(real/moving, moving/real)`` per feature (the paper's measure, ``>= 1``)."""
    return np.maximum(self.delta, 1.0 / self.delta)

  @property
  def mean_shift(self) -> float:
    return float(np.mean(self.shift))

  @property
  def max_shift(self) -> float:
    return float(np.max(self.shift))


def _input_of(batch):
  if isinstance(batch, (tuple, list)):
    return batch[0]
  if isinstance(batch, Mapping):
    if "x" not in batch:
      raise ValueError(f"a dict batch needs its input under 'x'; got keys {sorted(batch)}.")
    return batch["x"]
  return batch


def _bn_calls(bn_types) -> Callable:
  """Returns a predicate telling intercepted BatchNorm ``__call__``s."""
  types = tuple(bn_types) if bn_types is not None else _default_bn_types()

  def is_bn_call(context) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, types)
  return is_bn_call


def _path(module) -> str:
  return "/".join(module.path) or "<root>"


def _running_stats(module):
  return {"mean": module.get_variable("batch_stats", "mean"),
          "var": module.get_variable("batch_stats", "var")}


def _in_call_order(capture_fn):
  """jit-compiles ``capture_fn(variables, x, paths) -> [record per BN call]`` into
  ``(variables, x) -> [(path, record)]`` in call order. Paths are static strings,
  so they are collected while tracing (jit would sort the keys of a returned dict)."""
  paths: list[str] = []

  def traced(variables, x):
    paths.clear()
    return capture_fn(variables, x, paths)

  compiled = jax.jit(traced)

  def run(variables, x):
    records = jax.device_get(compiled(variables, x))
    return list(zip(paths, records))
  return run


def _capture_moments(apply_fn, bn_types):
  """``(variables, x) -> [(path, (count, mean, m2, moving_mean, moving_var))]``."""
  is_bn_call = _bn_calls(bn_types)

  def capture(variables, x, paths):
    records = []

    def interceptor(next_fun, args, kwargs, context):
      if is_bn_call(context):
        module, value = context.module, args[0]
        axes = canonical_axes(module.axis, value.ndim, "variance_shift")
        reduce = tuple(a for a in range(value.ndim) if a not in axes)
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
        mean = jnp.mean(value, reduce)
        m2 = jnp.sum(jnp.square(value - jnp.mean(value, reduce, keepdims=True)), reduce)
        count = np.prod([value.shape[a] for a in reduce])
        stats = _running_stats(module)
        paths.append(_path(module))
        records.append((count, mean, m2, stats["mean"], stats["var"]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn(variables, x)
    return records

  return _in_call_order(capture)


def variance_shift(
    apply_fn: Callable[[Any, jax.Array], Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    bn_types: Iterable[type] | None = None,
) -> dict[str, LayerShift]:
  """Per BatchNorm layer: running vs eval-mode ("real") statistics of its input.

  Args:
    apply_fn: ``apply_fn(variables, x)`` running the model in eval mode (every
      regularizer off, BN on running statistics).
    variables: the model's variables, with a ``batch_stats`` collection.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    bn_types: module classes treated as BatchNorm; default flax.linen's and
      regjax.linen's.

  Returns:
    ``{path: LayerShift}`` keyed by the layer's path in the variables tree
    (e.g. ``'Block_0/BatchNorm_0'``), in call order. Statistics are pooled
    exactly over all batches (Chan et al.'s parallel formula, in float64).
  """
  capture = _capture_moments(apply_fn, bn_types)
  pooled: dict[str, list] = {}
  moving: dict[str, tuple] = {}
  for batch in batches:
    for path, (count, mean, m2, moving_mean, moving_var) in capture(variables, _input_of(batch)):
      mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
      moving[path] = (moving_mean, moving_var)
      if path not in pooled:
        pooled[path] = [int(count), mean, m2]
        continue
      n_a, mean_a, m2_a = pooled[path]
      n = n_a + int(count)
      delta = mean - mean_a
      pooled[path] = [n, mean_a + delta * count / n, m2_a + m2 + delta**2 * n_a * count / n]
  if not pooled:
    raise ValueError(
        "variance_shift: no BatchNorm call was seen; pass at least one batch, and "
        "`bn_types` if the model uses its own BatchNorm class.")
  return {
      path: LayerShift(
          moving_mean=np.asarray(moving[path][0], np.float64),
          moving_var=np.asarray(moving[path][1], np.float64),
          real_mean=mean, real_var=m2 / n, count=int(n))
      for path, (n, mean, m2) in pooled.items()
  }


def _capture_batch_stats(apply_fn, bn_types):
  """``(variables, x) -> [(path, (mean, var))]``, each BN normalizing with its
  batch statistics as in training (the noise stays off via apply_fn)."""
  is_bn_call = _bn_calls(bn_types)

  def capture(variables, x, paths):
    records = []

    def interceptor(next_fun, args, kwargs, context):
      if not is_bn_call(context):
        return next_fun(*args, **kwargs)
      module, value = context.module, args[0]
      scale = module.get_variable("params", "scale") if module.use_scale else None
      bias = module.get_variable("params", "bias") if module.use_bias else None
      # momentum=0: the "updated" running statistics are this batch's, in the
      # layer's own convention (biased, or unbiased for unbiased_running_var).
      y, batch = normalization.batch_norm(
          value, _running_stats(module), scale, bias, deterministic=False, momentum=0.0,
          epsilon=module.epsilon, axis=module.axis, mask=kwargs.get("mask"),
          unbiased_running_var=getattr(module, "unbiased_running_var", False),
          dtype=dtypes.canonicalize_dtype(
              *(a for a in (value, scale, bias) if a is not None), dtype=module.dtype))
      paths.append(_path(module))
      records.append((batch["mean"], batch["var"]))
      return y

    with nn.intercept_methods(interceptor):
      apply_fn(variables, x)
    return records

  return _in_call_order(capture)


def recalibrate_batch_stats(
    apply_fn: Callable[[Any, jax.Array], Any],
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    bn_types: Iterable[type] | None = None,
) -> dict[str, Any]:
  """Re-estimates every BatchNorm's population statistics with regularizers off.

  Each BN layer normalizes with its batch statistics (as in training) while
  ``apply_fn`` keeps the noise off; each layer's batch mean and variance are
  averaged with equal weight over ``batches`` (a cumulative average, not an
  EMA). The variance follows the layer's convention: biased, or unbiased for
  ``unbiased_running_var=True``.

  Args:
    apply_fn: ``apply_fn(variables, x)`` running the model in eval mode.
    variables: the model's variables; not modified.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    bn_types: module classes treated as BatchNorm.

  Returns:
    A new ``batch_stats`` tree, same structure and dtypes as
    ``variables['batch_stats']``; use it as
    ``{**variables, 'batch_stats': new_stats}``.
  """
  capture = _capture_batch_stats(apply_fn, bn_types)
  sums: dict[str, list] = {}
  for batch in batches:
    for path, (mean, var) in capture(variables, _input_of(batch)):
      mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
      if path not in sums:
        sums[path] = [0, np.zeros_like(mean), np.zeros_like(var)]
      sums[path][0] += 1
      sums[path][1] = sums[path][1] + mean
      sums[path][2] = sums[path][2] + var
  if not sums:
    raise ValueError(
        "recalibrate_batch_stats: no BatchNorm call was seen; pass at least one batch, "
        "and `bn_types` if the model uses its own BatchNorm class.")

  def rebuild(tree, prefix):
    out = {}
    for name, node in tree.items():
      path = "/".join(prefix + (name,))
      if isinstance(node, Mapping) and {"mean", "var"} <= set(node) and not isinstance(
          node["mean"], Mapping):
        if path in sums:
          k, mean_sum, var_sum = sums[path]
          node = {**node, "mean": jnp.asarray(mean_sum / k, node["mean"].dtype),
                  "var": jnp.asarray(var_sum / k, node["var"].dtype)}
        out[name] = node
      elif isinstance(node, Mapping):
        out[name] = rebuild(node, prefix + (name,))
      else:
        out[name] = node
    return out

  root = variables["batch_stats"]
  if "<root>" in sums:  # the model itself is a BatchNorm
    k, mean_sum, var_sum = sums["<root>"]
    return {**root, "mean": jnp.asarray(mean_sum / k, root["mean"].dtype),
            "var": jnp.asarray(var_sum / k, root["var"].dtype)}
  return rebuild(root, ())
