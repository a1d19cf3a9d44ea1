"""Variance shift and BatchNorm recalibration for Flax NNX models.

The NNX form of :mod:`regjax.diagnostics` (see there for the maths). NNX has
no method interceptor, so the diagnostics run on a copy of the model (sharing
its arrays) in which every BatchNorm is wrapped by a probe that ``sow``s what
it sees, switched to eval mode with ``nnx.view(deterministic=True,
use_running_average=True)``; the forward pass is ``jax.jit``-compiled over
``nnx.split``/``nnx.merge`` and returns only the probes' records, so the model,
its variables and its mode attributes are never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from regjax import _diagnostics as common
from regjax._diagnostics import BNTypes, LayerShift
from regjax.nnx.normalization import BatchNorm, BatchRenorm

__all__ = ["LayerShift", "recalibrate_batch_stats", "variance_shift"]

CallFn = Callable[[Any, Any], Any]
# (state, x) -> [(path, (count, mean, m2))] in call order, one per BatchNorm call.
Capture = Callable[[Any, Any], list[tuple[str, tuple]]]


def variance_shift(
  model: nnx.Module, batches: Iterable[Any], *, call: CallFn | None = None, bn_types: BNTypes = None
) -> dict[str, LayerShift]:
  """Per BatchNorm layer: running vs eval-mode ("real") statistics of its input.

  Args:
    model: the ``nnx.Module``, in any mode; it is not modified.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    call: ``call(model, x)`` runs the forward pass, default ``model(x)``. It
      gets a copy switched to eval mode with ``nnx.view(deterministic=True,
      use_running_average=True)``, so it must not force train mode itself.
      Compiled once per model structure, ``call`` and input shape: pass the
      same function object across calls (e.g. for every run of a study) to
      reuse the compilation.
    bn_types: module classes treated as BatchNorm (a class or a tuple); default
      regjax.nnx's BatchNorm and BatchRenorm and flax.nnx's BatchNorm. They
      need ``axis`` and the variables ``mean`` and ``var``. Layers made with
      ``track_running_stats=False`` are skipped.

  Returns:
    ``{path: LayerShift}`` in call order, keyed by the attribute path (e.g.
    ``'blocks/0/bn'``; ``'<root>'`` if the model is a BatchNorm), pooled
    exactly over all batches.

  Raises:
    TypeError: ``call`` is not a function or ``bn_types`` not classes.
    ValueError: the model has no BatchNorm of ``bn_types``, or none was called.
    NotImplementedError: a BatchNorm stacked by ``nnx.vmap``.
  """
  op = "variance_shift"
  records, found = _records(op, model, batches, call, bn_types, "moments")
  pooled = common.pool_moments((path, count, mean, m2) for path, (count, mean, m2) in records)
  if not pooled:
    raise _no_bn_call(op)
  # Read after the forward passes, straight from the model's own Variables.
  moving = {path: (found[path][1].mean[...], found[path][1].var[...]) for path in pooled}
  return common.layer_shifts(pooled, moving)


def recalibrate_batch_stats(
  model: nnx.Module, batches: Iterable[Any], *, call: CallFn | None = None, bn_types: BNTypes = None
) -> nnx.State:
  """Re-estimates every BatchNorm's population statistics with regularizers off.

  Each BN normalizes with its batch statistics while the eval view keeps the
  noise off; its new ``mean`` and ``var`` pool every value it saw over all its
  calls on ``batches`` exactly (see :func:`regjax.diagnostics.recalibrate_batch_stats`).

  Args:
    model: the ``nnx.Module``, in any mode; not modified.
    batches: training batches: arrays, ``(x, y)`` tuples or ``{'x': ...}`` dicts.
    call: ``call(model, x)`` runs the forward pass (see :func:`variance_shift`).
    bn_types: module classes treated as BatchNorm (see :func:`variance_shift`);
      they also need ``epsilon`` and ``scale``/``bias`` (None when absent),
      ``dtype`` and ``unbiased_running_var`` are optional.

  Returns:
    A new ``nnx.State`` with every ``nnx.BatchStat`` of the model (same paths,
    types and dtypes), the called BN layers' ``mean`` and ``var`` replaced;
    apply it with ``nnx.update(model, new_state)``.

  Raises:
    As :func:`variance_shift`.
  """
  op = "recalibrate_batch_stats"
  records, found = _records(op, model, batches, call, bn_types, "batch_stats")
  pooled = common.pool_moments((path, count, mean, m2) for path, (count, mean, m2) in records)
  if not pooled:
    raise _no_bn_call(op)
  # nnx.state returns the model's own Variable objects: every entry of the
  # result is a new Variable (Variable.replace keeps type and metadata), so
  # editing the result never edits the model.
  flat = {
    path: variable.replace(variable.get_value())
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
  }
  for path, entry in pooled.items():
    parts, bn = found[path]
    mean_var, var_var = bn.mean, bn.var
    mean, var = common.pooled_stats(
      entry,
      mean_var.get_value(),
      var_var.get_value(),
      bool(getattr(bn, "unbiased_running_var", False)),
    )
    # Also covers a custom BN whose statistics are not nnx.BatchStat.
    flat[(*parts, "mean")] = mean_var.replace(mean)
    flat[(*parts, "var")] = var_var.replace(var)
  return nnx.from_flat_state(list(flat.items()))


def _no_bn_call(op: str) -> ValueError:
  return ValueError(
    f"{op}: no BatchNorm call was seen; pass at least one batch, and "
    "`call(model, x)` must run the model it is given."
  )


# --------------------------------------------------------------------------
# The probes: each BatchNorm in a copy of the model is wrapped by one.


class ProbeRecord(nnx.Intermediate):
  """What a probe sows; its own type, so the model's own intermediates stay out."""


