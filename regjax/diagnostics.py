"""Measure and undo the variance shift between train and eval mode at each BatchNorm.

Li, Chen, Hu, Yang (CVPR 2019, arXiv:1801.05134): noise before a BatchNorm
makes its running variance ``moving_var`` estimate the variance of the *noisy*
input, while at test time the noise is off and the layer sees ``real_var``.
Per BN layer and feature::

    delta = real_var / moving_var                  # < 1: eval activations shrink
    shift = max(real_var / moving_var, moving_var / real_var)   # the paper's plot

For a unit with mean ``c`` and variance ``v`` hit by multiplicative noise of
mean 1 and variance ``s2`` right before the BN, ``delta = v / (v + s2 * (c**2 +
v))``. ``real_var`` is the variance of the layer's input over training data
with the parameters frozen and every regularizer off (the model in eval mode).
:func:`recalibrate_batch_stats` is the fix of Hendrycks & Gimpel (2016) and Li
et al.: re-estimate every BN layer's population statistics on training data with
the regularizers off, pooled exactly over every sample (batches of any sizes).

Both functions take either model API, told apart by the first argument:

- Flax linen: ``f(apply_fn, variables, batches)``, where ``apply_fn(variables,
  x)`` runs the model in eval mode, e.g. ``lambda v, x: model.apply(v, x,
  train=False)``. BatchNorm calls are intercepted with
  ``flax.linen.intercept_methods``.
- Flax NNX: ``f(model, batches, call=...)`` with an ``nnx.Module``. The
  diagnostics run on a copy of the model (sharing its arrays) in which every
  BatchNorm is wrapped by a probe that ``sow``s what it sees, switched to eval
  mode with ``nnx.view(deterministic=True, use_running_average=True)``; the
  forward pass is ``jax.jit``-compiled over ``nnx.split``/``nnx.merge`` and
  returns only the probes' records, so the model, its variables and its mode
  attributes are never changed.

Either way the model code needs no change, and a BatchNorm called several times
per forward pass contributes every call.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes

from regjax import normalization
from regjax._checks import canonical_axes

__all__ = ["LayerShift", "recalibrate_batch_stats", "variance_shift"]

class _Missing:
  """Tells "not passed" from None for the positional arguments."""

  def __repr__(self):
    return "<required>"


_MISSING = _Missing()


def _default_bn_types() -> tuple[type, ...]:
  import regjax.linen  # here, not at import time: the core never needs flax
  return (nn.BatchNorm, regjax.linen.BatchNorm)


def _default_nnx_bn_types() -> tuple[type, ...]:
  # Imported here so that linen users never import flax.nnx.
  from flax import nnx

  import regjax.nnx
  return (regjax.nnx.BatchNorm, nnx.BatchNorm)


def _bn_type_tuple(bn_types, op: str) -> tuple[type, ...] | None:
  """``bn_types`` as a hashable tuple of classes (None keeps the default)."""
  if bn_types is None:
    return None
  types = (bn_types,) if isinstance(bn_types, type) else tuple(bn_types)
  if not types or not all(isinstance(t, type) for t in types):
    raise TypeError(f"{op}: `bn_types` must be a class or a non-empty iterable of classes; "
                    f"got {bn_types!r}.")
  return types


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


def _moments(value, axis):
  """``(count, mean, m2)`` per feature of a BN input: ``m2 = sum((x - mean)**2)``
  over every non-feature axis (two-pass, so ``|mean| >> std`` stays exact enough
  to pool in float64 later)."""
  axes = canonical_axes(axis, value.ndim, "variance_shift")
  reduce = tuple(a for a in range(value.ndim) if a not in axes)
  value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
  mean = jnp.mean(value, reduce)
  m2 = jnp.sum(jnp.square(value - jnp.mean(value, reduce, keepdims=True)), reduce)
  count = int(np.prod([value.shape[a] for a in reduce]))
  return count, mean, m2


def _pool_moments(records) -> dict[str, list]:
  """Pools ``(path, count, mean, m2)`` records per path exactly, in float64
  (Chan et al.'s parallel formula): ``n = n_a + n_b``, ``mean = mean_a + d *
  n_b / n``, ``m2 = m2_a + m2_b + d**2 * n_a * n_b / n`` with ``d = mean_b -
  mean_a``. ``count`` is a number or per feature: every sample weighs the
  same however the data is split into batches (e.g. a last batch of 1), and a
  feature with count 0 in a call (masked out) gets no weight from it."""
  pooled: dict[str, list] = {}
  for path, count, mean, m2 in records:
    count = np.asarray(count, np.float64)
    mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
    mean, m2 = np.where(count > 0, mean, 0.0), np.where(count > 0, m2, 0.0)
    if path not in pooled:
      pooled[path] = [count, mean, m2]
      continue
    n_a, mean_a, m2_a = pooled[path]
    n = n_a + count
    safe = np.maximum(n, 1.0)
    delta = np.where(count > 0, mean - mean_a, 0.0)
    pooled[path] = [n, mean_a + delta * count / safe, m2_a + m2 + delta**2 * n_a * count / safe]
  return pooled


def _layer_shifts(pooled, moving) -> dict[str, LayerShift]:
  return {
      path: LayerShift(
          moving_mean=np.asarray(moving[path][0], np.float64),
          moving_var=np.asarray(moving[path][1], np.float64),
          real_mean=mean, real_var=m2 / n, count=int(n))
      for path, (n, mean, m2) in pooled.items()
  }


def _pooled_stats(pooled_entry, old_mean, old_var, unbiased: bool):
  """``(mean, var)`` from a pooled ``[count, mean, m2]``, in the layer's
  convention (biased, or ``m2 / (n - 1)`` for ``unbiased_running_var``) and the
  old statistics' dtypes; a feature no sample reached keeps its old values."""
  n, mean, m2 = pooled_entry
  divisor = np.where(n > 1, n - 1, np.maximum(n, 1.0)) if unbiased else np.maximum(n, 1.0)
  var = m2 / divisor
  old_mean_np = np.asarray(old_mean, np.float64)
  old_var_np = np.asarray(old_var, np.float64)
  mean = np.where(n > 0, mean, old_mean_np)
  var = np.where(n > 0, var, old_var_np)
  return jnp.asarray(mean, jnp.asarray(old_mean).dtype), jnp.asarray(var, jnp.asarray(old_var).dtype)


def _selected_count(value, axis, mask):
  """Per-feature number of values entering a BN's batch statistics (float32)."""
  axes = canonical_axes(axis, value.ndim, "recalibrate_batch_stats")
  reduce = tuple(a for a in range(value.ndim) if a not in axes)
  if mask is None:
    n = int(np.prod([value.shape[a] for a in reduce]))
    return jnp.full(tuple(value.shape[a] for a in axes), n, jnp.float32)
  return jnp.sum(jnp.broadcast_to(mask, value.shape), reduce, dtype=jnp.float32)


def _no_bn_call(op: str, nnx_form: bool, variables: Any = None) -> ValueError:
  hint = ("and `call(model, x)` must run the model it is given" if nnx_form else
          "and `bn_types` if the model uses its own BatchNorm class")
  extra = ""
  if not nnx_form and isinstance(variables, Mapping) and "batch_stats" not in variables:
    extra = (f" `variables` has no 'batch_stats' collection either (got collections "
             f"{sorted(map(str, variables))}): the diagnostics need a model with "
             "BatchNorm layers and its full variables, e.g. those from `model.init`.")
  return ValueError(f"{op}: no BatchNorm call was seen; pass at least one batch, {hint}.{extra}")


# --------------------------------------------------------------------------
# Which form was called.


def _nnx_module_type():
  # An nnx model can only exist once flax.nnx is imported, so a linen user's
  # call never pays for importing it.
  module = sys.modules.get("flax.nnx")
  return None if module is None else module.Module


def _dispatch(op: str, apply_fn, variables, batches, call):
  """Returns ``('nnx', model, batches)`` or ``('linen', apply_fn, variables, batches)``."""
  nnx_module = _nnx_module_type()
  if nnx_module is not None and isinstance(apply_fn, nnx_module):
    # NNX form f(model, batches): `batches` arrives in the second slot.
    if variables is not _MISSING and batches is not _MISSING:
      raise TypeError(
          f"{op}: an nnx.Module takes `{op}(model, batches, *, call=None, bn_types=None)`: "
          "no `variables` (the model holds them); got a third positional argument.")
    batches = variables if variables is not _MISSING else batches
    if batches is _MISSING:
      raise TypeError(f"{op}(model, batches, ...): `batches` is missing.")
    if call is not None and not callable(call):
      raise TypeError(f"{op}: `call` must be a function `call(model, x)`; got {call!r}.")
    return "nnx", apply_fn, batches
  form = (f"`{op}(apply_fn, variables, batches, *, bn_types=None)` for a Flax linen model, or "
          f"`{op}(model, batches, *, call=None, bn_types=None)` for an nnx.Module")
  if isinstance(apply_fn, nn.Module):
    raise TypeError(f"{op}: got a linen Module, not its apply function; pass e.g. "
                    f"`lambda v, x: model.apply(v, x, train=False)`. Use {form}.")
  if not callable(apply_fn):
    raise TypeError(f"{op}: the first argument must be an apply function or an nnx.Module; "
                    f"got {type(apply_fn).__name__}. Use {form}.")
  if call is not None:
    raise TypeError(f"{op}: `call` is for nnx.Module models; a linen model takes "
                    f"`apply_fn(variables, x)` instead. Use {form}.")
  if variables is _MISSING or batches is _MISSING:
    raise TypeError(f"{op}: missing `{'variables' if variables is _MISSING else 'batches'}`. "
                    f"Use {form}.")
  if not isinstance(variables, Mapping):
    raise TypeError(f"{op}: `variables` must be the linen variables dict (with "
                    f"'batch_stats'); got {type(variables).__name__}. Use {form}.")
  return "linen", apply_fn, variables, batches


def variance_shift(
    apply_fn: Callable[[Any, jax.Array], Any] | Any,
    variables: Mapping[str, Any] | Iterable[Any] = _MISSING,
    batches: Iterable[Any] = _MISSING,
    *,
    bn_types: Iterable[type] | type | None = None,
    call: Callable[[Any, jax.Array], Any] | None = None,
) -> dict[str, LayerShift]:
  """Per BatchNorm layer: running vs eval-mode ("real") statistics of its input.

  ``delta = real_var / moving_var`` per feature; for noise of variance ``s2``
  on an input of mean ``c`` and variance ``v`` it is ``v / (v + s2 * (c**2 +
  v))``. Two forms:

  - linen: ``variance_shift(apply_fn, variables, batches, *, bn_types=None)``
  - NNX: ``variance_shift(model, batches, *, call=None, bn_types=None)``

  Args:
    apply_fn: linen: ``apply_fn(variables, x)`` running the model in eval mode
      (every regularizer off, BN on running statistics). NNX: the
      ``nnx.Module`` itself (``model``), in any mode; it is not modified.
    variables: linen: the model's variables, with a ``batch_stats``
      collection. NNX: this slot takes ``batches``.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    bn_types: module classes treated as BatchNorm (a class or a tuple); default
      flax.linen's and regjax.linen's (linen), regjax.nnx's and flax.nnx's
      (NNX). NNX BatchNorm classes need ``axis`` and the variables ``mean`` and
      ``var``.
    call: NNX only: ``call(model, x)`` runs the forward pass, default
      ``model(x)``. It gets a copy switched to eval mode with
      ``nnx.view(deterministic=True, use_running_average=True)``, so it must not
      force train mode itself. Compiled once per model structure, ``call`` and
      input shape: pass the same function object across calls (e.g. for every
      run of a study) to reuse the compilation.

  Returns:
    ``{path: LayerShift}`` in call order, keyed by the layer's path: in the
    variables tree for linen (e.g. ``'Block_0/BatchNorm_0'``), the attribute
    path for NNX (e.g. ``'blocks/0/bn'``); ``'<root>'`` if the model is a
    BatchNorm. Statistics are pooled exactly over all batches (Chan et al.'s
    parallel formula, in float64).

  Lifted transforms (linen): a BatchNorm inside ``nn.jit``, ``nn.remat``, or an
  ``nn.scan``/``nn.vmap`` that broadcasts ``batch_stats`` (one shared layer,
  every call pooled) works: records leave the forward pass through
  ``jax.debug.callback``. A stack of BatchNorms made by ``nn.scan``/``nn.vmap``
  with ``variable_axes`` over ``batch_stats`` (or, in NNX, by ``nnx.vmap`` and
  run under ``nnx.scan``/``nnx.vmap``) raises ``NotImplementedError``: one path
  there stands for several layers, each seeing a slice of the statistics.

  Raises:
    TypeError: the arguments fit neither form.
    ValueError: no BatchNorm call was seen (no batch, or no BN of ``bn_types``),
      or (linen) ``variables`` lacks the ``batch_stats`` of a called BatchNorm.
    NotImplementedError: a BatchNorm stacked by a lifted transform (see above).
  """
  op = "variance_shift"
  form = _dispatch(op, apply_fn, variables, batches, call)
  bn_types = _bn_type_tuple(bn_types, op)
  if form[0] == "nnx":
    return _nnx_variance_shift(form[1], form[2], call, bn_types)
  return _linen_variance_shift(*form[1:], bn_types)


def recalibrate_batch_stats(
    apply_fn: Callable[[Any, jax.Array], Any] | Any,
    variables: Mapping[str, Any] | Iterable[Any] = _MISSING,
    batches: Iterable[Any] = _MISSING,
    *,
    bn_types: Iterable[type] | type | None = None,
    call: Callable[[Any, jax.Array], Any] | None = None,
) -> Any:
  """Re-estimates every BatchNorm's population statistics with regularizers off.

  Each BN layer normalizes with its batch statistics (as in training) while the
  noise stays off; each layer's new ``mean`` and ``var`` are the exact pooled
  statistics of every value it saw over all its calls on ``batches`` (float64,
  Chan et al.'s parallel formula: each batch weighted by its count, the
  between-batch spread of the means included), so batches of unequal sizes
  (e.g. a last batch of 1) give the population mean and variance of the
  concatenated data. The variance follows the layer's convention: biased
  (``M2 / n``), or unbiased (``M2 / (n - 1)``) for ``unbiased_running_var=True``;
  a ``mask`` passed to the BN is honoured, and a feature that no selected value
  reached keeps its old statistics. Two forms:

  - linen: ``recalibrate_batch_stats(apply_fn, variables, batches, *,
    bn_types=None)`` returns a new ``batch_stats`` tree; apply it as
    ``{**variables, 'batch_stats': new_stats}``.
  - NNX: ``recalibrate_batch_stats(model, batches, *, call=None,
    bn_types=None)`` returns an ``nnx.State`` of the model's ``nnx.BatchStat``
    variables; apply it with ``nnx.update(model, new_state)``.

  Args:
    apply_fn: linen: ``apply_fn(variables, x)`` running the model in eval mode.
      NNX: the ``nnx.Module`` itself (``model``), in any mode; not modified.
    variables: linen: the model's variables; not modified. NNX: this slot takes
      ``batches``.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    bn_types: module classes treated as BatchNorm (see :func:`variance_shift`).
      NNX classes also need ``epsilon`` and ``scale``/``bias`` (None when
      absent); ``dtype`` and ``unbiased_running_var`` are optional.
    call: NNX only: ``call(model, x)`` runs the forward pass, default
      ``model(x)``; it gets a copy in eval mode (see :func:`variance_shift`).

  Returns:
    linen: a new ``batch_stats`` tree, same structure and dtypes as
    ``variables['batch_stats']``. NNX: a new ``nnx.State`` with every
    ``nnx.BatchStat`` of the model (same paths, types and dtypes), the called
    BN layers' ``mean`` and ``var`` replaced; BN layers that were not called
    keep their statistics.

  Raises:
    TypeError: the arguments fit neither form.
    ValueError: no BatchNorm call was seen, or (linen) ``variables`` lacks the
      ``batch_stats`` of a called BatchNorm.
    NotImplementedError: a BatchNorm stacked by ``nn.scan``/``nn.vmap`` over
      ``batch_stats`` (linen) or by ``nnx.vmap`` (NNX); see :func:`variance_shift`.
  """
  op = "recalibrate_batch_stats"
  form = _dispatch(op, apply_fn, variables, batches, call)
  bn_types = _bn_type_tuple(bn_types, op)
  if form[0] == "nnx":
    return _nnx_recalibrate(form[1], form[2], call, bn_types)
  return _linen_recalibrate(*form[1:], bn_types)


# --------------------------------------------------------------------------
# linen: intercept BatchNorm calls.


def _bn_calls(bn_types) -> Callable:
  """Returns a predicate telling intercepted BatchNorm ``__call__``s."""
  types = tuple(bn_types) if bn_types is not None else _default_bn_types()

  def is_bn_call(context) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, types)
  return is_bn_call


