"""L1 and L2 weight penalties: terms to add to the loss.

::

    l1_penalty(params)  sum |w|         over the selected leaves  (lasso; Tibshirani 1996)
    l2_penalty(params)  0.5 * sum w**2  over the selected leaves  (Krogh, Hertz 1992)

Add ``coeff * l2_penalty(params)`` (or ``l1_penalty``) to the loss. The leaves
are chosen as :func:`regjax.max_norm` chooses them: by default
:func:`regjax.default_max_norm_filter`, the Dense and Conv kernels, so biases,
BatchNorm scales and embeddings are not penalized.

L2 penalty and weight decay. With plain SGD, the gradient of ``coeff *
l2_penalty`` is ``coeff * w``, so a step on the penalized loss equals
``optax.chain(optax.add_decayed_weights(coeff, mask=...), optax.sgd(lr))`` on
the loss alone. With an adaptive optimizer (Adam, RMSProp) it does not: the
penalty's gradient is rescaled by the optimizer's per-parameter step size,
so large-gradient weights are decayed less. Decoupled weight decay
(Loshchilov & Hutter 2019, ICLR), ``optax.adamw(..., weight_decay=coeff,
mask=...)`` or ``optax.add_decayed_weights`` chained after the adaptive
transformation, is usually the better choice there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from regjax import _noise
from regjax.constraints import default_max_norm_filter, selection

__all__ = ["l1_penalty", "l2_penalty"]

Filter = Callable[[tuple[str, ...], Any], bool]


def _selected_leaves(params, filter, op: str) -> list[jax.Array]:
  selected = selection(params, filter, op)
  return [
    leaf
    for leaf, chosen in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(selected), strict=True
    )
    if chosen
  ]


@functools.partial(jax.jit, static_argnums=1)
def _sum_of(leaves: list[jax.Array], square: bool) -> jax.Array:
  """``sum |w|`` or ``sum w**2`` over ``leaves``, accumulated in at least float32.

  One compiled computation (per tree of shapes), as the ops are.
  """
  dtype = jnp.result_type(jnp.float32, *(_noise.compute_dtype(leaf.dtype) for leaf in leaves))
  total = jnp.zeros((), dtype)
  for leaf in leaves:
    w = leaf.astype(dtype)
    total = total + jnp.sum(w * w if square else jnp.abs(w))
  return total


def l1_penalty(params: Any, filter: Filter | None = default_max_norm_filter) -> jax.Array:
  """L1 penalty ``sum |w|`` over the selected leaves of ``params``.

  Add ``coeff * l1_penalty(params)`` to the loss (Keras'
  ``kernel_regularizer=L1(coeff)`` per layer). Its gradient is ``coeff *
  sign(w)`` (0 at ``w = 0``): with plain gradient steps weights hover around 0
  rather than becoming exactly 0, unlike a proximal step.

  Args:
    params: a pytree of arrays (e.g. flax ``variables['params']`` or
      ``nnx.state(model, nnx.Param)``).
    filter: ``filter(path, leaf) -> bool`` chooses the leaves, called as in
      :func:`regjax.max_norm` (``path`` the tuple of key names, e.g.
      ``('Dense_0', 'kernel')``). Default :func:`regjax.default_max_norm_filter`:
      leaves named ``'kernel'`` with ``ndim >= 2``; None means the default.

  Returns:
    A float32 scalar (float64 if a selected leaf is float64), differentiable;
    0 when no leaf is selected. float16/bfloat16 leaves are summed in float32.

  Raises:
    TypeError: ``filter`` is not callable, or a selected leaf is not floating.
  """
  return _sum_of(_selected_leaves(params, filter, "regjax.l1_penalty"), False)


def l2_penalty(params: Any, filter: Filter | None = default_max_norm_filter) -> jax.Array:
  """L2 penalty ``0.5 * sum w**2`` over the selected leaves of ``params``.

  Add ``coeff * l2_penalty(params)`` to the loss; its gradient is ``coeff * w``
  on the selected leaves and 0 elsewhere. (Keras' ``L2(l2)`` regularizer is
  ``l2 * sum w**2``: ``coeff = 2 * l2`` here.)

  With plain SGD this equals weight decay: ``optax.sgd(lr)`` on ``loss +
  coeff * l2_penalty(params)`` takes the same step as
  ``optax.chain(optax.add_decayed_weights(coeff, mask=...), optax.sgd(lr))`` on
  ``loss`` (``mask`` the same selection as a pytree of bools, as torch's SGD
  ``weight_decay``). With adaptive optimizers (Adam) an L2 penalty is not
  weight decay: its gradient is rescaled per parameter. ``optax.adamw`` /
  ``optax.add_decayed_weights`` after the adaptive transformation (decoupled
  weight decay, Loshchilov & Hutter 2019) is usually the better choice there.

  Args:
    params: a pytree of arrays.
    filter: as in :func:`l1_penalty`.

  Returns:
    A float32 scalar (float64 if a selected leaf is float64), differentiable;
    0 when no leaf is selected. float16/bfloat16 leaves are summed in float32.

  Raises:
    TypeError: ``filter`` is not callable, or a selected leaf is not floating.
  """
  return 0.5 * _sum_of(_selected_leaves(params, filter, "regjax.l2_penalty"), True)