class BatchNormProbe(nnx.Module):
  """Stands in for one BatchNorm in a copy of the model.

  ``kind='moments'``: sows ``(call index, count, mean, m2)`` of the input,
  then calls the wrapped BN (in eval mode by the caller's ``nnx.view``).
  ``kind='batch_stats'``: normalizes with the input's batch statistics via
  :func:`regjax.batch_norm` (``momentum=0``, so the "updated" statistics are
  the batch's, biased) and sows ``(call index, count, mean, m2)`` with a
  per-feature count. The wrapped BN's variables are only read. One class for
  every probe model: it is part of their graph definitions, which key the jit
  cache.
  """

  def __init__(self, bn: Any, kind: str):
    self.bn = bn
    self.kind = kind

  def __call__(self, x, *args, **kwargs):
    index = common.next_call_index()
    bn: Any = self.bn  # any class of `bn_types`
    if self.kind == "moments":
      count, mean, m2 = common.moments(x, bn.axis)
      self.sow(ProbeRecord, "record", (index, count, mean, m2))
      return bn(x, *args, **kwargs)
    # The user's own use_running_average/deterministic arguments are ignored:
    # recalibration needs batch statistics whatever they say.
    y, count, mean, m2 = _normalize_with_batch_stats(bn, x, kwargs.get("mask"))
    self.sow(ProbeRecord, "record", (index, count, mean, m2))
    return y


def _normalize_with_batch_stats(bn: Any, x: Any, mask: Any) -> tuple[Any, Any, Any, Any]:
  """``(y, count, mean, m2)``: the BN's output on batch statistics, and those
  statistics (biased: the layer's convention is applied after pooling)."""
  scale = bn.scale[...] if getattr(bn, "scale", None) is not None else None
  bias = bn.bias[...] if getattr(bn, "bias", None) is not None else None
  stats = {"mean": bn.mean[...], "var": bn.var[...]}
  return common.normalize_with_batch_stats(
    x,
    stats,
    scale,
    bias,
    epsilon=bn.epsilon,
    axis=bn.axis,
    mask=mask,
    dtype=getattr(bn, "dtype", None),
  )


def _call_model(model: Any, x: Any) -> Any:
  return model(x)


def _nnx_path(path: tuple) -> str:
  return "/".join(map(str, path)) or "<root>"


def _check_not_stacked(bn: Any, path: str, op: str) -> None:
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
      "its statistics. Run the diagnostics on an unstacked copy of the model."
    )