def _path(module) -> str:
  return "/".join(module.path) or "<root>"


def _running_stats(module, op: str, variables):
  mean = module.get_variable("batch_stats", "mean")
  var = module.get_variable("batch_stats", "var")
  if mean is None or var is None:
    got = sorted(map(str, variables)) if isinstance(variables, Mapping) else "?"
    raise ValueError(
        f"{op}: the BatchNorm at '{_path(module)}' has no running statistics in "
        "`variables`: `variables` must hold the model's 'batch_stats' collection "
        "(e.g. the full dict returned by `model.init`), with 'mean' and 'var' for "
        f"every BatchNorm; got collections {got}.")
  return {"mean": mean, "var": var}


def _check_not_mapped(module, variables, stats, op: str) -> None:
  """Raises if the BN's statistics are sliced by a lifted transform.

  Under ``nn.scan``/``nn.vmap`` with ``variable_axes`` over ``batch_stats``, one
  module path stands for a stack of BatchNorms, each seeing its own slice of
  the stacked statistics: one pooled estimate per path cannot represent them."""
  node = variables.get("batch_stats") if isinstance(variables, Mapping) else None
  for name in module.path:
    if not isinstance(node, Mapping) or name not in node:
      return
    node = node[name]
  if not isinstance(node, Mapping) or "mean" not in node:
    return
  stored = tuple(np.shape(node["mean"]))
  seen = tuple(np.shape(stats["mean"]))
  if stored != seen:
    raise NotImplementedError(
        f"{op}: the BatchNorm at '{_path(module)}' runs inside a lifted transform "
        f"that maps over its 'batch_stats' (nn.scan or nn.vmap with `variable_axes` "
        f"covering 'batch_stats': stored statistics of shape {stored}, the layer sees "
        f"a slice of shape {seen}). Such a stack of BatchNorms under one path is not "
        "supported; nn.jit, nn.remat, and nn.scan/nn.vmap that broadcast "
        "'batch_stats' (`variable_broadcast`) are.")


