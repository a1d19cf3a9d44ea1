"""Linen wrappers of :mod:`regjax.structured`: channel dropout, drop path, DropBlock, cutout,
random erasing.

Like every regjax noise module, a module in train mode with no
``rng_collection`` stream raises instead of drawing from ``'params'``. A rate
that follows a schedule can be a traced value: build the module inside a
compact method from a traced argument (``DropBlock(rate)(x)``) and one
compilation serves the whole schedule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.typing import ArrayLike

from regjax import _specs
from regjax import structured as F
from regjax._types import BlockDataFormat, DataFormat, DropPathMode, Fill, JoinMode, RngImpl
from regjax.linen._common import apply_noise, noise_key


class ChannelDropout(nn.Module):
  """Drops whole channels (one draw per sample and channel); see :func:`regjax.channel_dropout`.

  Keras ``SpatialDropout1D/2D/3D``, torch ``Dropout1d/2d/3d``.

  Attributes:
    rate: probability of dropping a channel.
    channel_axis: the channel axis (-1, channels-last, by default; 1 for channels-first):
      an index, as ``BatchNorm``'s ``axis``, where :class:`DropBlock` and
      :class:`Cutout` take a ``data_format``; the other axes but 0 share one draw
      (``Dropout``'s ``broadcast_dims``).
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
  """

  rate: float
  channel_axis: int = -1
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.channel_dropout,
      _specs.CHANNEL_DROPOUT,
      self.rate,
      inputs,
      deterministic,
      rng,
      channel_axis=self.channel_axis,
      rng_impl=self.rng_impl,
    )


class DropPath(nn.Module):
  """Stochastic depth on a residual branch; see :func:`regjax.drop_path` (timm ``DropPath``).

  Use as ``x + DropPath(rate)(branch(x), deterministic=not train)``;
  :func:`regjax.drop_path_rates` gives the per-block rates.

  Attributes:
    rate: probability of dropping the branch.
    mode: ``'row'`` (one draw per sample) or ``'batch'`` (one for the batch).
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropout`.
  """

  rate: float
  mode: DropPathMode = "row"
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.drop_path,
      _specs.DROP_PATH,
      self.rate,
      inputs,
      deterministic,
      rng,
      mode=self.mode,
      rng_impl=self.rng_impl,
    )


class DropBlock(nn.Module):
  """Drops contiguous ``block_size x block_size`` regions; see :func:`regjax.dropblock`.

  Rank-5 input (3-D maps, ``NDHWC`` or ``NCDHW``) drops ``block_size**3`` cubes
  (torchvision ``DropBlock3d``).

  Attributes:
    rate: nominal drop rate (ramp it with e.g.
      ``optax.linear_schedule(0.0, final_rate, total_steps)``).
    block_size: side of the square (3-D: cubic) blocks.
    share_channels: one mask per sample, shared by its channels.
    data_format: ``'NHWC'`` or ``'NCHW'`` (rank 5 also ``'NDHWC'``, ``'NCDHW'``): the layout, where
      :class:`ChannelDropout` takes a ``channel_axis`` (see :func:`regjax.dropblock`).
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the mask is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.dropblock`.
  """

  rate: float
  block_size: int = 7
  share_channels: bool = False
  data_format: BlockDataFormat = "NHWC"
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.dropblock,
      _specs.DROPBLOCK,
      self.rate,
      inputs,
      deterministic,
      rng,
      block_size=self.block_size,
      share_channels=self.share_channels,
      data_format=self.data_format,
      rng_impl=self.rng_impl,
    )


class Cutout(nn.Module):
  """Fills one ``size x size`` square per image (inputs only); see :func:`regjax.cutout`.

  Attributes:
    size: side of the square.
    data_format: ``'NHWC'`` or ``'NCHW'``.
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the squares are drawn from.
    probability: probability that an image is cut out (1, every image, by default).
    fill: the square's value (0 by default), or ``'random'`` (``N(0, 1)`` per element).
  """

  size: int
  data_format: DataFormat = "NHWC"
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  # After the original fields, so that positional construction keeps its meaning.
  probability: float = 1.0
  fill: Fill = 0.0

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    trivial = _specs.CUTOUT.needs_no_draw(self.size) or _specs.PROBABILITY.needs_no_draw(
      self.probability
    )
    key = noise_key(self, deterministic, rng, trivial)
    return F.cutout(
      inputs,
      self.size,
      key=key,
      deterministic=deterministic,
      probability=self.probability,
      fill=self.fill,
      data_format=self.data_format,
    )


class RandomErasing(nn.Module):
  """Fills one random rectangle per image (inputs only); see :func:`regjax.random_erasing`.

  torchvision ``transforms.RandomErasing``, on a batch.

  Attributes:
    probability: probability that an image is erased (0.5 by default).
    area: ``(low, high)``, the range of the erased fraction of the image.
    aspect: ``(low, high)``, the range of the rectangle's aspect ratio ``h / w``
      (drawn log-uniformly).
    fill: the rectangle's value (0 by default), or ``'random'`` (``N(0, 1)`` per element).
    data_format: ``'NHWC'`` or ``'NCHW'``.
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the rectangles are drawn from.
  """

  probability: float = 0.5
  area: tuple[float, float] = (0.02, 0.33)
  aspect: tuple[float, float] = (0.3, 3.3)
  fill: Fill = 0.0
  data_format: DataFormat = "NHWC"
  deterministic: bool | None = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(
    self, inputs: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    return apply_noise(
      self,
      F.random_erasing,
      _specs.RANDOM_ERASING,
      self.probability,
      inputs,
      deterministic,
      rng,
      area=self.area,
      aspect=self.aspect,
      fill=self.fill,
      data_format=self.data_format,
    )


class JoinDropPath(nn.Module):
  """FractalNet's drop-path over a join; see :func:`regjax.join_drop_path`.

  Call it on the stacked branch outputs, shape ``(n_branches, batch, ...)``
  (``jnp.stack([col(x) for col in columns])``); it returns their join, the
  mean over the kept branches, shape ``(batch, ...)``. Eval: the mean of all.

  Attributes:
    rate: probability of dropping each branch (local mode).
    mode: ``'local'`` (each branch dropped independently, at least one kept) or
      ``'global'`` (one uniform branch per sample; ``rate`` unused).
    deterministic: eval mode if True; may be given at call instead.
    rng_collection: the PRNG stream the pattern is drawn from.
    rng_impl: ``'hash'`` (fused counter hash, default) or ``'jax'``
      (``jax.random``); see :func:`regjax.join_drop_path`.
  """

  rate: float
  mode: JoinMode = "local"
  deterministic: bool | None = None
  rng_collection: str = "dropout"
  rng_impl: RngImpl = "hash"

  @nn.compact
  def __call__(
    self, branches: ArrayLike, deterministic: bool | None = None, rng: jax.Array | None = None
  ) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    trivial = F.join_needs_no_draw(branches, self.rate, self.mode)
    key = noise_key(self, deterministic, rng, trivial)
    return F.join_drop_path(
      branches,
      self.rate,
      key=key,
      mode=self.mode,
      deterministic=deterministic,
      rng_impl=self.rng_impl,
    )
