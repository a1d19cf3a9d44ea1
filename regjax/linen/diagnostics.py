"""Variance shift and BatchNorm recalibration for Flax linen models.

The linen form of :mod:`regjax.diagnostics` (see there for the maths):
``apply_fn(variables, x)`` runs the model in eval mode, e.g. ``lambda v, x:
model.apply(v, x, train=False)``, and every BatchNorm call is intercepted with
``flax.linen.intercept_methods``. The records leave the compiled forward pass
through ``jax.debug.callback``, so a BatchNorm inside ``nn.jit``, ``nn.remat``
or a broadcasting ``nn.scan``/``nn.vmap`` contributes every call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from regjax import _diagnostics as common
from regjax._diagnostics import BNTypes, LayerShift
from regjax.linen.normalization import BatchNorm, BatchRenorm

__all__ = ["LayerShift", "recalibrate_batch_stats", "variance_shift"]

ApplyFn = Callable[[Any, Any], Any]
# (variables, x) -> [(path, record)] in call order, one per BatchNorm call.
Capture = Callable[[Mapping[str, Any], Any], list[tuple[str, tuple]]]


def variance_shift(
  apply_fn: ApplyFn,
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  bn_types: BNTypes = None,
) -> dict[str, LayerShift]:
  """Per BatchNorm layer: running vs eval-mode ("real") statistics of its input.

  Args:
    apply_fn: ``apply_fn(variables, x)`` running the model in eval mode (every
      regularizer off, BN on running statistics).
    variables: the model's variables, with a ``batch_stats`` collection.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    bn_types: module classes treated as BatchNorm (a class or a tuple); default
      flax.linen's BatchNorm and regjax.linen's BatchNorm and BatchRenorm.
      Layers made with ``track_running_stats=False`` are skipped.

  Returns:
    ``{path: LayerShift}`` in call order, keyed by the layer's path in the
    variables tree (e.g. ``'Block_0/BatchNorm_0'``; ``'<root>'`` if the model
    is a BatchNorm), pooled exactly over all batches.

  Raises:
    TypeError: ``apply_fn`` is not a function, ``variables`` not a mapping, or
      ``bn_types`` not classes.
    ValueError: no BatchNorm call was seen, or ``variables`` lacks the
      ``batch_stats`` of a called BatchNorm.
    NotImplementedError: a BatchNorm stacked by ``nn.scan``/``nn.vmap`` with
      ``variable_axes`` over ``batch_stats``.
  """
  op = "variance_shift"
  types = _check_args(op, apply_fn, variables, bn_types)
  capture = _CAPTURES.get(
    apply_fn, ("moments", types), lambda resolve: _in_call_order(_moments_capture(resolve, types))
  )
  moving: dict[str, tuple] = {}

  def records() -> Iterator[common.Record]:
    for batch in batches:
      for path, (count, mean, m2, moving_mean, moving_var) in capture(
        variables, common.input_of(batch)
      ):
        moving[path] = (moving_mean, moving_var)
        yield path, count, mean, m2

  pooled = common.pool_moments(records())
  if not pooled:
    raise _no_bn_call(op, variables)
  return common.layer_shifts(pooled, moving)


def recalibrate_batch_stats(
  apply_fn: ApplyFn,
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  bn_types: BNTypes = None,
) -> dict[str, Any]:
  """Re-estimates every BatchNorm's population statistics with regularizers off.

  Each BN normalizes with its batch statistics while ``apply_fn`` keeps the
  noise off; its new ``mean`` and ``var`` pool every value it saw over all its
  calls on ``batches`` exactly (see :func:`regjax.diagnostics.recalibrate_batch_stats`).

  Args:
    apply_fn: ``apply_fn(variables, x)`` running the model in eval mode.
    variables: the model's variables; not modified.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    bn_types: module classes treated as BatchNorm (see :func:`variance_shift`).

  Returns:
    A new ``batch_stats`` tree, same structure and dtypes as
    ``variables['batch_stats']``; apply it as ``{**variables, 'batch_stats':
    new_stats}``.

  Raises:
    As :func:`variance_shift`.
  """
  op = "recalibrate_batch_stats"
  types = _check_args(op, apply_fn, variables, bn_types)
  capture = _CAPTURES.get(
    apply_fn,
    ("batch_stats", types),
    lambda resolve: _in_call_order(_batch_stats_capture(resolve, types)),
  )
  unbiased: dict[str, bool] = {}

  def records() -> Iterator[common.Record]:
    for batch in batches:
      for path, (is_unbiased, count, mean, m2) in capture(variables, common.input_of(batch)):
        unbiased[path] = is_unbiased
        yield path, count, mean, m2

  pooled = common.pool_moments(records())
  if not pooled:
    raise _no_bn_call(op, variables)
  if "batch_stats" not in variables:  # pragma: no cover - caught while capturing
    raise ValueError(f"{op}: `variables` has no 'batch_stats' collection.")
  return _rebuild_batch_stats(variables["batch_stats"], pooled, unbiased)


# --------------------------------------------------------------------------
# Arguments.


def check_apply_fn(op: str, apply_fn: Any) -> None:
  """Raises TypeError unless ``apply_fn`` is a function (not the Module itself)."""
  if isinstance(apply_fn, nn.Module):
    raise TypeError(
      f"{op}: got a linen Module, not its apply function; pass e.g. "
      f"`lambda v, x: model.apply(v, x, train=False)`. Use {common.forms(op)}."
    )
  if not callable(apply_fn):
    raise TypeError(
      f"{op}: the first argument must be an apply function or an nnx.Module; "
      f"got {type(apply_fn).__name__}. Use {common.forms(op)}."
    )


def _check_args(
  op: str, apply_fn: Any, variables: Any, bn_types: BNTypes
) -> tuple[type, ...] | None:
  check_apply_fn(op, apply_fn)
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"{op}: `variables` must be the linen variables dict (with "
      f"'batch_stats'); got {type(variables).__name__}. Use {common.forms(op)}."
    )
  return common.bn_type_tuple(bn_types, op)


def _no_bn_call(op: str, variables: Mapping[str, Any]) -> ValueError:
  extra = ""
  if "batch_stats" not in variables:
    extra = (
      f" `variables` has no 'batch_stats' collection either (got collections "
      f"{sorted(map(str, variables))}): the diagnostics need a model with "
      "BatchNorm layers and its full variables, e.g. those from `model.init`."
    )
  return ValueError(
    f"{op}: no BatchNorm call was seen; pass at least one batch, and "
    f"`bn_types` if the model uses its own BatchNorm class.{common.NO_RUNNING_STATS_NOTE}{extra}"
  )


# --------------------------------------------------------------------------
# Intercepting BatchNorm calls.


def _bn_calls(bn_types: tuple[type, ...] | None) -> Callable[[Any], bool]:
  """Returns a predicate telling intercepted BatchNorm ``__call__``s (BatchRenorm's
  too: its eval mode is BatchNorm's); a layer without running statistics
  (``track_running_stats=False``) is not one, and runs untouched."""
  types = bn_types if bn_types is not None else (nn.BatchNorm, BatchNorm, BatchRenorm)

  def is_bn_call(context) -> bool:
    return (
      context.method_name == "__call__"
      and isinstance(context.module, types)
      and common.has_running_stats(context.module)
    )

  return is_bn_call


def _path(module: nn.Module) -> str:
  return "/".join(module.path) or "<root>"


def _running_stats(module: nn.Module, op: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  mean: Any = module.get_variable("batch_stats", "mean")
  var: Any = module.get_variable("batch_stats", "var")
  if mean is None or var is None:
    raise ValueError(
      f"{op}: the BatchNorm at '{_path(module)}' has no running statistics in "
      "`variables`: `variables` must hold the model's 'batch_stats' collection "
      "(e.g. the full dict returned by `model.init`), with 'mean' and 'var' for "
      f"every BatchNorm; got collections {sorted(map(str, variables))}."
    )
  return {"mean": mean, "var": var}


def _check_not_mapped(
  module: nn.Module, variables: Mapping[str, Any], stats: Mapping[str, Any], op: str
) -> None:
  """Raises if the BN's statistics are sliced by a lifted transform.

  Under ``nn.scan``/``nn.vmap`` with ``variable_axes`` over ``batch_stats``, one
  module path stands for a stack of BatchNorms, each seeing its own slice of
  the stacked statistics: one pooled estimate per path cannot represent them."""
  node = variables.get("batch_stats")
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
      "'batch_stats' (`variable_broadcast`) are."
    )


def _bn_module(module: nn.Module, op: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  """The intercepted BN's running statistics, checked."""
  stats = _running_stats(module, op, variables)
  _check_not_mapped(module, variables, stats, op)
  return stats


Emit = Callable[[str, tuple, tuple], None]


def _moments_capture(
  resolve: Callable[[], ApplyFn],
  bn_types: tuple[type, ...] | None,
) -> Callable[[Mapping[str, Any], Any, Emit], None]:
  """``capture(variables, x, emit)`` emitting ``(count, mean, m2, moving_mean,
  moving_var)`` per BN call, the BN running as the model says (eval mode)."""
  is_bn_call = _bn_calls(bn_types)

  def capture(variables, x, emit):
    def interceptor(next_fun, args, kwargs, context):
      if is_bn_call(context):
        module = context.module
        stats = _bn_module(module, "variance_shift", variables)
        count, mean, m2 = common.moments(args[0], module.axis)
        emit(_path(module), (count,), (mean, m2, stats["mean"], stats["var"]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      resolve()(variables, x)

  return capture


def _batch_stats_capture(
  resolve: Callable[[], ApplyFn],
  bn_types: tuple[type, ...] | None,
) -> Callable[[Mapping[str, Any], Any, Emit], None]:
  """``capture(variables, x, emit)`` emitting ``(unbiased, count, mean, m2)``
  per BN call, each BN normalizing with its batch statistics as in training
  (the noise stays off via apply_fn); ``count`` is per feature, ``m2 = count *
  biased batch variance``."""
  is_bn_call = _bn_calls(bn_types)

  def capture(variables, x, emit):
    def interceptor(next_fun, args, kwargs, context):
      if not is_bn_call(context):
        return next_fun(*args, **kwargs)
      module, value, mask = context.module, args[0], kwargs.get("mask")
      y, count, mean, m2 = _normalize_with_batch_stats(
        module, value, mask, _bn_module(module, "recalibrate_batch_stats", variables)
      )
      emit(
        _path(module), (bool(getattr(module, "unbiased_running_var", False)),), (count, mean, m2)
      )
      return y

    with nn.intercept_methods(interceptor):
      resolve()(variables, x)

  return capture


def _normalize_with_batch_stats(
  module: nn.Module, value: Any, mask: Any, stats: Mapping[str, Any]
) -> tuple[Any, Any, Any, Any]:
  """``(y, count, mean, m2)``: the BN's output on batch statistics, and those
  statistics (``momentum=0``: the "updated" running statistics are this
  batch's, biased; the layer's convention is applied once, after pooling)."""
  scale = module.get_variable("params", "scale") if module.use_scale else None
  bias = module.get_variable("params", "bias") if module.use_bias else None
  return common.normalize_with_batch_stats(
    value,
    stats,
    scale,
    bias,
    epsilon=module.epsilon,
    axis=module.axis,
    mask=mask,
    dtype=module.dtype,
  )


def _in_call_order(capture_fn: Callable[[Mapping[str, Any], Any, Emit], None]) -> Capture:
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

  def emit(path, static, record):
    index = common.next_call_index()

    def receive(*values):
      sink.append((index, path, (*static, *(np.asarray(v) for v in values))))

    jax.debug.callback(receive, *record)

  def traced(variables, x):
    with common.numbered_calls():
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


# Per apply_fn, held weakly: calling a diagnostic again with the same apply_fn
# (e.g. for every run of a study) reuses the compiled capture.
_CAPTURES: common.WeakCache[Capture] = common.WeakCache()


# --------------------------------------------------------------------------
# The new batch_stats tree.


def _rebuild_batch_stats(
  root: Mapping[str, Any], pooled: common.Pooled, unbiased: Mapping[str, bool]
) -> dict[str, Any]:
  """``root`` with the ``mean`` and ``var`` of every pooled path replaced."""

  def new_stats(path, node):
    mean, var = common.pooled_stats(pooled[path], node["mean"], node["var"], unbiased[path])
    return {**node, "mean": mean, "var": var}

  def rebuild(tree, prefix):
    out = {}
    for name, node in tree.items():
      path = "/".join(prefix + (name,))
      if (
        isinstance(node, Mapping)
        and {"mean", "var"} <= set(node)
        and not isinstance(node["mean"], Mapping)
      ):
        out[name] = new_stats(path, node) if path in pooled else node
      elif isinstance(node, Mapping):
        out[name] = rebuild(node, prefix + (name,))
      else:
        out[name] = node
    return out

  if "<root>" in pooled:  # the model itself is a BatchNorm
    return new_stats("<root>", root)
  return rebuild(root, ())
