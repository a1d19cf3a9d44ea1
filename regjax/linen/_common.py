"""What every regjax linen noise module shares: its mode and its key.

A module's fields are its own (they are ``flax.linen.Dropout``'s, so that it
is a drop-in); its ``__call__`` hands the op, the op's strength spec
(:mod:`regjax._specs`) and its arguments to :func:`apply_noise`.

Unlike flax, a module in train mode with no ``rng_collection`` stream raises
instead of silently drawing its noise from the ``'params'`` stream.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
from jax.typing import ArrayLike

from regjax import _specs
from regjax._checks import check_deterministic


def noise_key(module: nn.Module, deterministic: bool, rng, trivial: bool):
  """The key for a train-mode draw, or None where no draw is made.

  ``deterministic`` is checked first (a traced value raises regjax's
  ``TypeError``, not jax's ``TracerBoolConversionError``); ``trivial`` says
  that the op's strength needs no draw (:meth:`regjax._specs.Strength.needs_no_draw`).
  """
  deterministic = check_deterministic(deterministic, f"regjax.linen.{type(module).__name__}")
  if deterministic or trivial:
    return None
  if rng is not None:
    return rng
  collection = module.rng_collection
  if not module.has_rng(collection):
    raise ValueError(
      f"{type(module).__name__} in train mode (deterministic=False) needs the "
      f"'{collection}' PRNG stream: pass "
      f"`rngs={{'{collection}': key}}` to init/apply or `rng=key` at the "
      "call, or set deterministic=True. (regjax never falls back to the 'params' "
      "stream, which would reuse initialization randomness as noise.)"
    )
  return module.make_rng(collection)


def apply_noise(
  module: nn.Module,
  op: Callable[..., jax.Array],
  spec: _specs.Strength,
  strength,
  inputs: ArrayLike,
  deterministic: bool | None,
  rng: jax.Array | None,
  **kwargs,
) -> jax.Array:
  """``op(inputs, strength, key=..., deterministic=..., **kwargs)`` for ``module``.

  ``deterministic`` is the call's value merged with the field, as in
  ``flax.linen.Dropout``; the key is ``rng`` or drawn from the module's
  ``rng_collection``, and none is asked for where ``spec`` says the strength
  needs no draw.
  """
  deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
  key = noise_key(module, deterministic, rng, spec.needs_no_draw(strength))
  return op(inputs, strength, key=key, deterministic=deterministic, **kwargs)
