"""Each noise op's strength argument: its name, its range, the values that need no draw.

One :class:`Strength` per op, used by the op itself (to check the argument
and to return early) and by its linen and NNX modules (to skip asking for a
key, and, in NNX, to check the argument at construction), so that each bound
and each trivial value is written once::

    op                                         strength  range      no draw (concrete)
    dropout, channel_dropout, drop_path,       rate      [0, 1]     0 (x), 1 (zeros)
      dropconnect_dense, alpha_dropout
    gaussian_dropout                           rate      [0, 1)     0 (x)
    uout                                       beta      [0, inf)   0 (x)
    gaussian_noise                             stddev    [0, inf)   0 (x)
    dropblock                                  rate      [0, 1]     0 (x)
    cutout                                     size      [0, side]  0 (x)
    cutout, random_erasing                     probability [0, 1]   0 (x)
    join_drop_path (local mode)                rate      [0, 1]     0 (mean of the branches)

Eval mode (``deterministic=True``) needs no draw for every op. DropBlock at
rate 1 still draws (its seeds are ``Bernoulli(gamma)`` with ``gamma <= 1``),
and alpha dropout at rate 1 returns zeros, as dropout does. Cutout's upper
bound is the image's side, which only the input gives: the op checks it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from regjax import _checks


@dataclasses.dataclass(frozen=True)
class Strength:
  """A strength argument (rate, beta, stddev, size) of one op.

  Attributes:
    name: the argument's name, as in the op's signature and its errors.
    low, high: the accepted range of a concrete value.
    high_inclusive: whether ``high`` itself is accepted.
    identity_at: concrete values at which the op returns ``x`` without a draw.
    zeros_at: concrete values at which it returns zeros without a draw.
  """

  name: str
  low: float
  high: float
  high_inclusive: bool
  identity_at: tuple[float, ...] = (0.0,)
  zeros_at: tuple[float, ...] = ()

  def check(self, value, op: str, name: str | None = None) -> float | jax.Array:
    """:func:`regjax._checks.check_rate` with this range: a Python float, or the traced value.

    ``name`` replaces :attr:`name` in errors, for an argument bounded alike
    (``drop_path_rates``' ``max_rate`` has drop path's range).
    """
    return _checks.check_rate(
      value, op, name or self.name, low=self.low, high=self.high, high_inclusive=self.high_inclusive
    )

  def needs_no_draw(self, value) -> bool:
    """Whether ``value`` is concretely one at which the op makes no draw (and needs no key)."""
    return _checks.is_concretely(value, *self.identity_at, *self.zeros_at)

  def result_without_draw(self, x: jax.Array, value, deterministic: bool) -> jax.Array | None:
    """The op's result where no draw is needed (eval mode or a trivial value), else None.

    ``value`` is the checked strength (:meth:`check`).
    """
    if deterministic or _checks.is_concretely(value, *self.identity_at):
      return x
    if _checks.is_concretely(value, *self.zeros_at):
      return jnp.zeros_like(x)
    return None


_DROP_RATE = Strength("rate", 0.0, 1.0, high_inclusive=True, zeros_at=(1.0,))

DROPOUT = _DROP_RATE
CHANNEL_DROPOUT = _DROP_RATE  # dropout with the spatial axes broadcast
DROP_PATH = _DROP_RATE  # dropout with every axis but the batch axis broadcast
DROPCONNECT = _DROP_RATE  # dropout of the kernel
ALPHA_DROPOUT = _DROP_RATE
GAUSSIAN_DROPOUT = Strength("rate", 0.0, 1.0, high_inclusive=False)
UOUT = Strength("beta", 0.0, math.inf, high_inclusive=False)
GAUSSIAN_NOISE = Strength("stddev", 0.0, math.inf, high_inclusive=False)
DROPBLOCK = Strength("rate", 0.0, 1.0, high_inclusive=True)
# ``high`` is the image's side, checked by the op (see the module docstring).
CUTOUT = Strength("size", 0.0, math.inf, high_inclusive=True)
# The probability that an image is augmented at all (cutout's second strength).
PROBABILITY = Strength("probability", 0.0, 1.0, high_inclusive=True)
RANDOM_ERASING = PROBABILITY
# The join is a mean, not x: join_drop_path makes its own no-draw cases (rate 0
# only in local mode), so only the range is used here.
JOIN_DROP_PATH = Strength("rate", 0.0, 1.0, high_inclusive=True, identity_at=())
