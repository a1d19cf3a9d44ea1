"""Equinox BatchNorm and BatchRenorm, drop-in for ``equinox.nn.BatchNorm``.

Same constructor (``BatchNorm(input_size, axis_name, eps=1e-5,
channelwise_affine=True, momentum=0.99, inference=False, dtype=None,
mode='batch')``), parameters (``weight``, ``bias``), call
(``bn(x, state, *, key=None, inference=None) -> (y, state)``) and state
handling (``eqx.nn.StateIndex``, ``eqx.nn.make_with_state``) as
``eqx.nn.BatchNorm``; the statistics come from :func:`regjax.batch_norm`,
which stays accurate when ``|mean| >> std``.

As in equinox, the layer is called per example under ``jax.vmap(...,
axis_name=...)`` (or ``pmap``/``shard_map``) and ``axis_name`` names the
batch: the input is one example, ``(input_size, dim_1, ..., dim_N)``, its
channel axis 0 (``axis``), and the statistics are taken over its other axes
and over the named axis. With ``axis_name=None`` the input itself must hold
the batch, e.g. ``x`` of shape ``(batch, input_size)`` with ``axis=-1``.

Differences from ``eqx.nn.BatchNorm``:

- ``mode``: only ``'batch'`` (equinox's recommended mode, and the only one
  of PyTorch and flax): training normalizes with the batch statistics,
  inference with the running ones. Equinox's ``'ema'`` (normalizing with the
  running averages in training) is not offered.
- Running statistics: ``{'mean': ..., 'var': ...}`` in one
  ``eqx.nn.StateIndex`` (``state_index``; the layout of
  :func:`regjax.init_batch_stats` and flax's ``batch_stats``), initialised to
  0 and 1 and updated ``new = momentum * old + (1 - momentum) * batch``
  (flax's convention, equinox's too; PyTorch's ``momentum=0.1`` is 0.9 here).
  Inference uses them as they are: equinox's batch mode instead divides them
  by ``1 - momentum**steps`` (a debiasing it keeps a step counter for), so
  inference outputs differ from equinox's in the first ``~1 / (1 - momentum)``
  steps; training outputs are the same.
- The state's arrays are at least float32 (``force_float32_reductions``,
  default True); ``dtype`` (default float32, float64 under ``jax_enable_x64``)
  is the dtype of ``weight``, ``bias`` and, if wider, of the statistics. The
  output dtype is the result type of ``x`` and the parameters (flax's rule).
- In addition: ``axis``, ``unbiased_running_var``, ``track_running_stats``,
  ``force_float32_reductions`` and a call-time ``mask``.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from regjax import _checks
from regjax import normalization as F
from regjax.equinox._common import resolve_inference
from regjax.renorm import batch_renorm, check_limit

_State = eqx.nn.State


def _feature_shape(input_size: Any, op: str) -> tuple[int, ...]:
  sizes = input_size if isinstance(input_size, (tuple, list)) else (input_size,)
  if not sizes or not all(
    isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in sizes
  ):
    raise ValueError(
      f"{op}: `input_size` must be a positive int (or a tuple of them, one per `axis`); "
      f"got {input_size!r}."
    )
  return tuple(int(d) for d in sizes)


class _BatchNormBase(eqx.nn.StatefulLayer):
  """Fields, construction and checks shared by :class:`BatchNorm` and :class:`BatchRenorm`."""

  weight: jax.Array | None
  bias: jax.Array | None
  state_index: eqx.nn.StateIndex | None
  inference: bool
  axis_name: str | tuple[str, ...] | None = eqx.field(static=True)
  input_size: int | tuple[int, ...] = eqx.field(static=True)
  eps: float = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  momentum: float = eqx.field(static=True)
  mode: str = eqx.field(static=True)
  axis: int | tuple[int, ...] = eqx.field(static=True)
  unbiased_running_var: bool = eqx.field(static=True)
  force_float32_reductions: bool = eqx.field(static=True)

  def _init(
    self,
    input_size,
    axis_name,
    eps,
    channelwise_affine,
    momentum,
    inference,
    dtype,
    mode,
    axis,
    unbiased_running_var,
    force_float32_reductions,
    track_running_stats,
  ) -> None:
    op = f"regjax.equinox.{type(self).__name__}"
    if mode != "batch":
      raise ValueError(
        f"{op}: `mode` must be 'batch' (batch statistics in training, running statistics "
        f"in inference); got {mode!r}. equinox's 'ema' mode is not supported."
      )
    shape = _feature_shape(input_size, op)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    if len(axes) != len(shape):
      raise ValueError(
        f"{op}: `input_size` {input_size!r} must give one size per feature axis (`axis`={axis!r})."
      )
    _checks.check_epsilon(eps, op)
    _checks.check_rate(momentum, op, "momentum", low=0.0, high=1.0, high_inclusive=True)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{op}: `dtype` must be a floating-point dtype or None; got {dtype!r}.")
    if channelwise_affine:
      self.weight = jnp.ones(shape, dtype)
      self.bias = jnp.zeros(shape, dtype)
    else:
      self.weight = None
      self.bias = None
    if track_running_stats:
      stats_dtype = jnp.promote_types(dtype, jnp.float32) if force_float32_reductions else dtype
      self.state_index = eqx.nn.StateIndex(F.init_batch_stats(shape, stats_dtype))
    else:
      self.state_index = None
    self.inference = inference
    self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    self.input_size = tuple(input_size) if isinstance(input_size, list) else input_size
    self.eps = eps
    self.channelwise_affine = channelwise_affine
    self.momentum = momentum
    self.mode = mode
    self.axis = tuple(axis) if isinstance(axis, list) else axis
    self.unbiased_running_var = unbiased_running_var
    self.force_float32_reductions = force_float32_reductions

  def _check_input(self, x: jax.Array) -> None:
    op = f"regjax.equinox.{type(self).__name__}"
    feature_axes = _checks.canonical_axes(self.axis, jnp.ndim(x), op)
    got = tuple(jnp.shape(x)[a] for a in feature_axes)
    if got != _feature_shape(self.input_size, op):
      raise ValueError(
        f"{op}: `x` of shape {jnp.shape(x)} has size {got} on the feature axis "
        f"`axis`={self.axis!r}, not `input_size`={self.input_size!r}. Under jax.vmap the "
        "layer sees one example, its channel axis first (axis=0, equinox's layout)."
      )

  def _stats(self, state: _State):
    return None if self.state_index is None else state.get(self.state_index)

  def _out_dtype(self, x: jax.Array):
    return F.output_dtype(x, self.weight, self.bias, None)

  def _updated(self, state: _State, new_stats, inference: bool) -> _State:
    if self.state_index is not None and not inference:
      state = state.set(self.state_index, {"mean": new_stats["mean"], "var": new_stats["var"]})
    return state


class BatchNorm(_BatchNormBase):
  """Batch normalization with running statistics in an ``eqx.nn.State``.

  Drop-in for ``eqx.nn.BatchNorm`` in its ``mode='batch'`` (see the module
  docstring for the differences). Training:
  ``y = weight * (x - mu) / sqrt(var + eps) + bias`` with the batch mean and
  biased variance over the non-feature axes of ``x`` and the named axis
  ``axis_name``, and the running statistics updated
  ``momentum * old + (1 - momentum) * batch``; inference: the same with the
  running statistics, the state unchanged. See :func:`regjax.batch_norm`.

  Args:
    input_size: number of channels (the size of the ``axis`` dimension; a
      tuple, one size per axis, for a tuple ``axis``).
    axis_name: the name of the batch axis (``jax.vmap(..., axis_name=...)``,
      ``pmap``, ``shard_map``), or a tuple of names; None: the batch is an
      axis of ``x`` itself.
    eps: added to the variance, ``> 0``.
    channelwise_affine: learnable ``weight`` (ones) and ``bias`` (zeros).
    momentum: decay of the running averages, in ``[0, 1]`` (flax's convention).
    inference: inference mode if True; overridden at call; switched by
      ``eqx.nn.inference_mode``.
    dtype: dtype of ``weight`` and ``bias`` (and of the statistics if wider
      than float32); default float32 (float64 under ``jax_enable_x64``).
    mode: ``'batch'`` only (accepted for equinox compatibility).
    axis: the feature axis or axes of ``x`` (default 0, equinox's per-example
      channels-first layout).
    unbiased_running_var: store the unbiased batch variance in the running
      variance (PyTorch's convention).
    track_running_stats: False: no running statistics, batch statistics in
      both modes (``state`` is passed through unchanged).
    force_float32_reductions: statistics and state in at least float32.
  """

  def __init__(
    self,
    input_size: int | tuple[int, ...],
    axis_name: str | tuple[str, ...] | None = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float = 0.99,
    inference: bool = False,
    dtype: Any = None,
    mode: str = "batch",
    *,
    axis: int | tuple[int, ...] = 0,
    unbiased_running_var: bool = False,
    track_running_stats: bool = True,
    force_float32_reductions: bool = True,
  ):
    self._init(
      input_size,
      axis_name,
      eps,
      channelwise_affine,
      momentum,
      inference,
      dtype,
      mode,
      axis,
      unbiased_running_var,
      force_float32_reductions,
      track_running_stats,
    )

  def __call__(
    self,
    x: jax.Array,
    state: _State,
    *,
    key: jax.Array | None = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
  ) -> tuple[jax.Array, _State]:
    """Normalizes ``x``; in training mode also returns the updated state.

    Args:
      x: one example ``(input_size, dim_1, ..., dim_N)`` under ``jax.vmap``
        with ``axis_name``, or an array holding the batch.
      state: the model's ``eqx.nn.State``.
      key: ignored (equinox's signature).
      inference: overrides the field if given.
      mask: optional boolean array broadcastable to ``x``: only True positions
        enter the statistics (see :func:`regjax.batch_norm`).

    Returns:
      ``(y, state)``.
    """
    del key
    inference = resolve_inference(self, inference)
    self._check_input(x)
    y, new_stats = F.batch_norm(
      x,
      self._stats(state),
      self.weight,
      self.bias,
      deterministic=inference,
      momentum=self.momentum,
      epsilon=self.eps,
      axis=self.axis,
      axis_name=self.axis_name,
      unbiased_running_var=self.unbiased_running_var,
      mask=mask,
      dtype=self._out_dtype(x),
      force_float32_reductions=self.force_float32_reductions,
    )
    return y, self._updated(state, new_stats, inference)


class BatchRenorm(_BatchNormBase):
  """Batch renormalization (Ioffe 2017, arXiv:1702.03275); see :func:`regjax.renorm.batch_renorm`.

  :class:`BatchNorm`'s constructor, parameters, state and inference mode; in
  training the batch statistics are corrected towards the running ones by
  ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
  ``d = clip((mu_B - mean) / sigma, -d_max, d_max)``:
  ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias``.

  Args:
    input_size, axis_name, eps, channelwise_affine, momentum, inference,
      dtype, mode, axis, unbiased_running_var, force_float32_reductions: as
      :class:`BatchNorm` (there is no ``track_running_stats``).
    r_max: bound of ``r``, ``>= 1`` (default 3.0).
    d_max: bound of ``d``, ``>= 0`` (default 5.0).

  ``r_max`` and ``d_max`` given at call override the fields and may be traced
  (a ramp compiles once).
  """

  r_max: float | jax.Array
  d_max: float | jax.Array

  def __init__(
    self,
    input_size: int | tuple[int, ...],
    axis_name: str | tuple[str, ...] | None = None,
    eps: float = 1e-5,
    channelwise_affine: bool = True,
    momentum: float = 0.99,
    inference: bool = False,
    dtype: Any = None,
    mode: str = "batch",
    *,
    axis: int | tuple[int, ...] = 0,
    unbiased_running_var: bool = False,
    force_float32_reductions: bool = True,
    r_max: float | jax.Array = 3.0,
    d_max: float | jax.Array = 5.0,
  ):
    op = "regjax.equinox.BatchRenorm"
    self.r_max = check_limit(r_max, op, "r_max", 1.0)
    self.d_max = check_limit(d_max, op, "d_max", 0.0)
    self._init(
      input_size,
      axis_name,
      eps,
      channelwise_affine,
      momentum,
      inference,
      dtype,
      mode,
      axis,
      unbiased_running_var,
      force_float32_reductions,
      True,
    )

  def __call__(
    self,
    x: jax.Array,
    state: _State,
    *,
    key: jax.Array | None = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
    r_max: float | jax.Array | None = None,
    d_max: float | jax.Array | None = None,
  ) -> tuple[jax.Array, _State]:
    """Renormalizes ``x``; as :meth:`BatchNorm.__call__`, and ``r_max``/``d_max``
    override the fields for this call (may be traced)."""
    del key
    inference = resolve_inference(self, inference)
    self._check_input(x)
    y, new_stats = batch_renorm(
      x,
      self._stats(state),
      self.weight,
      self.bias,
      r_max=self.r_max if r_max is None else r_max,
      d_max=self.d_max if d_max is None else d_max,
      deterministic=inference,
      momentum=self.momentum,
      epsilon=self.eps,
      axis=self.axis,
      axis_name=self.axis_name,
      unbiased_running_var=self.unbiased_running_var,
      mask=mask,
      dtype=self._out_dtype(x),
      force_float32_reductions=self.force_float32_reductions,
    )
    return y, self._updated(state, new_stats, inference)
