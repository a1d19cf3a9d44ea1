"""Equinox modules of :mod:`regjax.structured`: channel dropout, drop path, DropBlock,
cutout, random erasing, FractalNet's join drop path.

Conventions of ``equinox.nn.Dropout`` (see :mod:`regjax.equinox._common`).
These ops are defined on a *batch*: axis 0 is the batch axis (one draw per
sample, or per sample and channel). Call them on the batch (outside
``jax.vmap``), or, inside a per-example ``jax.vmap``, on the example with a
batch axis of one added, ``module(x[None], key=k)[0]`` (each example then gets
its draw from its own key). A strength may be a JAX scalar (traced under
``eqx.filter_jit``, e.g. a DropBlock ramp from ``optax.linear_schedule``).
"""

from __future__ import annotations

import equinox as eqx
import jax

from regjax import _specs
from regjax import structured as F
from regjax._types import BlockDataFormat, DataFormat, DropPathMode, Fill, JoinMode, RngImpl
from regjax.equinox._common import apply_noise, check_init, noise_key, resolve_inference


class ChannelDropout(eqx.Module):
  """Drops whole channels (one draw per sample and channel); see :func:`regjax.channel_dropout`.

  Keras ``SpatialDropout1D/2D/3D``, torch ``Dropout1d/2d/3d``; input of rank
  >= 3 with the batch on axis 0.

  Attributes:
    rate: probability of dropping a channel, in ``[0, 1]``.
    inference: inference mode (``y = x``) if True; overridden at call.
    channel_axis: the channel axis (-1, channels-last; 1 for channels-first) (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  rate: float | jax.Array
  inference: bool = False
  channel_axis: int = eqx.field(static=True, default=-1)
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.CHANNEL_DROPOUT, self.rate)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Channel dropout of the batch ``x``; ``key`` is required in training mode."""
    return apply_noise(
      self,
      F.channel_dropout,
      _specs.CHANNEL_DROPOUT,
      self.rate,
      x,
      inference,
      key,
      channel_axis=self.channel_axis,
      rng_impl=self.rng_impl,
    )


class DropPath(eqx.Module):
  """Stochastic depth on a residual branch; see :func:`regjax.drop_path` (timm ``DropPath``).

  Use as ``x + drop_path(branch(x), key=k)``. ``mode='row'`` draws one value
  per row of axis 0 (per sample of a batch); ``mode='batch'`` one for the
  whole array, which is also one per example when called per example under
  ``jax.vmap`` with a key per example.

  Attributes:
    rate: probability of dropping the branch, in ``[0, 1]``.
    inference: inference mode (``y = x``) if True; overridden at call.
    mode: ``'row'`` or ``'batch'`` (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  rate: float | jax.Array
  inference: bool = False
  mode: DropPathMode = eqx.field(static=True, default="row")
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.DROP_PATH, self.rate)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Drop path of ``x``; ``key`` is required in training mode unless ``rate`` is 0 or 1."""
    return apply_noise(
      self,
      F.drop_path,
      _specs.DROP_PATH,
      self.rate,
      x,
      inference,
      key,
      mode=self.mode,
      rng_impl=self.rng_impl,
    )


