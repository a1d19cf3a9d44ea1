"""Regularizers that act on weights, not activations: DropConnect and max-norm.

::

    dropconnect_dense  y = x @ (W * M) / (1 - rate) + b, M ~ Bernoulli(1 - rate)  Wan et al. 2013
    max_norm           w_j <- w_j * min(1, c / ||w_j||) for each unit j           Srivastava 2014

DropConnect follows the common contract of :mod:`regjax.stochastic`.
``max_norm`` is a projection applied to a params pytree after each optimizer
step, not an op in the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from regjax import _checks, _noise
from regjax.stochastic import dropout

__all__ = ["dropconnect_dense", "max_norm", "max_norm_projection", "default_max_norm_filter"]


def dropconnect_dense(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    rate: float | jax.Array,
    *,
    key: jax.Array | None = None,
    deterministic: bool = False,
    precision: Any = None,
    dot_general: Callable[..., jax.Array] | None = None,
    rng_impl: str = "hash",
) -> jax.Array:
  """A dense layer with DropConnect on its kernel (Wan et al. 2013, ICML).

  Train mode: ``y = x @ (W * M) / (1 - rate) + b``, ``M ~ Bernoulli(1 - rate)``
  of the kernel's shape: weights are dropped, not activations, and the bias is
  never dropped. ``M`` is the mask ``regjax.dropout(W, rate, key=key,
  rng_impl=rng_impl)`` draws. Eval mode:
  ``y = x @ W + b``, computed exactly as ``flax.linen.Dense`` does.

  One mask is drawn per call and shared by the whole batch, the usual
  implementation (Wan et al. draw one per example; do that with ``jax.vmap``
  over ``x`` and a batch of keys). The inverted scaling keeps ``E[y]`` equal
  to the eval output, so eval needs no approximation; Wan et al. instead
  train unscaled and use a Gaussian moment-matching approximation at test time.

  Args:
    x: floating-point array ``(..., in)``.
    kernel: floating-point ``(in, out)`` array.
    bias: ``(out,)`` array, or None.
    rate: probability of dropping a weight, in ``[0, 1]``; ``rate == 1``
      returns ``b`` (zeros without bias). A traced rate is clipped to ``[0, 1]``;
      a traced NaN or +-inf drops no weight.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, no weight is dropped.
    precision: passed to ``dot_general``, as in ``flax.linen.Dense``.
    dot_general: the contraction (default ``jax.lax.dot_general``).
    rng_impl: ``'hash'`` (default) or ``'jax'``, as in :func:`regjax.dropout`.

  Returns:
    ``(..., out)``, in the dtype ``x @ kernel + bias`` has.
  """
  op = "regjax.dropconnect_dense"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  _checks.check_floating(x, op)
  _checks.check_floating(kernel, op, "kernel")
  deterministic = _checks.check_deterministic(deterministic, op)
  if key is not None:
    _checks.check_key(key, op)
  if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(
        f"{op}: `kernel` must have shape (in, out) with in = x.shape[-1]; got kernel "
        f"{kernel.shape} for x {x.shape}.")
  if bias is not None and getattr(bias, "shape", None) != (kernel.shape[1],):
    raise ValueError(
        f"{op}: `bias` must have shape ({kernel.shape[1]},) or be None; got "
        f"{getattr(bias, 'shape', type(bias).__name__)}.")
  rate = _checks.check_rate(rate, op, "rate", low=0.0, high=1.0, high_inclusive=True)
  if not deterministic and not (
      not _checks.is_traced(rate) and rate in (0.0, 1.0)):
    _checks.check_key(key, op)
  # dropout() returns the kernel itself in eval or at rate 0 (and zeros at 1),
  # so eval is bit-for-bit flax.linen.Dense.
  kernel = dropout(kernel, rate, key=key, deterministic=deterministic, rng_impl=rng_impl)
  dot_general = jax.lax.dot_general if dot_general is None else dot_general
  y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


def _path_names(path) -> tuple[str, ...]:
  names = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        names.append(str(getattr(entry, attr)))
        break
    else:
      names.append(str(entry))
  return tuple(names)


def default_max_norm_filter(path: tuple[str, ...], leaf) -> bool:
  """Selects the leaves named ``'kernel'`` with ``ndim >= 2`` (flax Dense/Conv kernels)."""
  return bool(path) and path[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2


def _check_max_value(max_value, op):
  out_of_range = ValueError(f"{op}: `max_value` must be in (0, inf); got {max_value!r}.")
  try:
    value = _checks.check_rate(max_value, op, "max_value", low=0.0, high=math.inf,
                               high_inclusive=False)
  except ValueError as error:
    if "must be in" in str(error):  # NaN, negative or infinite: state the open range
      raise out_of_range from None
    raise
  if not _checks.is_traced(value) and value == 0:
    raise out_of_range
  return value


def _selected(params, filter, op):
  """A pytree of bools: which leaves of params the projection touches."""
  filter = default_max_norm_filter if filter is None else filter
  if not callable(filter):
    raise TypeError(f"{op}: `filter` must be a callable (path, leaf) -> bool; got {filter!r}.")

  def select(path, leaf):
    names = _path_names(path)
    chosen = bool(filter(names, leaf))
    if chosen:
      _checks.check_floating(leaf, op, f"params leaf {'/'.join(names)}")
    return chosen

  return jax.tree_util.tree_map_with_path(select, params)


def _project(w, max_value, axis, op, name):
  axes = tuple(range(w.ndim - 1)) if axis is None else _checks.canonical_axes(
      axis, w.ndim, op, "axis")
  if not axes:
    raise ValueError(
        f"{op}: params leaf {name} of shape {w.shape} has no axis to take norms over; "
        "a scalar or vector has no per-unit weight vectors.")
  compute_dtype = _noise.compute_dtype(w.dtype)
  wc = w.astype(compute_dtype)
  norm = jnp.sqrt(jnp.sum(wc * wc, axis=axes, keepdims=True))
  c = jnp.maximum(jnp.asarray(max_value, compute_dtype), 0.0)
  outside = norm > c
  # Vectors inside the ball are returned bit-for-bit (factor exactly 1, unlike
  # Keras' c / (eps + norm)); the inner where keeps c / norm finite everywhere.
  factor = jnp.where(outside, c / jnp.where(outside, norm, 1.0), 1.0)
  return (wc * factor).astype(w.dtype)


def max_norm(
    params,
    max_value: float | jax.Array,
    *,
    axis: int | tuple[int, ...] | None = None,
    filter: Callable[[tuple[str, ...], Any], bool] | None = None,
):
  """Max-norm weight constraint (Srivastava et al. 2014, §5.1; Keras ``MaxNorm``).

  Projects each unit's incoming weight vector ``w_j`` onto the L2 ball of
  radius ``c = max_value``: ``w_j <- w_j * min(1, c / ||w_j||)``. Vectors
  already inside the ball are returned unchanged (bit for bit). Call it on
  the params right after each optimizer step::

      params = optax.apply_updates(params, updates)
      params = regjax.max_norm(params, 3.0)

  or chain :func:`max_norm_projection` into the optimizer. (optax's
  ``optax.projections.projection_l2_ball`` projects the whole pytree onto one
  ball, not each unit.)

  Args:
    params: a pytree of arrays (e.g. flax ``variables['params']``).
    max_value: the radius ``c > 0`` (Srivastava et al. used 3 to 4). A traced
      value is clipped below at 0.
    axis: the axes a unit's incoming vector spans. None (default): every axis
      but the last, i.e. axis 0 of a Dense kernel ``(in, out)`` and axes
      ``(0, 1, 2)`` of a Conv kernel ``(kh, kw, in, out)``: one norm per output
      unit. (Keras defaults to ``axis=0``, which for a conv kernel gives one
      norm per kernel position instead.)
    filter: ``filter(path, leaf) -> bool`` chooses the leaves to project;
      ``path`` is the tuple of key names, e.g. ``('Dense_0', 'kernel')``.
      Default :func:`default_max_norm_filter`: leaves named ``'kernel'`` with
      ``ndim >= 2`` (biases, BatchNorm scales and embeddings' ``'embedding'``
      are left alone).

  Returns:
    A pytree like ``params``; unselected leaves are the same objects. The
    bound holds up to one rounding of the leaf's dtype (about ``2**-8``
    relative for bfloat16).
  """
  op = "regjax.max_norm"
  max_value = _check_max_value(max_value, op)
  selected = _selected(params, filter, op)

  def apply(path, leaf, chosen):
    if not chosen:
      return leaf
    return _project(leaf, max_value, axis, op, "/".join(_path_names(path)))

  return jax.tree_util.tree_map_with_path(apply, params, selected)


def max_norm_projection(
    max_value: float | jax.Array,
    *,
    axis: int | tuple[int, ...] | None = None,
    filter: Callable[[tuple[str, ...], Any], bool] | None = None,
):
  """:func:`max_norm` as an ``optax.GradientTransformation``; chain it last.

  ::

      tx = optax.chain(optax.adam(1e-3), regjax.max_norm_projection(3.0))
      updates, opt_state = tx.update(grads, opt_state, params)   # params required
      params = optax.apply_updates(params, updates)

  For the selected leaves it returns ``max_norm(params + u) - params``, so
  that ``apply_updates`` lands on the projected weights; other leaves' updates
  pass through unchanged. The final addition rounds once more, so the bound
  holds to about one ulp of the params' dtype; call :func:`max_norm` after
  ``apply_updates`` instead where it must hold exactly.
  """
  import optax  # imported here so that `import regjax` stays light

  op = "regjax.max_norm_projection"
  max_value = _check_max_value(max_value, op)
  if filter is not None and not callable(filter):
    raise TypeError(f"{op}: `filter` must be a callable (path, leaf) -> bool; got {filter!r}.")

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          f"{op}: the update needs the current params: call "
          "`tx.update(grads, opt_state, params)`.")
    selected = _selected(params, filter, op)

    def project(path, update, param, chosen):
      if not chosen:
        return update
      new = optax.apply_updates(param, update)
      target = _project(new, max_value, axis, op, "/".join(_path_names(path)))
      return (target - param).astype(update.dtype)

    return jax.tree_util.tree_map_with_path(project, updates, params, selected), state

  return optax.GradientTransformation(init_fn, update_fn)
