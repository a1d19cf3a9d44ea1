"""Equinox module of :func:`regjax.dropconnect_dense`: a drop-in ``equinox.nn.Linear``.

``DropConnect`` takes ``eqx.nn.Linear``'s constructor arguments and has its
parameters: ``weight`` of shape ``(out_features, in_features)`` and ``bias``
of shape ``(out_features,)``, initialised by ``eqx.nn.Linear`` itself from the
same key, so the two hold the same values and a ``Linear`` can be swapped for
a ``DropConnect`` (``eqx.tree_at``) keeping its trained parameters. Inference
mode computes ``Linear``'s ``weight @ x + bias``.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from regjax import _specs
from regjax import weights as F
from regjax._types import RngImpl
from regjax.equinox._common import check_init, noise_key, resolve_inference


class DropConnect(eqx.Module):
  """``eqx.nn.Linear`` with DropConnect on its weight (Wan et al. 2013).

  Training: ``y = (W * M) @ x / (1 - rate) + b`` with one Bernoulli mask ``M``
  of the weight's shape per call (per example when called per example under
  ``jax.vmap`` with a key per example, as Wan et al.; one for the batch when
  called on a batch ``(..., in_features)``); inference: ``W @ x + b``. See
  :func:`regjax.dropconnect_dense` (its ``kernel`` is ``weight.T``).

  Attributes:
    weight, bias, in_features, out_features, use_bias: as in ``eqx.nn.Linear``.
    rate: probability of dropping a weight, in ``[0, 1]`` (default 0.5).
    inference: inference mode if True; overridden at call.
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  weight: jax.Array
  bias: jax.Array | None
  rate: float | jax.Array
  inference: bool
  in_features: int = eqx.field(static=True)
  out_features: int = eqx.field(static=True)
  use_bias: bool = eqx.field(static=True)
  rng_impl: RngImpl = eqx.field(static=True)

  def __init__(
    self,
    in_features: int,
    out_features: int,
    use_bias: bool = True,
    dtype: Any = None,
    *,
    key: jax.Array,
    rate: float | jax.Array = 0.5,
    inference: bool = False,
    rng_impl: RngImpl = "hash",
  ):
    for name, value in (("in_features", in_features), ("out_features", out_features)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(
          f"regjax.equinox.DropConnect: `{name}` must be a positive int (equinox's "
          f"'scalar' features are not supported); got {value!r}."
        )
    linear = eqx.nn.Linear(in_features, out_features, use_bias, dtype, key=key)
    self.weight = linear.weight
    self.bias = linear.bias
    self.rate = rate
    self.inference = inference
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.rng_impl = rng_impl

  def __check_init__(self):
    check_init(self, _specs.DROPCONNECT, self.rate)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """``weight @ x + bias`` with a dropped-out weight in training mode.

    Args:
      x: ``(in_features,)`` (``eqx.nn.Linear``'s input), or ``(..., in_features)``.
      key: PRNG key, required in training mode unless ``rate`` is 0 or 1.
      inference: overrides the field if given.
    """
    inference = resolve_inference(self, inference)
    key = noise_key(self, inference, key, _specs.DROPCONNECT.needs_no_draw(self.rate))
    return F.dropconnect_dense(
      x,
      self.weight.T,
      self.bias,
      self.rate,
      key=key,
      deterministic=inference,
      rng_impl=self.rng_impl,
    )