def _probe(
  model: nnx.Module, kind: str, bn_types: tuple[type, ...] | None, op: str
) -> tuple[nnx.Module, dict[str, tuple[tuple, Any]]]:
  """``(probe model in eval mode, {path: (path parts, BN module)})``.

  The probe model is a copy of ``model``'s graph sharing its Variables;
  ``recursive_map`` copies the module objects, so wrapping them and switching
  their mode never reaches ``model`` itself."""
  types = bn_types if bn_types is not None else (BatchNorm, BatchRenorm, nnx.BatchNorm)
  found: dict[str, tuple[tuple, Any]] = {}

  def wrap(path: tuple, node: Any) -> Any:
    # A layer without running statistics is left as it is (it runs unwrapped).
    if isinstance(node, types) and common.has_running_stats(node):
      _check_not_stacked(node, _nnx_path(path), op)
      found[_nnx_path(path)] = (tuple(path), node)
      return BatchNormProbe(node, kind)
    return node

  probe = nnx.recursive_map(wrap, model)
  if not found:
    raise ValueError(
      f"{op}: the model has no BatchNorm module (looked for "
      f"{', '.join(t.__module__ + '.' + t.__qualname__ for t in types)}); "
      f"pass `bn_types` if it uses its own BatchNorm class.{common.NO_RUNNING_STATS_NOTE}"
    )
  # Both names explicitly: flax's nnx.BatchNorm only knows use_running_average,
  # the noise modules only deterministic; modules knowing neither are left as
  # they are (raise_if_not_found=False).
  probe = nnx.view(probe, deterministic=True, use_running_average=True, raise_if_not_found=False)
  return probe, found


def _compile_capture(graphdef: Any, resolve: Callable[[], CallFn]) -> Capture:
  """``(state, x) -> [(path, record)]`` in call order, one per BN call."""

  def traced(state, x):
    # Merged inside jit: the Variables are fresh tracers, so whatever the
    # forward pass writes (BN statistics, RNG counts) is dropped here, and only
    # the records leave.
    model = nnx.merge(graphdef, state)
    call = resolve()
    with common.numbered_calls():
      _, captured = nnx.capture(lambda m, v: call(m, v), ProbeRecord)(model, x)
    return {
      _nnx_path(path[:-1]): variable.get_value() for path, variable in nnx.to_flat_state(captured)
    }

  compiled = jax.jit(traced)

  def run(state, x):
    # jit sorts the keys of what it returns, so call order travels as data.
    by_path = jax.device_get(compiled(state, x))
    calls = [
      (int(record[0]), path, record[1:]) for path, records in by_path.items() for record in records
    ]
    return [(path, record) for _, path, record in sorted(calls, key=lambda c: c[0])]

  return run


# Per `call`, held weakly, and graph definition: a study calling a diagnostic
# for every run of one architecture compiles once per input shape (the graphdef
# holds the structure and static attributes, not the arrays).
_CAPTURES: common.WeakCache[Capture] = common.WeakCache()


def _records(
  op: str,
  model: nnx.Module,
  batches: Iterable[Any],
  call: CallFn | None,
  bn_types: BNTypes,
  kind: str,
) -> tuple[Iterator[tuple[str, tuple]], dict[str, tuple[tuple, Any]]]:
  """``(records, found)``: a generator of ``(path, record)``, one per BN call per
  batch in call order, and ``{path: (path parts, BN module)}`` from :func:`_probe`."""
  if call is not None and not callable(call):
    raise TypeError(f"{op}: `call` must be a function `call(model, x)`; got {call!r}.")
  types = common.bn_type_tuple(bn_types, op)
  probe, found = _probe(model, kind, types, op)
  graphdef, state = nnx.split(probe)
  capture = _CAPTURES.get(
    call if call is not None else _call_model,
    graphdef,
    lambda resolve: _compile_capture(graphdef, resolve),
  )

  def records() -> Iterator[tuple[str, tuple]]:
    for batch in batches:
      yield from capture(state, common.input_of(batch))

  return records(), found