def _in_call_order(capture_fn):
  """jit-compiles ``capture_fn(variables, x, emit)`` into ``(variables, x) ->
  [(path, record)]`` in call order, one per BN call.

  ``emit(path, static, record)`` hands a record out with a ``jax.debug.callback``,
  so records travel as data from wherever the BN runs (also inside ``nn.jit``,
  ``nn.remat`` or a broadcasting ``nn.scan``/``nn.vmap``, where a Python list
  would capture leaked tracers). The path, the static part and the call's
  position in the trace are baked into each compiled executable, so they are
  right on a jit cache hit too. The callbacks are unordered (ordered effects
  are refused on more than one device); records are sorted by trace position
  (a scan body's iterations share one, and pooling does not depend on their
  order)."""
  lock = threading.Lock()
  sink: list = []

  def traced(variables, x):
    position = itertools.count()

    def emit(path, static, record):
      index = next(position)

      def receive(*values):
        sink.append((index, path, (*static, *(np.asarray(v) for v in values))))

      jax.debug.callback(receive, *record)

    capture_fn(variables, x, emit)

  compiled = jax.jit(traced)

  def run(variables, x):
    with lock:
      sink.clear()
      try:
        jax.block_until_ready(compiled(variables, x))
        jax.effects_barrier()
        calls = sorted(sink, key=lambda call: call[0])  # stable: arrival order within a position
      finally:
        sink.clear()
    return [(path, record) for _, path, record in calls]
  return run


