"""Structured dropout: masks shared over channels, samples, blocks or squares.

::

    channel_dropout(rate)  x * m / (1 - rate), one m per (sample, channel)      Tompson et al. 2015
    drop_path(rate)        x * m / (1 - rate), one m per sample (or per batch)  Huang et al. 2016
    dropblock(rate)        x * M * numel(M) / sum(M), M zero on random
                           block_size x block_size squares                     Ghiasi et al. 2018
    cutout(size)           x with one size x size square per sample set to 0   DeVries, Taylor 2017

The first two are inverted dropout with a broadcast mask and share
:func:`regjax.dropout`'s mask draw. DropBlock draws its block seeds with the
same choice of generator (``rng_impl``, by default the fused counter-based
generator of :mod:`regjax.random`); cutout draws its few square centres with
``jax.random``.
All follow the common contract of :mod:`regjax.stochastic` (explicit key;
``deterministic=True`` or a concretely zero rate returns ``x`` itself and needs
no key; output in ``x``'s shape and dtype; same key, same draw with and without
``jit``; a traced rate is clipped into the valid range, and a traced NaN or
+-inf returns ``x``).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from regjax import _checks, _noise, _random, _specs, random
from regjax.stochastic import dropout

__all__ = [
  "channel_dropout",
  "cutout",
  "drop_path",
  "drop_path_rates",
  "dropblock",
  "dropblock_rate_schedule",
]

_DATA_FORMATS = ("NHWC", "NCHW")
_DROP_PATH_MODES = ("row", "batch")
_DROP_PATH_CONVENTIONS = ("huang", "linspace")


def _check_int(value, op, name, *, low, high=None, high_text=None):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{op}: `{name}` must be an int; got {value!r}.")
  if value < low or (high is not None and value > high):
    bound = "inf)" if high is None else f"{high}]"
    raise ValueError(f"{op}: `{name}` must be in [{low}, {bound}{high_text or ''}; got {value!r}.")
  return int(value)


def _spatial_axes(x, data_format, op):
  """(height axis, width axis, channel axis) of a rank-4 feature map."""
  if x.ndim != 4:
    raise ValueError(
      f"{op}: `x` must be a batch of 2-D feature maps of rank 4 ({data_format}); got "
      f"shape {x.shape}. Use jax.vmap for a single image or a stack of batches."
    )
  if data_format not in _DATA_FORMATS:
    raise ValueError(f"{op}: `data_format` must be one of {_DATA_FORMATS}; got {data_format!r}.")
  return (1, 2, 3) if data_format == "NHWC" else (2, 3, 1)


def channel_dropout(
  x: jax.Array,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  channel_axis: int = -1,
  rng_impl: str = "hash",
) -> jax.Array:
  """Channel ("spatial") dropout (Tompson et al. 2015, CVPR).

  Train mode: ``y = x * m / (1 - rate)`` with one ``m ~ Bernoulli(1 - rate)``
  per (sample, channel), shared over every spatial position, so a whole
  feature map is kept (and scaled) or zeroed. Neighbouring activations of a
  feature map are strongly correlated, so per-element dropout barely removes
  information there; this does. Keras ``SpatialDropout1D/2D/3D``, torch
  ``Dropout1d/2d/3d``. Eval mode returns ``x``.

  Axis 0 is the batch axis; every axis other than 0 and ``channel_axis`` is
  spatial: rank 3 ``(N, L, C)``, 4 ``(N, H, W, C)`` and 5 ``(N, D, H, W, C)``
  maps channels-last, or channels-first with ``channel_axis=1``. This is
  :func:`regjax.dropout` with ``broadcast_dims`` set to the spatial axes (the
  same mask draw).

  Args:
    x: floating-point array of rank >= 3.
    rate: probability of dropping a channel, in ``[0, 1]``; ``rate == 1``
      returns zeros. A traced rate is clipped to ``[0, 1]``; a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged.
    channel_axis: the channel axis (not 0, the batch axis): an axis index, as
      :func:`regjax.batch_norm`'s ``axis``, where :func:`regjax.dropblock` and
      :func:`regjax.cutout` take the layout (``data_format``); the other axes
      but 0 are what :func:`regjax.dropout` calls ``broadcast_dims`` (shared
      by one draw).
    rng_impl: ``'hash'`` (default) or ``'jax'``, as in :func:`regjax.dropout`.
  """
  op = "regjax.channel_dropout"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  deterministic = _noise.check_common(x, key, deterministic, op)
  if x.ndim < 3:
    raise ValueError(
      f"{op}: `x` must have rank >= 3 (batch, spatial..., channels); got shape {x.shape}. "
      "For (batch, features) use regjax.dropout."
    )
  if not isinstance(channel_axis, (int, np.integer)) or isinstance(channel_axis, bool):
    raise TypeError(f"{op}: `channel_axis` must be an int; got {channel_axis!r}.")
  (axis,) = _checks.canonical_axes(channel_axis, x.ndim, op, "channel_axis")
  if axis == 0:
    raise ValueError(f"{op}: `channel_axis` must not be 0, the batch axis; got {channel_axis}.")
  rate = _specs.CHANNEL_DROPOUT.check(rate, op)
  trivial = _specs.CHANNEL_DROPOUT.result_without_draw(x, rate, deterministic)
  if trivial is not None:
    return trivial
  key = _checks.check_key(key, op)
  spatial = tuple(a for a in range(1, x.ndim) if a != axis)
  return dropout(x, rate, key=key, broadcast_dims=spatial, rng_impl=rng_impl)


def drop_path(
  x: jax.Array,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  mode: str = "row",
  rng_impl: str = "hash",
) -> jax.Array:
  """Drop path / stochastic depth on a residual branch (Huang et al. 2016, ECCV).

  Train mode: ``y = x * m / (1 - rate)`` where ``m ~ Bernoulli(1 - rate)`` is
  drawn once per sample (``mode='row'``, mask shape ``(batch, 1, ..., 1)``) or
  once for the whole batch (``mode='batch'``). Apply it to the residual branch
  only: ``out = shortcut + drop_path(branch(x), rate, key=k)``. Eval mode
  returns ``x``.

  Huang et al. train with ``x * m`` and multiply by the survival probability
  at test time; the inverted scaling here (timm ``drop_path``, torchvision
  ``stochastic_depth``) is the same in expectation and leaves eval free.

  Args:
    x: floating-point array of rank >= 1; axis 0 is the batch axis.
    rate: probability of dropping the branch, in ``[0, 1]``; ``rate == 1``
      returns zeros. A traced rate is clipped to ``[0, 1]``; a traced NaN or +-inf returns ``x``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0 or 1.
    deterministic: if True, return ``x`` unchanged.
    mode: ``'row'`` (one draw per sample) or ``'batch'`` (one for the batch),
      torchvision's names.
    rng_impl: ``'hash'`` (default) or ``'jax'``, as in :func:`regjax.dropout`.
  """
  op = "regjax.drop_path"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  deterministic = _noise.check_common(x, key, deterministic, op)
  if mode not in _DROP_PATH_MODES:
    raise ValueError(f"{op}: `mode` must be one of {_DROP_PATH_MODES}; got {mode!r}.")
  if x.ndim < 1:
    raise ValueError(f"{op}: `x` must have a batch axis (rank >= 1); got shape {x.shape}.")
  rate = _specs.DROP_PATH.check(rate, op)
  trivial = _specs.DROP_PATH.result_without_draw(x, rate, deterministic)
  if trivial is not None:
    return trivial
  key = _checks.check_key(key, op)
  first = 1 if mode == "row" else 0
  return dropout(x, rate, key=key, broadcast_dims=tuple(range(first, x.ndim)), rng_impl=rng_impl)


def drop_path_rates(
  num_blocks: int, max_rate: float, *, convention: str = "huang"
) -> tuple[float, ...]:
  """Per-block drop-path rates of the linear decay rule (Huang et al. 2016, eq. 4).

  ``convention='huang'`` (default, the paper): block ``l = 1..L`` (counted from
  the input) gets ``rate_l = l / L * max_rate``, so the first block already
  drops with ``max_rate / L`` and the last with ``max_rate`` (the paper's
  survival probability ``p_l = 1 - l / L * (1 - p_L)``).

  ``convention='linspace'``: ``rate_l = (l - 1) / (L - 1) * max_rate``, i.e.
  ``linspace(0, max_rate, L)``: the first block is never dropped. This is timm's
  ``dpr = torch.linspace(0, drop_path_rate, depth)`` and torchvision's ConvNeXt
  and Swin. (torchvision's EfficientNet uses yet another, ``(l - 1) / L``.)

  Args:
    num_blocks: ``L >= 1``, the number of residual blocks.
    max_rate: the last block's rate, in ``[0, 1]``.
    convention: ``'huang'`` or ``'linspace'``.

  Returns:
    A tuple of ``L`` Python floats, one per block, first block first; the
    last is exactly ``max_rate``.
  """
  op = "regjax.drop_path_rates"
  num_blocks = _check_int(num_blocks, op, "num_blocks", low=1)
  checked = _specs.DROP_PATH.check(max_rate, op, "max_rate")
  if _checks.is_traced(checked):
    raise TypeError(f"{op}: `max_rate` must be a concrete number (the schedule is static).")
  max_rate = float(checked)
  if convention not in _DROP_PATH_CONVENTIONS:
    raise ValueError(
      f"{op}: `convention` must be one of {_DROP_PATH_CONVENTIONS}; got {convention!r}."
    )
  if convention == "huang":
    return tuple(block / num_blocks * max_rate for block in range(1, num_blocks + 1))
  if num_blocks == 1:
    return (0.0,)
  return tuple(block / (num_blocks - 1) * max_rate for block in range(num_blocks))


def _box_any(seeds: jax.Array, block_size: int, axes: tuple[int, int]) -> jax.Array:
  """Marks every position covered by a block_size x block_size block whose
  top-left corner is a seed; the output is block_size - 1 longer on each axis.

  A box maximum is separable, so two 1-D max filters (O(block_size) per
  element) replace one 2-D one (O(block_size**2)). They run on the booleans
  themselves (a maximum of bools is their "or"): about 4x faster on a CPU than
  on a float32 copy, with the same result.
  """
  out = seeds
  for axis in axes:
    window = [1] * out.ndim
    window[axis] = block_size
    padding = [(0, 0)] * out.ndim
    # Output index h sees seeds h - block_size + 1 .. h: pad block_size - 1 on both sides.
    padding[axis] = (block_size - 1, block_size - 1)
    out = jax.lax.reduce_window(
      out, np.bool_(False), jax.lax.max, tuple(window), (1,) * out.ndim, tuple(padding)
    )
  return out


def dropblock(
  x: jax.Array,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  block_size: int = 7,
  share_channels: bool = False,
  data_format: str = "NHWC",
  rng_impl: str = "hash",
) -> jax.Array:
  """DropBlock (Ghiasi, Lin, Le 2018, NeurIPS): drop contiguous square regions.

  Train mode, for a feature map of height ``H`` and width ``W``:

  1. Draw seeds ``~ Bernoulli(gamma)`` at the ``(H - block_size + 1) x
     (W - block_size + 1)`` positions where a whole block fits, with
     ``gamma = rate * H * W / (block_size**2 * (H - block_size + 1) * (W - block_size + 1))``.
  2. Zero the ``block_size x block_size`` block at every seed: ``M = 0`` there.
  3. ``y = x * M * numel(M) / sum(M)``, the sums running over the whole mask
     (batch, space and channels, as in the reference TF code and timm); an
     all-zero mask gives zeros, never NaN.

  Masks are independent per sample and channel, or shared by all channels of
  a sample with ``share_channels=True`` (the paper tried both). Eval mode
  returns ``x``.

  ``rate`` is the paper's nominal rate: ``gamma`` counts each seed as
  ``block_size**2`` dropped units, so the expected dropped fraction is ``rate``
  only to first order. Overlapping blocks make it smaller: exactly
  ``mean over positions of 1 - (1 - gamma)**c``, with ``c`` the number of
  fitting blocks covering a position; e.g. 0.094 for ``rate=0.1``, ``32 x 32``,
  ``block_size=7``. ``rate == 1`` is allowed and follows the same formula
  (it does not drop everything unless ``block_size`` is 1 or the map's size).

  The paper ramps ``rate`` linearly from 0 (e.g.
  ``optax.linear_schedule(0.0, final_rate, total_steps)(step)``); pass it as a
  traced scalar so the ramp does not recompile. A traced rate is
  clipped to ``[0, 1]``; a traced NaN or +-inf returns ``x``.

  Generator (``rng_impl``): with ``'hash'`` (default) the seeds are
  ``regjax.random.bernoulli(key, gamma, seed_shape)``, the counter-based
  generator of :mod:`regjax.random` over the flat index of the seed
  array (shape ``x.shape`` with ``H, W`` replaced by the fitting positions and
  ``C`` by 1 with ``share_channels``). Its 16-bit threshold realises ``gamma``
  as exactly ``round(gamma * 2**16) / 2**16`` (resolution ``2**-16``), and the
  dropped-fraction formula above holds with that value in place of ``gamma``.
  A ``gamma`` of ``2**-17`` or less draws no seeds at all, so nothing is dropped
  and ``y`` equals ``x``: for ``32 x 32`` maps that is ``rate`` below about
  ``2.5e-4`` with ``block_size=7`` (``1.5e-4`` with 5), the first steps of a
  ramp from 0. Above it the realised ``gamma`` is within ``2**-17`` of the
  formula's, a large relative error only for such tiny rates (every ``gamma``
  in ``(2**-17, 1.5 * 2**-16)`` becomes ``2**-16``).
  The backward recomputes the seeds from the key (``jax.checkpoint``), storing
  nothing per element. With ``'jax'`` the seeds are ``jax.random.bernoulli(key,
  gamma, seed_shape)`` (the draws of earlier versions, bit for bit) and the
  backward keeps the mask ``M`` (1 byte per element); threefry makes it
  several times slower than ``'hash'`` on a CPU.

  Args:
    x: floating-point array of rank 4, ``NHWC`` or ``NCHW``.
    rate: nominal drop rate, in ``[0, 1]``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    block_size: side of the square blocks, in ``[1, min(H, W)]``.
    share_channels: one mask per sample, shared by its channels.
    data_format: ``'NHWC'`` (flax's layout) or ``'NCHW'``: the channel axis
      is 3 or 1, what :func:`regjax.channel_dropout` calls ``channel_axis`` and
      :func:`regjax.batch_norm` ``axis`` (``broadcast_dims`` of
      :func:`regjax.dropout` names shared axes instead).
    rng_impl: ``'hash'`` (default): the fused counter-hash generator, whose
      realised seed probability is ``round(gamma * 2**16) / 2**16`` (no seeds
      when ``gamma <= 2**-17``) and whose backward recomputes the seeds from the
      key; ``'jax'``: ``jax.random.bernoulli(key, gamma, seed_shape)``.
  """
  op = "regjax.dropblock"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  deterministic = _noise.check_common(x, key, deterministic, op)
  h_axis, w_axis, c_axis = _spatial_axes(x, data_format, op)
  height, width = x.shape[h_axis], x.shape[w_axis]
  block_size = _check_int(
    block_size,
    op,
    "block_size",
    low=1,
    high=min(height, width),
    high_text=f" (the feature map is {height} x {width})",
  )
  if not isinstance(share_channels, (bool, np.bool_)):
    raise TypeError(f"{op}: `share_channels` must be a bool; got {share_channels!r}.")
  rate = _specs.DROPBLOCK.check(rate, op)
  trivial = _specs.DROPBLOCK.result_without_draw(x, rate, deterministic)
  if trivial is not None:
    return trivial
  key = _checks.check_key(key, op)
  valid_h, valid_w = height - block_size + 1, width - block_size + 1
  # gamma <= rate for every block_size (b * (n - b + 1) >= n on [1, n]), so it is a probability.
  seed_rate_per_rate = height * width / (block_size**2 * valid_h * valid_w)
  rule = _DropBlock(
    block_size=block_size,
    axes=(h_axis, w_axis),
    shared_axis=c_axis if share_channels else None,
    seed_rate_per_rate=seed_rate_per_rate,
  )
  return _noise.apply(rule, x, rate, key, rng_impl)


@dataclasses.dataclass(frozen=True)
class _DropBlock(_noise.NoiseRule):
  """Block seeds ``~ Bernoulli(gamma)`` where a block fits, then ``x * M * numel(M) / sum(M)``."""

  block_size: int = 1
  axes: tuple[int, int] = (1, 2)
  shared_axis: int | None = None
  seed_rate_per_rate: float = 1.0

  def noise_shape(self, shape):
    """The seed array: ``shape`` with ``H, W`` the fitting positions (``C`` 1 if shared)."""
    seed_shape = list(shape)
    for axis in self.axes:
      seed_shape[axis] = shape[axis] - self.block_size + 1
    if self.shared_axis is not None:
      seed_shape[self.shared_axis] = 1
    return tuple(seed_shape)

  def param(self, rate):
    return jnp.clip(rate.astype(jnp.float32), 0.0, 1.0) * self.seed_rate_per_rate

  def from_words(self, x, words, gamma):
    return self._apply_seeds(x, random.bernoulli_from_bits(words, gamma))

  def from_key(self, x, key, noise_shape, gamma):
    return self._apply_seeds(x, _random.bernoulli(key, gamma, noise_shape))

  def _apply_seeds(self, x, seeds):
    """``x * M * numel(M) / sum(M)``, ``M`` zero on the block of every seed."""
    keep = ~_box_any(seeds, self.block_size, self.axes)
    return _scale_by_mask(x, keep, self.axes[0])


def _count(mask: jax.Array, axis: int) -> jax.Array:
  """``sum(mask)`` as an exact int32.

  Partial sums along ``axis`` (the height: never the minor axis in NHWC or
  NCHW) are taken in uint8 when it has at most 255 entries, which a CPU adds
  several times faster than bools widened to int32.
  """
  if mask.shape[axis] <= np.iinfo(np.uint8).max:
    mask = jnp.sum(mask.astype(jnp.uint8), axis=axis, dtype=jnp.uint8)
  return jnp.sum(mask, dtype=jnp.int32)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _scale_by_mask(x, keep, count_axis):
  """``x * where(keep, numel / sum(keep), 0)``, ``x`` in the compute dtype (one rounding).

  Checkpointed, so a backward keeps the bool mask (1 byte per element) and
  recounts it, instead of the float32 factor.
  """
  # An exact integer count; an all-dropped mask zeroes x whatever the scale.
  kept = _count(keep, count_axis)
  scale = keep.size / jnp.maximum(kept, 1).astype(jnp.float32)
  return x * jnp.where(keep, scale, 0.0).astype(x.dtype)


def dropblock_rate_schedule(step, total_steps: int, final_rate: float | jax.Array) -> jax.Array:
  """Deprecated: the linear DropBlock ramp, ``final_rate * clip(step / total_steps, 0, 1)``.

  Use ``optax.linear_schedule(0.0, final_rate, total_steps)``, a schedule (a
  function of the step) like the other optax schedules: its value at ``step``
  is this one's up to float32 rounding (within one ulp of ``final_rate``).
  Calling this function warns with a ``DeprecationWarning``; its values are
  unchanged.

  Starts at 0, reaches ``final_rate`` at ``step == total_steps`` and stays
  there (the ramp of Ghiasi et al.). ``step`` may be traced (e.g. an
  optimizer step counter under ``jit``); pass the result straight to
  :func:`dropblock`.

  Args:
    step: the current step (int or traced scalar).
    total_steps: length of the ramp, ``>= 1``.
    final_rate: rate at the end of the ramp, in ``[0, 1]``.

  Returns:
    A float32 scalar array.
  """
  op = "regjax.dropblock_rate_schedule"
  warnings.warn(
    f"{op} is deprecated: use optax.linear_schedule(0.0, final_rate, total_steps)(step), "
    "which gives the same values up to float32 rounding.",
    DeprecationWarning,
    stacklevel=2,
  )
  total_steps = _check_int(total_steps, op, "total_steps", low=1)
  final_rate = _specs.DROPBLOCK.check(final_rate, op, "final_rate")
  if np.shape(step) != ():
    raise ValueError(f"{op}: `step` must be a scalar; got shape {np.shape(step)}.")
  fraction = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return jnp.clip(jnp.asarray(final_rate, jnp.float32), 0.0, 1.0) * fraction


def _check_size(size, height: int, width: int, op: str) -> int | jax.Array:
  """Cutout's ``size``: a Python int in ``[0, min(H, W)]``, or a traced integer scalar."""
  if _checks.is_traced(size):
    if np.shape(size) != () or not jnp.issubdtype(size.dtype, jnp.integer):
      raise TypeError(f"{op}: `size` must be an integer scalar; got {size.dtype}{size.shape}.")
    return size
  if (
    isinstance(size, (np.ndarray, jax.Array))
    and size.shape == ()
    and jnp.issubdtype(size.dtype, jnp.integer)
  ):
    size = int(size)
  return _check_int(
    size,
    op,
    "size",
    low=0,
    high=min(height, width),
    high_text=f" (the image is {height} x {width})",
  )


def cutout(
  x: jax.Array,
  size: int | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  data_format: str = "NHWC",
) -> jax.Array:
  """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): zero one square per image.

  Train mode: for every sample draw a centre ``(cy, cx)`` uniformly over the
  ``H x W`` pixels and zero rows ``cy - size // 2 .. cy - size // 2 + size - 1``
  and the same columns around ``cx``, in every channel, clipped by the
  border (so a square near the edge is smaller, as in the paper). Nothing is
  rescaled: cutout is data augmentation for inputs, not a hidden-layer
  regularizer. Eval mode returns ``x``.

  For even ``size`` this is the reference code's square; for odd ``size`` the
  reference code zeroes ``size - 1`` rows, here exactly ``size``.

  Args:
    x: floating-point array of rank 4, ``NHWC`` or ``NCHW`` (``jax.vmap``
      for a single image).
    size: side of the square, an int in ``[0, min(H, W)]``; 0 returns ``x``.
      A traced integer size is clipped to that range.
    key: PRNG key; required in train mode unless ``size`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    data_format: ``'NHWC'`` or ``'NCHW'``, as in :func:`regjax.dropblock`
      (the layout that ``channel_axis`` of :func:`regjax.channel_dropout` and
      ``axis`` of :func:`regjax.batch_norm` give as an axis).
  """
  op = "regjax.cutout"
  deterministic = _noise.check_common(x, key, deterministic, op)
  h_axis, w_axis, _ = _spatial_axes(x, data_format, op)
  height, width = x.shape[h_axis], x.shape[w_axis]
  size = _check_size(size, height, width, op)
  trivial = _specs.CUTOUT.result_without_draw(x, size, deterministic)
  if trivial is not None:
    return trivial
  key = _checks.check_key(key, op)
  size = jnp.clip(jnp.asarray(size, jnp.int32), 0, min(height, width))
  batch = x.shape[0]
  centres = jax.random.randint(key, (batch, 2), 0, jnp.array([height, width], jnp.int32))
  start = centres - size // 2  # (batch, 2): top row, left column; may be negative
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= start[:, :1]) & (rows < start[:, :1] + size)  # (batch, H)
  in_cols = (cols >= start[:, 1:]) & (cols < start[:, 1:] + size)  # (batch, W)
  hole = in_rows[:, :, None] & in_cols[:, None, :]  # (batch, H, W)
  hole = hole[..., None] if data_format == "NHWC" else hole[:, None]
  # A select, not a product: the square is exactly 0 even where x is inf or NaN.
  return jnp.where(hole, jnp.zeros((), x.dtype), x)
