"""Regularizers that act on weights, not activations: DropConnect (and max-norm).

::

    dropconnect_dense  y = x @ (W * M) / (1 - rate) + b, M ~ Bernoulli(1 - rate)  Wan et al. 2013

DropConnect follows the common contract of :mod:`regjax.stochastic`.
``max_norm``, ``max_norm_projection`` and ``default_max_norm_filter`` live in
:mod:`regjax.constraints` (projections of the params after an optimizer step,
not ops in the forward pass) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import jax
import jax.numpy as jnp
from jax.lax import PrecisionLike
from jax.typing import ArrayLike

from regjax import _checks, _noise, _specs
from regjax._types import RngImpl
from regjax.constraints import default_max_norm_filter, max_norm, max_norm_projection
from regjax.stochastic import dropout

__all__ = ["dropconnect_dense", "max_norm", "max_norm_projection", "default_max_norm_filter"]


def dropconnect_dense(
  x: ArrayLike,
  kernel: ArrayLike,
  bias: ArrayLike | None,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  precision: PrecisionLike = None,
  dot_general: Callable[..., jax.Array] | None = None,
  rng_impl: RngImpl = "hash",
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
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  kernel = cast(jax.Array, kernel)  # typing only (a no-op); checked below
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
      f"{kernel.shape} for x {x.shape}."
    )
  if bias is not None and getattr(bias, "shape", None) != (kernel.shape[1],):
    raise ValueError(
      f"{op}: `bias` must have shape ({kernel.shape[1]},) or be None; got "
      f"{getattr(bias, 'shape', type(bias).__name__)}."
    )
  rate = _specs.DROPCONNECT.check(rate, op)
  if not deterministic and not _specs.DROPCONNECT.needs_no_draw(rate):
    _checks.check_key(key, op)
  # dropout() returns the kernel itself in eval or at rate 0 (and zeros at 1),
  # so eval is bit-for-bit flax.linen.Dense.
  kernel = dropout(kernel, rate, key=key, deterministic=deterministic, rng_impl=rng_impl)
  dot_general = jax.lax.dot_general if dot_general is None else dot_general
  y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y