class DropBlock(eqx.Module):
  """Drops contiguous ``block_size x block_size`` regions; see :func:`regjax.dropblock`.

  Input ``NHWC``/``NCHW`` (rank 5: ``NDHWC``/``NCDHW``, cubes), the batch on axis 0.

  Attributes:
    rate: nominal drop rate, in ``[0, 1]`` (ramp it with e.g.
      ``optax.linear_schedule(0.0, final_rate, total_steps)`` and a JAX scalar).
    inference: inference mode (``y = x``) if True; overridden at call.
    block_size: side of the blocks (static).
    share_channels: one mask per sample, shared by its channels (static).
    data_format: ``'NHWC'`` or ``'NCHW'`` (rank 5 also ``'NDHWC'``, ``'NCDHW'``) (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  rate: float | jax.Array
  inference: bool = False
  block_size: int = eqx.field(static=True, default=7)
  share_channels: bool = eqx.field(static=True, default=False)
  data_format: BlockDataFormat = eqx.field(static=True, default="NHWC")
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.DROPBLOCK, self.rate)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """DropBlock of the batch ``x``; ``key`` is required in training mode unless ``rate`` is 0."""
    return apply_noise(
      self,
      F.dropblock,
      _specs.DROPBLOCK,
      self.rate,
      x,
      inference,
      key,
      block_size=self.block_size,
      share_channels=self.share_channels,
      data_format=self.data_format,
      rng_impl=self.rng_impl,
    )


class Cutout(eqx.Module):
  """Fills one ``size x size`` square per image (inputs only); see :func:`regjax.cutout`.

  Attributes:
    size: side of the square (at most the image's side).
    inference: inference mode (``y = x``) if True; overridden at call.
    probability: probability that an image is cut out (1 by default).
    fill: the square's value (0 by default), or ``'random'`` (``N(0, 1)``) (static).
    data_format: ``'NHWC'`` or ``'NCHW'`` (static).
  """

  size: int | jax.Array
  inference: bool = False
  probability: float | jax.Array = 1.0
  fill: Fill = eqx.field(static=True, default=0.0)
  data_format: DataFormat = eqx.field(static=True, default="NHWC")

  def __check_init__(self):
    check_init(self, _specs.CUTOUT, self.size)
    _specs.PROBABILITY.check(self.probability, "regjax.equinox.Cutout")

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Cutout of the batch ``x``; ``key`` is required in training mode."""
    inference = resolve_inference(self, inference)
    trivial = _specs.CUTOUT.needs_no_draw(self.size) or _specs.PROBABILITY.needs_no_draw(
      self.probability
    )
    return F.cutout(
      x,
      self.size,
      key=noise_key(self, inference, key, trivial),
      deterministic=inference,
      probability=self.probability,
      fill=self.fill,
      data_format=self.data_format,
    )


class RandomErasing(eqx.Module):
  """Fills one random rectangle per image (inputs only); see :func:`regjax.random_erasing`.

  torchvision ``transforms.RandomErasing``, on a batch.

  Attributes:
    probability: probability that an image is erased (0.5 by default).
    inference: inference mode (``y = x``) if True; overridden at call.
    area: ``(low, high)``, the range of the erased fraction of the image (static).
    aspect: ``(low, high)``, the range of the aspect ratio ``h / w``, drawn
      log-uniformly (static).
    fill: the rectangle's value (0 by default), or ``'random'`` (static).
    data_format: ``'NHWC'`` or ``'NCHW'`` (static).
  """

  probability: float | jax.Array = 0.5
  inference: bool = False
  area: tuple[float, float] = eqx.field(static=True, default=(0.02, 0.33), converter=tuple)
  aspect: tuple[float, float] = eqx.field(static=True, default=(0.3, 3.3), converter=tuple)
  fill: Fill = eqx.field(static=True, default=0.0)
  data_format: DataFormat = eqx.field(static=True, default="NHWC")

  def __check_init__(self):
    check_init(self, _specs.RANDOM_ERASING, self.probability)

  def __call__(
    self, x: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """Random erasing of the batch ``x``; ``key`` is required in training mode."""
    return apply_noise(
      self,
      F.random_erasing,
      _specs.RANDOM_ERASING,
      self.probability,
      x,
      inference,
      key,
      area=self.area,
      aspect=self.aspect,
      fill=self.fill,
      data_format=self.data_format,
    )


class JoinDropPath(eqx.Module):
  """FractalNet's drop-path over a join; see :func:`regjax.join_drop_path`.

  Call it on the stacked branch outputs, shape ``(n_branches, batch, ...)``;
  it returns their join, the mean over the kept branches, shape ``(batch, ...)``.
  Inference: the mean of all branches.

  Attributes:
    rate: probability of dropping each branch (local mode), in ``[0, 1]``.
    inference: inference mode if True; overridden at call.
    mode: ``'local'`` or ``'global'`` (one uniform branch per sample) (static).
    rng_impl: ``'hash'`` (default) or ``'jax'`` (static).
  """

  rate: float | jax.Array
  inference: bool = False
  mode: JoinMode = eqx.field(static=True, default="local")
  rng_impl: RngImpl = eqx.field(static=True, default="hash")

  def __check_init__(self):
    check_init(self, _specs.JOIN_DROP_PATH, self.rate)

  def __call__(
    self, branches: jax.Array, *, key: jax.Array | None = None, inference: bool | None = None
  ) -> jax.Array:
    """The join of ``branches``; ``key`` is required in training mode where a draw is made."""
    inference = resolve_inference(self, inference)
    trivial = F.join_needs_no_draw(branches, self.rate, self.mode)
    return F.join_drop_path(
      branches,
      self.rate,
      key=noise_key(self, inference, key, trivial),
      mode=self.mode,
      deterministic=inference,
      rng_impl=self.rng_impl,
    )