# Cached per (apply_fn, bn_types), so calling a diagnostic again with the same
# apply_fn (e.g. for every run of a study) reuses the compiled capture.
@functools.lru_cache(maxsize=64)
def _capture_moments(apply_fn, bn_types):
  """``(variables, x) -> [(path, (count, mean, m2, moving_mean, moving_var))]``."""
  is_bn_call = _bn_calls(bn_types)
  op = "variance_shift"

  def capture(variables, x, emit):
    def interceptor(next_fun, args, kwargs, context):
      if is_bn_call(context):
        module = context.module
        stats = _running_stats(module, op, variables)
        _check_not_mapped(module, variables, stats, op)
        count, mean, m2 = _moments(args[0], module.axis)
        emit(_path(module), (count,), (mean, m2, stats["mean"], stats["var"]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      apply_fn(variables, x)

  return _in_call_order(capture)


def _linen_variance_shift(apply_fn, variables, batches, bn_types):
  capture = _capture_moments(apply_fn, bn_types)
  moving: dict[str, tuple] = {}

  def records():
    for batch in batches:
      for path, (count, mean, m2, moving_mean, moving_var) in capture(
          variables, _input_of(batch)):
        moving[path] = (moving_mean, moving_var)
        yield path, count, mean, m2

  pooled = _pool_moments(records())
  if not pooled:
    raise _no_bn_call("variance_shift", nnx_form=False, variables=variables)
  return _layer_shifts(pooled, moving)


@functools.lru_cache(maxsize=64)
def _capture_batch_stats(apply_fn, bn_types):
  """``(variables, x) -> [(path, (unbiased, count, mean, m2))]``, each BN
  normalizing with its batch statistics as in training (the noise stays off via
  apply_fn); ``count`` is per feature, ``m2 = count * biased batch variance``."""
  is_bn_call = _bn_calls(bn_types)
  op = "recalibrate_batch_stats"

  def capture(variables, x, emit):
    def interceptor(next_fun, args, kwargs, context):
      if not is_bn_call(context):
        return next_fun(*args, **kwargs)
      module, value = context.module, args[0]
      stats = _running_stats(module, op, variables)
      _check_not_mapped(module, variables, stats, op)
      scale = module.get_variable("params", "scale") if module.use_scale else None
      bias = module.get_variable("params", "bias") if module.use_bias else None
      mask = kwargs.get("mask")
      # momentum=0: the "updated" running statistics are this batch's (biased;
      # the layer's convention is applied once, after pooling).
      y, batch = normalization.batch_norm(
          value, stats, scale, bias, deterministic=False, momentum=0.0,
          epsilon=module.epsilon, axis=module.axis, mask=mask,
          dtype=dtypes.canonicalize_dtype(
              *(a for a in (value, scale, bias) if a is not None), dtype=module.dtype))
      count = _selected_count(value, module.axis, mask)
      emit(_path(module), (bool(getattr(module, "unbiased_running_var", False)),),
           (count, batch["mean"], batch["var"].astype(jnp.float32) * count))
      return y

    with nn.intercept_methods(interceptor):
      apply_fn(variables, x)

  return _in_call_order(capture)


def _linen_recalibrate(apply_fn, variables, batches, bn_types):
  op = "recalibrate_batch_stats"
  capture = _capture_batch_stats(apply_fn, bn_types)
  unbiased: dict[str, bool] = {}

  def records():
    for batch in batches:
      for path, (is_unbiased, count, mean, m2) in capture(variables, _input_of(batch)):
        unbiased[path] = is_unbiased
        yield path, count, mean, m2

  pooled = _pool_moments(records())
  if not pooled:
    raise _no_bn_call(op, nnx_form=False, variables=variables)
  if "batch_stats" not in variables:  # pragma: no cover - caught while capturing
    raise ValueError(f"{op}: `variables` has no 'batch_stats' collection.")

  def new_stats(path, node):
    mean, var = _pooled_stats(pooled[path], node["mean"], node["var"], unbiased[path])
    return {**node, "mean": mean, "var": var}

  def rebuild(tree, prefix):
    out = {}
    for name, node in tree.items():
      path = "/".join(prefix + (name,))
      if isinstance(node, Mapping) and {"mean", "var"} <= set(node) and not isinstance(
          node["mean"], Mapping):
        out[name] = new_stats(path, node) if path in pooled else node
      elif isinstance(node, Mapping):
        out[name] = rebuild(node, prefix + (name,))
      else:
        out[name] = node
    return out

  root = variables["batch_stats"]
  if "<root>" in pooled:  # the model itself is a BatchNorm
    return new_stats("<root>", root)
  return rebuild(root, ())


# --------------------------------------------------------------------------
# NNX: no method interceptor, so each BatchNorm in a copy of the model is
# wrapped by a probe that sows what it sees.

# The probe's position in the forward pass. Set only while the capture is
# traced; jit sorts the keys of what it returns, so call order travels as data.
_CALL_INDEX: contextvars.ContextVar = contextvars.ContextVar("regjax_bn_call_index",
                                                             default=None)


@functools.cache
def _nnx_probe_types():
  """``(BatchNormProbe, ProbeRecord)``, defined on first use so that linen users
  never import flax.nnx. Cached: the class is part of every probe model's
  graph definition, and a new class per call would defeat the jit cache."""
  from flax import nnx

  class ProbeRecord(nnx.Intermediate):
    """What a probe sows; its own type, so the model's own intermediates stay out."""

  class BatchNormProbe(nnx.Module):
    """Stands in for one BatchNorm in a copy of the model.

    ``kind='moments'``: sows ``(call index, count, mean, m2)`` of the input,
    then calls the wrapped BN (in eval mode by the caller's ``nnx.view``).
    ``kind='batch_stats'``: normalizes with the input's batch statistics via
    :func:`regjax.batch_norm` (``momentum=0``, so the "updated" statistics are
    the batch's, biased) and sows ``(call index, count, mean, m2)`` with a
    per-feature count. The wrapped BN's variables are only read.
    """

    def __init__(self, bn, kind: str):
      self.bn = bn
      self.kind = kind

    def __call__(self, x, *args, **kwargs):
      counter = _CALL_INDEX.get()
      index = next(counter) if counter is not None else 0
      bn = self.bn
      if self.kind == "moments":
        count, mean, m2 = _moments(x, bn.axis)
        self.sow(ProbeRecord, "record", (index, count, mean, m2))
        return bn(x, *args, **kwargs)
      scale = bn.scale[...] if getattr(bn, "scale", None) is not None else None
      bias = bn.bias[...] if getattr(bn, "bias", None) is not None else None
      # The user's own use_running_average/deterministic arguments are
      # ignored: recalibration needs batch statistics whatever they say.
      # Biased batch statistics: the layer's convention is applied after pooling.
      mask = kwargs.get("mask")
      y, batch = normalization.batch_norm(
          x, {"mean": bn.mean[...], "var": bn.var[...]}, scale, bias,
          deterministic=False, momentum=0.0, epsilon=bn.epsilon, axis=bn.axis,
          mask=mask,
          dtype=dtypes.canonicalize_dtype(
              *(a for a in (x, scale, bias) if a is not None),
              dtype=getattr(bn, "dtype", None)))
      count = _selected_count(x, bn.axis, mask)
      self.sow(ProbeRecord, "record",
               (index, count, batch["mean"], batch["var"].astype(jnp.float32) * count))
      return y

  return BatchNormProbe, ProbeRecord


def _call_model(model, x):
  return model(x)


def _nnx_path(path) -> str:
  return "/".join(map(str, path)) or "<root>"


def _check_nnx_not_stacked(bn, path: str, op: str) -> None:
  """Raises for a BatchNorm whose statistics have more axes than its features:
  a stack of layers made with ``nnx.vmap`` (and run with ``nnx.scan`` or
  ``nnx.vmap``), one module object standing for several BatchNorms."""
  axis = getattr(bn, "axis", -1)
  n_axes = 1 if isinstance(axis, (int, np.integer)) else len(tuple(axis))
  mean = getattr(bn, "mean", None)
  shape = tuple(np.shape(mean[...])) if mean is not None else (0,) * n_axes
  if len(shape) > n_axes:
    raise NotImplementedError(
        f"{op}: the BatchNorm at '{path}' holds stacked statistics (shape "
        f"{shape} for {n_axes} feature axis/axes): a layer stack "
        "built with nnx.vmap and run under nnx.scan/nnx.vmap is not supported, since "
        "one module there stands for several BatchNorms that each see a slice of "
        "its statistics. Run the diagnostics on an unstacked copy of the model.")


def _nnx_probe(model, kind: str, bn_types, op: str):
  """``(probe model in eval mode, {path: (path parts, BN module)})``.

  The probe model is a copy of ``model``'s graph sharing its Variables;
  ``recursive_map`` copies the module objects, so wrapping them and switching
  their mode never reaches ``model`` itself."""
  from flax import nnx

  types = bn_types if bn_types is not None else _default_nnx_bn_types()
  probe_cls, _ = _nnx_probe_types()
  found: dict[str, tuple] = {}

  def wrap(path, node):
    if isinstance(node, types):
      _check_nnx_not_stacked(node, _nnx_path(path), op)
      found[_nnx_path(path)] = (tuple(path), node)
      return probe_cls(node, kind)
    return node

  probe = nnx.recursive_map(wrap, model)
  if not found:
    raise ValueError(
        f"{op}: the model has no BatchNorm module (looked for "
        f"{', '.join(t.__module__ + '.' + t.__qualname__ for t in types)}); "
        "pass `bn_types` if it uses its own BatchNorm class.")
  # Both names explicitly: flax's nnx.BatchNorm only knows use_running_average,
  # the noise modules only deterministic; modules knowing neither are left as
  # they are (raise_if_not_found=False).
  probe = nnx.view(probe, deterministic=True, use_running_average=True,
                   raise_if_not_found=False)
  return probe, found


# Cached per (graph definition, call): a study calling a diagnostic for every
# run of one architecture compiles once per input shape (the graphdef holds the
# structure and static attributes, not the arrays).
@functools.lru_cache(maxsize=64)
def _nnx_capture(graphdef, call):
  """``(state, x) -> [(path, record)]`` in call order, one per BN call."""
  from flax import nnx

  _, record_type = _nnx_probe_types()

  def traced(state, x):
    # Merged inside jit: the Variables are fresh tracers, so whatever the
    # forward pass writes (BN statistics, RNG counts) is dropped here, and only
    # the records leave.
    model = nnx.merge(graphdef, state)
    token = _CALL_INDEX.set(itertools.count())
    try:
      _, captured = nnx.capture(lambda m, v: call(m, v), record_type)(model, x)
    finally:
      _CALL_INDEX.reset(token)
    return {_nnx_path(path[:-1]): variable.get_value()
            for path, variable in nnx.to_flat_state(captured)}

  compiled = jax.jit(traced)

  def run(state, x):
    by_path = jax.device_get(compiled(state, x))
    calls = [(int(record[0]), path, record[1:])
             for path, records in by_path.items() for record in records]
    return [(path, record) for _, path, record in sorted(calls, key=lambda c: c[0])]
  return run


def _nnx_records(model, batches, call, bn_types, kind, op):
  """``(records, found)``: a generator of ``(path, record)``, one per BN call per
  batch in call order, and ``{path: (path parts, BN module)}`` from
  :func:`_nnx_probe`."""
  from flax import nnx

  probe, found = _nnx_probe(model, kind, bn_types, op)
  graphdef, state = nnx.split(probe)
  capture = _nnx_capture(graphdef, call if call is not None else _call_model)

  def records():
    for batch in batches:
      yield from capture(state, _input_of(batch))
  return records(), found


def _nnx_variance_shift(model, batches, call, bn_types):
  op = "variance_shift"
  records, found = _nnx_records(model, batches, call, bn_types, "moments", op)
  pooled = _pool_moments((path, count, mean, m2) for path, (count, mean, m2) in records)
  if not pooled:
    raise _no_bn_call(op, nnx_form=True)
  # Read after the forward passes, straight from the model's own Variables.
  moving = {path: (found[path][1].mean[...], found[path][1].var[...]) for path in pooled}
  return _layer_shifts(pooled, moving)


def _nnx_recalibrate(model, batches, call, bn_types):
  from flax import nnx

  op = "recalibrate_batch_stats"
  records, found = _nnx_records(model, batches, call, bn_types, "batch_stats", op)
  pooled = _pool_moments((path, count, mean, m2) for path, (count, mean, m2) in records)
  if not pooled:
    raise _no_bn_call(op, nnx_form=True)
  # nnx.state returns the model's own Variable objects: every entry of the
  # result is a new Variable (Variable.replace keeps type and metadata), so
  # editing the result never edits the model.
  flat = {path: variable.replace(variable.get_value())
          for path, variable in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
  for path, entry in pooled.items():
    parts, bn = found[path]
    mean_var, var_var = bn.mean, bn.var
    mean, var = _pooled_stats(entry, mean_var.get_value(), var_var.get_value(),
                              bool(getattr(bn, "unbiased_running_var", False)))
    # Also covers a custom BN whose statistics are not nnx.BatchStat.
    flat[(*parts, "mean")] = mean_var.replace(mean)
    flat[(*parts, "var")] = var_var.replace(var)
  return nnx.from_flat_state(list(flat.items()))
