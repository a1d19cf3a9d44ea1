"""NNX wrappers of :mod:`regjax.structured`: channel dropout, drop path, DropBlock, cutout,
random erasing.

Constructor and call follow ``flax.nnx.Dropout`` (see :mod:`regjax.nnx.stochastic`);
a train-mode module never draws from a stream other than its ``rng_collection``.
Arguments other than the rate and ``rng_impl`` are checked by the function at
call.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.typing import ArrayLike

from regjax import _specs
from regjax import structured as F
from regjax._types import BlockDataFormat, DataFormat, DropPathMode, Fill, JoinMode, RngImpl
from regjax.nnx._common import NoiseModule, RngsArg, hashable


class ChannelDropout(NoiseModule):
  """Drops whole channels (one draw per sample and channel); see :func:`regjax.channel_dropout`.

  Keras ``SpatialDropout1D/2D/3D``, torch ``Dropout1d/2d/3d``.

  Args:
    rate: probability of dropping a channel, in ``[0, 1]``.
    channel_axis: the channel axis (-1, channels-last, by default; 1 for
      channels-first): an index, as ``BatchNorm``'s ``axis``, where
      :class:`DropBlock` and :class:`Cutout` take a ``data_format``; the other
      axes but 0 share one draw (``Dropout``'s ``broadcast_dims``).
    deterministic: eval mode if True; switched by ``model.train()`` /
      ``model.eval()`` / ``nnx.view``; a value given at call takes precedence.
    rng_collection: the ``nnx.Rngs`` stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
    rngs: an ``nnx.Rngs`` with a ``rng_collection`` stream, an
      ``nnx.RngStream``, or None (then a key must be given at call).
  """

  def __init__(
    self,
    rate: float | jax.Array,
    *,
    channel_axis: int = -1,
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.rate = self._strength(_specs.CHANNEL_DROPOUT, rate)
    self.channel_axis = channel_axis
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies channel dropout; ``rngs`` (a key, stream or Rngs) overrides the kept stream."""
    return self._call_noise(
      F.channel_dropout,
      _specs.CHANNEL_DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rngs,
      channel_axis=self.channel_axis,
      rng_impl=self.rng_impl,
    )


class DropPath(NoiseModule):
  """Stochastic depth on a residual branch; see :func:`regjax.drop_path` (timm ``DropPath``).

  Use as ``x + self.drop_path(self.branch(x))``; :func:`regjax.drop_path_rates`
  gives the per-block rates.

  Args:
    rate: probability of dropping the branch, in ``[0, 1]``.
    mode: ``'row'`` (one draw per sample) or ``'batch'`` (one for the batch).
    deterministic, rng_collection, rng_impl, rngs: as in :class:`ChannelDropout`.
  """

  def __init__(
    self,
    rate: float | jax.Array,
    *,
    mode: DropPathMode = "row",
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.rate = self._strength(_specs.DROP_PATH, rate)
    self.mode = mode
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Drops the branch per sample (or batch); ``rngs`` overrides the kept stream."""
    return self._call_noise(
      F.drop_path,
      _specs.DROP_PATH,
      self.rate,
      inputs,
      deterministic,
      rngs,
      mode=self.mode,
      rng_impl=self.rng_impl,
    )


class DropBlock(NoiseModule):
  """Drops contiguous ``block_size x block_size`` regions; see :func:`regjax.dropblock`.

  Rank-5 input (3-D maps, ``NDHWC`` or ``NCDHW``) drops ``block_size**3`` cubes
  (torchvision ``DropBlock3d``).

  Args:
    rate: nominal drop rate, in ``[0, 1]``. To ramp it (e.g. with
      ``optax.linear_schedule(0.0, final_rate, total_steps)``), construct with a JAX scalar
      (``DropBlock(jnp.float32(0.0))``) and assign ``module.rate =
      jnp.float32(r)`` between steps: the rate is then pytree data, traced
      under ``nnx.jit``, and one compilation serves the whole schedule.
    block_size: side of the square (3-D: cubic) blocks.
    share_channels: one mask per sample, shared by its channels.
    data_format: ``'NHWC'`` or ``'NCHW'`` (rank 5 also ``'NDHWC'``, ``'NCDHW'``): the layout, where
      :class:`ChannelDropout` takes a ``channel_axis`` (see :func:`regjax.dropblock`).
    deterministic, rng_collection: as in :class:`ChannelDropout`.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropblock`.
    rngs: as in :class:`ChannelDropout`.
  """

  def __init__(
    self,
    rate: float | jax.Array,
    *,
    block_size: int = 7,
    share_channels: bool = False,
    data_format: BlockDataFormat = "NHWC",
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.rate = self._strength(_specs.DROPBLOCK, rate)
    self.block_size = block_size
    self.share_channels = share_channels
    self.data_format = data_format
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies DropBlock; ``rngs`` overrides the kept stream."""
    return self._call_noise(
      F.dropblock,
      _specs.DROPBLOCK,
      self.rate,
      inputs,
      deterministic,
      rngs,
      block_size=self.block_size,
      share_channels=self.share_channels,
      data_format=self.data_format,
      rng_impl=self.rng_impl,
    )


class Cutout(NoiseModule):
  """Fills one ``size x size`` square per image (inputs only); see :func:`regjax.cutout`.

  Args:
    size: side of the square (0 returns the input).
    probability: probability that an image is cut out, in ``[0, 1]`` (1, every
      image, by default); a JAX scalar is traced under ``nnx.jit``, as
      :class:`DropBlock`'s rate.
    fill: the square's value (0 by default), or ``'random'`` (``N(0, 1)`` per element).
    data_format: ``'NHWC'`` or ``'NCHW'``.
    deterministic, rng_collection, rngs: as in :class:`ChannelDropout`.
  """

  def __init__(
    self,
    size: int,
    *,
    probability: float | jax.Array = 1.0,
    fill: Fill = 0.0,
    data_format: DataFormat = "NHWC",
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.size = size
    self.probability = self._strength(_specs.PROBABILITY, probability)
    self.fill = fill
    self.data_format = data_format
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies cutout; ``rngs`` overrides the kept stream."""
    deterministic = self._deterministic(deterministic)
    trivial = _specs.CUTOUT.needs_no_draw(self.size) or _specs.PROBABILITY.needs_no_draw(
      self.probability
    )
    key = self._key(deterministic, rngs, trivial)
    return F.cutout(
      inputs,
      self.size,
      key=key,
      deterministic=deterministic,
      probability=self.probability,
      fill=self.fill,
      data_format=self.data_format,
    )


class RandomErasing(NoiseModule):
  """Fills one random rectangle per image (inputs only); see :func:`regjax.random_erasing`.

  torchvision ``transforms.RandomErasing``, on a batch.

  Args:
    probability: probability that an image is erased, in ``[0, 1]`` (0.5 by
      default); a JAX scalar is traced under ``nnx.jit``, as :class:`DropBlock`'s rate.
    area: ``(low, high)``, the range of the erased fraction of the image.
    aspect: ``(low, high)``, the range of the rectangle's aspect ratio ``h / w``
      (drawn log-uniformly).
    fill: the rectangle's value (0 by default), or ``'random'`` (``N(0, 1)`` per element).
    data_format: ``'NHWC'`` or ``'NCHW'``.
    deterministic, rng_collection, rngs: as in :class:`ChannelDropout`.
  """

  def __init__(
    self,
    probability: float | jax.Array = 0.5,
    *,
    area: tuple[float, float] = (0.02, 0.33),
    aspect: tuple[float, float] = (0.3, 3.3),
    fill: Fill = 0.0,
    data_format: DataFormat = "NHWC",
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.probability = self._strength(_specs.RANDOM_ERASING, probability)
    self.area = hashable(area)
    self.aspect = hashable(aspect)
    self.fill = fill
    self.data_format = data_format
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, inputs: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Applies random erasing; ``rngs`` overrides the kept stream."""
    return self._call_noise(
      F.random_erasing,
      _specs.RANDOM_ERASING,
      self.probability,
      inputs,
      deterministic,
      rngs,
      area=self.area,
      aspect=self.aspect,
      fill=self.fill,
      data_format=self.data_format,
    )


class JoinDropPath(NoiseModule):
  """FractalNet's drop-path over a join; see :func:`regjax.join_drop_path`.

  Call it on the stacked branch outputs, shape ``(n_branches, batch, ...)``;
  it returns their join, the mean over the kept branches, shape ``(batch,
  ...)``. Eval: the mean of all branches.

  Args:
    rate: probability of dropping each branch (local mode), in ``[0, 1]``.
    mode: ``'local'`` (each branch dropped independently, at least one kept) or
      ``'global'`` (one uniform branch per sample; ``rate`` unused).
    deterministic, rng_collection, rng_impl, rngs: as in :class:`ChannelDropout`.
  """

  def __init__(
    self,
    rate: float | jax.Array,
    *,
    mode: JoinMode = "local",
    deterministic: bool | None = False,
    rng_collection: str = "dropout",
    rng_impl: RngImpl = "hash",
    rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    self.rate = self._strength(_specs.JOIN_DROP_PATH, rate)
    self.mode = mode
    self.rng_impl = self._rng_impl(rng_impl)
    self._init_noise(deterministic, rng_collection, rngs)

  def __call__(
    self, branches: ArrayLike, *, deterministic: bool | None = None, rngs: RngsArg = None
  ) -> jax.Array:
    """Joins the branches; ``rngs`` (a key, stream or Rngs) overrides the kept stream."""
    deterministic = self._deterministic(deterministic)
    trivial = F.join_needs_no_draw(branches, self.rate, self.mode)
    key = self._key(deterministic, rngs, trivial)
    return F.join_drop_path(
      branches,
      self.rate,
      key=key,
      mode=self.mode,
      deterministic=deterministic,
      rng_impl=self.rng_impl,
    )
