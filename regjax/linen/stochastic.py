"""Linen wrappers of the noise ops, drop-in for ``flax.linen.Dropout``.

Unlike flax, a module in train mode with no ``rng_collection`` stream raises
instead of silently drawing its mask from the ``'params'`` stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from regjax import stochastic as F
from regjax._checks import check_deterministic, is_concretely


def noise_key(module: nn.Module, deterministic: bool, rng, trivial: bool):
  """The key for a train-mode draw, or None where no draw is made.

  ``deterministic`` is checked first (a traced value raises regjax's
  ``TypeError``, not jax's ``TracerBoolConversionError``).
  """
  deterministic = check_deterministic(deterministic, f"regjax.linen.{type(module).__name__}")
  if deterministic or trivial:
    return None
  if rng is not None:
    return rng
  if not module.has_rng(module.rng_collection):
    raise ValueError(
        f"{type(module).__name__} in train mode (deterministic=False) needs the "
        f"'{module.rng_collection}' PRNG stream: pass "
        f"`rngs={{'{module.rng_collection}': key}}` to init/apply or `rng=key` at the "
        "call, or set deterministic=True. (regjax never falls back to the 'params' "
        "stream, which would reuse initialization randomness as noise.)")
  return module.make_rng(module.rng_collection)


class Dropout(nn.Module):
  """Inverted dropout; see :func:`regjax.dropout`. Same fields as ``flax.linen.Dropout``.

  Attributes:
    rate: probability of dropping a unit (not the keep rate).
    broadcast_dims: axes that share one mask.
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``, the same mask as ``flax.linen.Dropout``); see
      :func:`regjax.dropout`.
  """

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: str = "hash"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    key = noise_key(self, deterministic, rng, is_concretely(self.rate, 0.0, 1.0))
    return F.dropout(inputs, self.rate, key=key, deterministic=deterministic,
                     broadcast_dims=self.broadcast_dims, rng_impl=self.rng_impl)


class GaussianDropout(nn.Module):
  """Multiplicative N(1, rate/(1-rate)) noise; see :func:`regjax.gaussian_dropout`."""

  rate: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: str = "hash"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    key = noise_key(self, deterministic, rng, is_concretely(self.rate, 0.0))
    return F.gaussian_dropout(inputs, self.rate, key=key, deterministic=deterministic,
                              broadcast_dims=self.broadcast_dims, rng_impl=self.rng_impl)


class Uout(nn.Module):
  """Uniform multiplicative noise ``x * (1 + U(-beta, beta))``; see :func:`regjax.uout`."""

  beta: float
  broadcast_dims: Sequence[int] = ()
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: str = "hash"

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None,
               rng: jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    key = noise_key(self, deterministic, rng, is_concretely(self.beta, 0.0))
    return F.uout(inputs, self.beta, key=key, deterministic=deterministic,
                  broadcast_dims=self.broadcast_dims, rng_impl=self.rng_impl)
