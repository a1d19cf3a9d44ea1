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

Which layers count: BatchRenorm is measured and recalibrated as a BatchNorm
(its eval mode is BatchNorm's, with the same ``mean``/``var``); a ghost
BatchNorm (``virtual_batch_size``) too (its eval mode is plain BatchNorm's;
recalibration gives the population statistics of all samples, not the mean of
the per-group variances its training stores). A BatchNorm made with
``track_running_stats=False`` has no running statistics and normalizes with the
batch's in every mode, so it has no shift to measure and nothing to
re-estimate: it is skipped (no :class:`LayerShift`, its call runs unchanged, and
recalibration leaves it alone).

This module is the front door: it tells the two forms apart and hands the call
to :mod:`regjax.linen.diagnostics` or :mod:`regjax.nnx.diagnostics` (each with
one signature, importable on its own); the pooling both share lives in
``regjax._diagnostics``. flax.nnx and regjax.nnx are imported only for an NNX
model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, overload

from regjax._diagnostics import BNTypes, LayerShift, forms

if TYPE_CHECKING:
  from flax import nnx

__all__ = ["LayerShift", "recalibrate_batch_stats", "variance_shift"]

# The positional-or-keyword arguments after the first, in the order of the
# linen form (an NNX model takes `batches` in the first of them).
_SLOTS = ("variables", "batches")


@overload
def variance_shift(
  model: nnx.Module,
  /,
  batches: Iterable[Any],
  *,
  call: Callable[[Any, Any], Any] | None = None,
  bn_types: BNTypes = None,
) -> dict[str, LayerShift]: ...


@overload
def variance_shift(
  apply_fn: Callable[[Any, Any], Any],
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  bn_types: BNTypes = None,
) -> dict[str, LayerShift]: ...


def variance_shift(
  apply_fn: Any,
  *args: Any,
  bn_types: BNTypes = None,
  call: Callable[[Any, Any], Any] | None = None,
  **kwargs: Any,
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
      flax.linen's BatchNorm and regjax.linen's BatchNorm and BatchRenorm
      (linen), regjax.nnx's BatchNorm and BatchRenorm and flax.nnx's BatchNorm
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
  _reject_equinox(op, apply_fn)
  given = _given(op, args, kwargs)
  if _is_nnx_module(apply_fn):
    from regjax.nnx import diagnostics as nnx_diagnostics

    return nnx_diagnostics.variance_shift(
      apply_fn, _nnx_batches(op, given), call=call, bn_types=bn_types
    )
  from regjax.linen import diagnostics as linen_diagnostics

  variables, batches = _linen_args(op, apply_fn, given, call)
  return linen_diagnostics.variance_shift(apply_fn, variables, batches, bn_types=bn_types)


@overload
def recalibrate_batch_stats(
  model: nnx.Module,
  /,
  batches: Iterable[Any],
  *,
  call: Callable[[Any, Any], Any] | None = None,
  bn_types: BNTypes = None,
) -> nnx.State: ...


@overload
def recalibrate_batch_stats(
  apply_fn: Callable[[Any, Any], Any],
  variables: Mapping[str, Any],
  batches: Iterable[Any],
  *,
  bn_types: BNTypes = None,
) -> dict[str, Any]: ...


def recalibrate_batch_stats(
  apply_fn: Any,
  *args: Any,
  bn_types: BNTypes = None,
  call: Callable[[Any, Any], Any] | None = None,
  **kwargs: Any,
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
  _reject_equinox(op, apply_fn)
  given = _given(op, args, kwargs)
  if _is_nnx_module(apply_fn):
    from regjax.nnx import diagnostics as nnx_diagnostics

    return nnx_diagnostics.recalibrate_batch_stats(
      apply_fn, _nnx_batches(op, given), call=call, bn_types=bn_types
    )
  from regjax.linen import diagnostics as linen_diagnostics

  variables, batches = _linen_args(op, apply_fn, given, call)
  return linen_diagnostics.recalibrate_batch_stats(apply_fn, variables, batches, bn_types=bn_types)


# --------------------------------------------------------------------------
# Which form was called.


def _given(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The ``variables``/``batches`` slots that were passed, by name, with
  Python's own errors for a call that fits ``op(apply_fn, variables, batches,
  *, bn_types, call)`` in no way."""
  given = dict(zip(_SLOTS, args, strict=False))  # the surplus is counted below
  for name, value in kwargs.items():
    if name not in _SLOTS:
      raise TypeError(f"{op}() got an unexpected keyword argument '{name}'")
    if name in given:
      raise TypeError(f"{op}() got multiple values for argument '{name}'")
    given[name] = value
  if len(args) > len(_SLOTS):
    raise TypeError(
      f"{op}() takes from 1 to {len(_SLOTS) + 1} positional arguments but "
      f"{len(args) + 1} were given"
    )
  return given


def _reject_equinox(op: str, first: Any) -> None:
  """An Equinox model with a BatchNorm (a stateful layer) raises a clear TypeError: not
  supported yet. Other Equinox modules (e.g. an ``eqx.filter_jit``-wrapped apply function)
  are left to the linen form, as before."""
  eqx = sys.modules.get("equinox")  # imported only by an Equinox user
  if eqx is None or not isinstance(first, eqx.Module):
    return
  import jax

  def is_bn(v: Any) -> bool:
    return isinstance(v, (eqx.nn.StatefulLayer, eqx.nn.StateIndex))

  if any(is_bn(v) for v in jax.tree_util.tree_leaves(first, is_leaf=is_bn)):
    raise TypeError(
      f"{op}: Equinox models are not supported yet. The probe must see the input of every "
      "BatchNorm call of an eval-mode forward pass, which it does by intercepting the calls "
      "(flax.linen.intercept_methods for linen, a wrapped copy of the model for NNX); an "
      "Equinox model has no such hook, and its forward pass (its own signature, an "
      "eqx.nn.State, keys, a jax.vmap with the BatchNorm's axis_name) is not known to regjax. "
      f"Use {forms(op)}, or compute the statistics of each BatchNorm's input yourself."
    )


def _is_nnx_module(first: Any) -> bool:
  # An nnx model can only exist once flax.nnx is imported, so a linen user's
  # call never pays for importing it.
  module = sys.modules.get("flax.nnx")
  return module is not None and isinstance(first, module.Module)


def _nnx_batches(op: str, given: Mapping[str, Any]) -> Any:
  """``batches`` of ``op(model, batches)``: it arrives in the first free slot."""
  if len(given) > 1:
    raise TypeError(
      f"{op}: an nnx.Module takes `{op}(model, batches, *, call=None, bn_types=None)`: "
      "no `variables` (the model holds them); got a third positional argument."
    )
  if not given:
    raise TypeError(f"{op}(model, batches, ...): `batches` is missing.")
  return next(iter(given.values()))


def _linen_args(op: str, apply_fn: Any, given: Mapping[str, Any], call: Any) -> tuple[Any, Any]:
  """``(variables, batches)`` of ``op(apply_fn, variables, batches)``."""
  from regjax.linen.diagnostics import check_apply_fn

  check_apply_fn(op, apply_fn)
  if call is not None:
    raise TypeError(
      f"{op}: `call` is for nnx.Module models; a linen model takes "
      f"`apply_fn(variables, x)` instead. Use {forms(op)}."
    )
  for name in _SLOTS:
    if name not in given:
      raise TypeError(f"{op}: missing `{name}`. Use {forms(op)}.")
  return given["variables"], given["batches"]
