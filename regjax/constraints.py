"""Weight constraints: projections applied to the params after each optimizer step.

::

    max_norm(c)  w_j <- w_j * min(1, c / ||w_j||) for each unit j    Srivastava et al. 2014, §5.1

``max_norm`` acts on a params pytree, not in the forward pass;
:func:`max_norm_projection` is the same as an optax transformation.
(:mod:`regjax.weights` re-exports these names.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import jax.numpy as jnp

from regjax import _checks, _noise

if TYPE_CHECKING:
  import optax

_Params = TypeVar("_Params")

__all__ = ["max_norm", "max_norm_projection", "default_max_norm_filter"]


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


def default_max_norm_filter(path: tuple[str, ...], leaf: Any) -> bool:
  """Selects the leaves named ``'kernel'`` with ``ndim >= 2`` (flax Dense/Conv kernels)."""
  return bool(path) and path[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2


def _check_max_value(max_value, op):
  """The radius: a concrete one in ``(0, inf)`` (a Python float), or a traced scalar."""
  return _checks.check_rate(
    max_value, op, "max_value", low=0.0, high=math.inf, low_inclusive=False, high_inclusive=False
  )


def selection(params, filter, op):
  """A pytree of bools: which leaves of params `filter` selects (max_norm, the penalties)."""
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
  axes = (
    tuple(range(w.ndim - 1)) if axis is None else _checks.canonical_axes(axis, w.ndim, op, "axis")
  )
  if not axes:
    raise ValueError(
      f"{op}: params leaf {name} of shape {w.shape} has no axis to take norms over; "
      "a scalar or vector has no per-unit weight vectors."
    )
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
  params: _Params,
  max_value: float | jax.Array,
  *,
  axis: int | tuple[int, ...] | None = None,
  filter: Callable[[tuple[str, ...], Any], bool] | None = None,
) -> _Params:
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
  selected = selection(params, filter, op)

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
) -> optax.GradientTransformation:
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
        f"{op}: the update needs the current params: call `tx.update(grads, opt_state, params)`."
      )
    selected = selection(params, filter, op)

    def project(path, update, param, chosen):
      if not chosen:
        return update
      new = optax.apply_updates(param, update)
      target = _project(new, max_value, axis, op, "/".join(_path_names(path)))
      return (target - param).astype(update.dtype)

    return jax.tree_util.tree_map_with_path(project, updates, params, selected), state

  return optax.GradientTransformation(init_fn, update_fn)
