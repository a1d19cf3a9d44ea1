"""NNX wrappers of :mod:`regjax.structured`: channel dropout, drop path, DropBlock, cutout.

Constructor and call follow ``flax.nnx.Dropout`` (see :mod:`regjax.nnx.stochastic`);
a train-mode module never draws from a stream other than its ``rng_collection``.
Arguments other than the rate and ``rng_impl`` are checked by the function at
call.
"""

from __future__ import annotations

import jax
from flax import nnx

from regjax import _checks
from regjax import structured as F
from regjax._noise import check_rng_impl
from regjax.nnx._common import NoiseModule, RngsArg


def _check_rate(rate, name):
  _checks.check_rate(rate, f"regjax.nnx.{name}", "rate", low=0.0, high=1.0,
                     high_inclusive=True)


class ChannelDropout(NoiseModule):
  """Drops whole channels (one draw per sample and channel); see :func:`regjax.channel_dropout`.

  Keras ``SpatialDropout1D/2D/3D``, torch ``Dropout1d/2d/3d``.

  Args:
    rate: probability of dropping a channel, in ``[0, 1]``.
    channel_axis: the channel axis (-1, channels-last, by default; 1 for
      channels-first).
    deterministic: eval mode if True; switched by ``model.train()`` /
      ``model.eval()`` / ``nnx.view``; a value given at call takes precedence.
    rng_collection: the ``nnx.Rngs`` stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
    rngs: an ``nnx.Rngs`` with a ``rng_collection`` stream, an
      ``nnx.RngStream``, or None (then a key must be given at call).
  """

  def __init__(self, rate: float, *, channel_axis: int = -1,
               deterministic: bool | None = False, rng_collection: str = "dropout",
               rng_impl: str = "hash", rngs: nnx.Rngs | nnx.RngStream | None = None):
    _check_rate(rate, "ChannelDropout")
    self.rate = rate
    self.channel_axis = channel_axis
    self.rng_impl = check_rng_impl(rng_impl, f"regjax.nnx.{type(self).__name__}")
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: RngsArg = None) -> jax.Array:
    """Applies channel dropout; ``rngs`` (a key, stream or Rngs) overrides the kept stream."""
    deterministic = self._deterministic(deterministic)
    key = self._key(deterministic, rngs, _checks.is_concretely(self.rate, 0.0, 1.0))
    return F.channel_dropout(inputs, self.rate, key=key, deterministic=deterministic,
                             channel_axis=self.channel_axis, rng_impl=self.rng_impl)


class DropPath(NoiseModule):
  """Stochastic depth on a residual branch; see :func:`regjax.drop_path` (timm ``DropPath``).

  Use as ``x + self.drop_path(self.branch(x))``; :func:`regjax.drop_path_rates`
  gives the per-block rates.

  Args:
    rate: probability of dropping the branch, in ``[0, 1]``.
    mode: ``'row'`` (one draw per sample) or ``'batch'`` (one for the batch).
    deterministic, rng_collection, rng_impl, rngs: as in :class:`ChannelDropout`.
  """

  def __init__(self, rate: float, *, mode: str = "row", deterministic: bool | None = False,
               rng_collection: str = "dropout", rng_impl: str = "hash",
               rngs: nnx.Rngs | nnx.RngStream | None = None):
    _check_rate(rate, "DropPath")
    self.rate = rate
    self.mode = mode
    self.rng_impl = check_rng_impl(rng_impl, f"regjax.nnx.{type(self).__name__}")
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: RngsArg = None) -> jax.Array:
    """Drops the branch per sample (or batch); ``rngs`` overrides the kept stream."""
    deterministic = self._deterministic(deterministic)
    key = self._key(deterministic, rngs, _checks.is_concretely(self.rate, 0.0, 1.0))
    return F.drop_path(inputs, self.rate, key=key, deterministic=deterministic, mode=self.mode,
                       rng_impl=self.rng_impl)


class DropBlock(NoiseModule):
  """Drops contiguous ``block_size x block_size`` regions; see :func:`regjax.dropblock`.

  Args:
    rate: nominal drop rate, in ``[0, 1]``. To ramp it with
      :func:`regjax.dropblock_rate_schedule`, construct with a JAX scalar
      (``DropBlock(jnp.float32(0.0))``) and assign ``module.rate =
      jnp.float32(r)`` between steps: the rate is then pytree data, traced
      under ``nnx.jit``, and one compilation serves the whole schedule.
    block_size: side of the square blocks.
    share_channels: one mask per sample, shared by its channels.
    data_format: ``'NHWC'`` or ``'NCHW'``.
    deterministic, rng_collection: as in :class:`ChannelDropout`.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropblock`.
    rngs: as in :class:`ChannelDropout`.
  """

  def __init__(self, rate: float, *, block_size: int = 7, share_channels: bool = False,
               data_format: str = "NHWC", deterministic: bool | None = False,
               rng_collection: str = "dropout", rng_impl: str = "hash",
               rngs: nnx.Rngs | nnx.RngStream | None = None):
    _check_rate(rate, "DropBlock")
    self.rate = rate
    self.block_size = block_size
    self.share_channels = share_channels
    self.data_format = data_format
    self.rng_impl = check_rng_impl(rng_impl, f"regjax.nnx.{type(self).__name__}")
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: RngsArg = None) -> jax.Array:
    """Applies DropBlock; ``rngs`` overrides the kept stream."""
    deterministic = self._deterministic(deterministic)
    key = self._key(deterministic, rngs, _checks.is_concretely(self.rate, 0.0))
    return F.dropblock(inputs, self.rate, key=key, deterministic=deterministic,
                       block_size=self.block_size, share_channels=self.share_channels,
                       data_format=self.data_format, rng_impl=self.rng_impl)


class Cutout(NoiseModule):
  """Zeroes one ``size x size`` square per image (inputs only); see :func:`regjax.cutout`.

  Args:
    size: side of the square (0 returns the input).
    data_format: ``'NHWC'`` or ``'NCHW'``.
    deterministic, rng_collection, rngs: as in :class:`ChannelDropout`.
  """

  def __init__(self, size: int, *, data_format: str = "NHWC",
               deterministic: bool | None = False, rng_collection: str = "dropout",
               rngs: nnx.Rngs | nnx.RngStream | None = None):
    self.size = size
    self.data_format = data_format
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: RngsArg = None) -> jax.Array:
    """Applies cutout; ``rngs`` overrides the kept stream."""
    deterministic = self._deterministic(deterministic)
    key = self._key(deterministic, rngs, _checks.is_concretely(self.size, 0))
    return F.cutout(inputs, self.size, key=key, deterministic=deterministic,
                    data_format=self.data_format)
