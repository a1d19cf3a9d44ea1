"""Structured dropout: masks shared over channels, samples, blocks or squares.

::

    channel_dropout(rate)  x * m / (1 - rate), one m per (sample, channel)      Tompson et al. 2015
    drop_path(rate)        x * m / (1 - rate), one m per sample (or per batch)  Huang et al. 2016
    dropblock(rate)        x * M * numel(M) / sum(M), M zero on random
                           block_size x block_size squares (cubes in 3-D)      Ghiasi et al. 2018
    cutout(size)           x with one size x size square per sample set to     DeVries, Taylor 2017
                           fill (0), with probability `probability` (1)
    random_erasing(p)      x with one random rectangle per sample set to fill  Zhong et al. 2017
                           (0, or N(0, 1) noise), with probability p
    join_drop_path(rate)   mean of the kept branches of a join, each dropped   Larsson et al. 2016
                           with prob. rate, at least one kept (or one branch)

The first two are inverted dropout with a broadcast mask and share
:func:`regjax.dropout`'s mask draw. DropBlock draws its block seeds with the
same choice of generator (``rng_impl``, by default the fused counter-based
generator of :mod:`regjax.random`); cutout and random erasing draw their few
rectangles (and a random fill) with ``jax.random``.
All follow the common contract of :mod:`regjax.stochastic` (explicit key;
``deterministic=True`` or a concretely zero rate returns ``x`` itself and needs
no key; output in ``x``'s shape and dtype; same key, same draw with and without
``jit``; a traced rate is clipped into the valid range, and a traced NaN or
+-inf returns ``x``), except that :func:`join_drop_path` reduces its branches:
its eval output (and that of a NaN or +-inf traced rate) is their mean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from regjax import _checks, _noise, _random, _specs, _types, random
from regjax._types import (
  BlockDataFormat,
  DataFormat,
  DropPathConvention,
  DropPathMode,
  Fill,
  JoinMode,
  RngImpl,
)
from regjax.stochastic import dropout

__all__ = [
  "channel_dropout",
  "cutout",
  "drop_path",
  "drop_path_rates",
  "dropblock",
  "dropblock_rate_schedule",
  "join_drop_path",
  "random_erasing",
]

_DATA_FORMATS = _types.DATA_FORMATS
_DATA_FORMATS_3D = _types.DATA_FORMATS_3D  # dropblock's rank-5 spellings of the same two layouts
_DROP_PATH_MODES = _types.DROP_PATH_MODES
_DROP_PATH_CONVENTIONS = _types.DROP_PATH_CONVENTIONS


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


def _block_axes(x, data_format, op):
  """(spatial axes, channel axis) of a rank-4 (2-D) or rank-5 (3-D) feature map.

  ``'NHWC'`` / ``'NCHW'`` name channels-last / channels-first for both ranks;
  ``'NDHWC'`` / ``'NCDHW'`` spell the same layouts for rank 5 only.
  """
  if data_format not in _DATA_FORMATS + _DATA_FORMATS_3D:
    raise ValueError(
      f"{op}: `data_format` must be one of {_DATA_FORMATS + _DATA_FORMATS_3D}; got {data_format!r}."
    )
  if x.ndim not in (4, 5):
    raise ValueError(
      f"{op}: `x` must be a batch of 2-D or 3-D feature maps, of rank 4 (NHWC or NCHW) or 5 "
      f"(NDHWC or NCDHW); got shape {x.shape}. Use jax.vmap for a single map or a stack of "
      "batches."
    )
  if x.ndim == 4 and data_format in _DATA_FORMATS_3D:
    raise ValueError(
      f"{op}: `data_format={data_format!r}` is for rank-5 input (3-D maps); got shape "
      f"{x.shape}: use 'NHWC' or 'NCHW'."
    )
  if data_format in ("NHWC", "NDHWC"):
    return tuple(range(1, x.ndim - 1)), x.ndim - 1
  return tuple(range(2, x.ndim)), 1


def channel_dropout(
  x: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  channel_axis: int = -1,
  rng_impl: RngImpl = "hash",
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
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
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
  x: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  mode: DropPathMode = "row",
  rng_impl: RngImpl = "hash",
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
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
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
  num_blocks: int, max_rate: float, *, convention: DropPathConvention = "huang"
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


def _box_any(seeds: jax.Array, block_size: int, axes: tuple[int, ...]) -> jax.Array:
  """Marks every position covered by a block_size x ... x block_size block (one
  side per axis of ``axes``) whose first corner is a seed; the output is
  block_size - 1 longer on each of ``axes``.

  A box maximum is separable, so one 1-D max filter per axis (O(block_size) per
  element) replaces one 2-D or 3-D one (O(block_size**2) or O(block_size**3)).
  They run on the booleans themselves (a maximum of bools is their "or"): about
  4x faster on a CPU than on a float32 copy, with the same result.
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
  x: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  block_size: int = 7,
  share_channels: bool = False,
  data_format: BlockDataFormat = "NHWC",
  rng_impl: RngImpl = "hash",
) -> jax.Array:
  """DropBlock (Ghiasi, Lin, Le 2018, NeurIPS): drop contiguous square (or cubic) regions.

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

  3-D maps (rank 5, ``(N, D, H, W, C)`` or ``(N, C, D, H, W)``; torchvision's
  ``DropBlock3d``) drop ``block_size**3`` cubes the same way: seeds at the
  ``(D - bs + 1) x (H - bs + 1) x (W - bs + 1)`` positions where a cube fits
  (``bs = block_size``), ``gamma = rate * D * H * W / (bs**3 * (D - bs + 1) *
  (H - bs + 1) * (W - bs + 1))``, and everything below (the rescaling, the
  dropped fraction with ``c`` the product of the three per-axis counts, the
  traced rate, the generators) holds with the three axes in place of two.

  ``rate`` is the paper's nominal rate: ``gamma`` counts each seed as
  ``block_size**2`` (3-D: ``**3``) dropped units, so the expected dropped fraction is ``rate``
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
  array (shape ``x.shape`` with ``H, W`` (3-D: ``D, H, W``) replaced by the
  fitting positions and ``C`` by 1 with ``share_channels``). Its 16-bit threshold realises ``gamma``
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
    x: floating-point array of rank 4, ``NHWC`` or ``NCHW``, or of rank 5
      (3-D maps), ``NDHWC`` or ``NCDHW``.
    rate: nominal drop rate, in ``[0, 1]``.
    key: PRNG key; required in train mode unless ``rate`` is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    block_size: side of the square (3-D: cubic) blocks, in ``[1, min(H, W)]``
      (3-D: ``[1, min(D, H, W)]``).
    share_channels: one mask per sample, shared by its channels.
    data_format: ``'NHWC'`` (flax's layout) or ``'NCHW'``: the channel axis
      is last or 1, what :func:`regjax.channel_dropout` calls ``channel_axis`` and
      :func:`regjax.batch_norm` ``axis`` (``broadcast_dims`` of
      :func:`regjax.dropout` names shared axes instead). The same two names
      serve rank-5 input, which also accepts ``'NDHWC'`` and ``'NCDHW'``.
    rng_impl: ``'hash'`` (default): the fused counter-hash generator, whose
      realised seed probability is ``round(gamma * 2**16) / 2**16`` (no seeds
      when ``gamma <= 2**-17``) and whose backward recomputes the seeds from the
      key; ``'jax'``: ``jax.random.bernoulli(key, gamma, seed_shape)``.
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  op = "regjax.dropblock"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  deterministic = _noise.check_common(x, key, deterministic, op)
  axes, c_axis = _block_axes(x, data_format, op)
  sizes = tuple(x.shape[a] for a in axes)
  block_size = _check_int(
    block_size,
    op,
    "block_size",
    low=1,
    high=min(sizes),
    high_text=f" (the feature map is {' x '.join(map(str, sizes))})",
  )
  if not isinstance(share_channels, (bool, np.bool_)):
    raise TypeError(f"{op}: `share_channels` must be a bool; got {share_channels!r}.")
  rate = _specs.DROPBLOCK.check(rate, op)
  trivial = _specs.DROPBLOCK.result_without_draw(x, rate, deterministic)
  if trivial is not None:
    return trivial
  key = _checks.check_key(key, op)
  valid = tuple(size - block_size + 1 for size in sizes)
  # gamma <= rate for every block_size (b * (n - b + 1) >= n on [1, n]), so it is a probability.
  # Exact integers, one rounding: for 2-D the very float of H * W / (b**2 * valid_h * valid_w).
  seed_rate_per_rate = math.prod(sizes) / (block_size ** len(sizes) * math.prod(valid))
  rule = _DropBlock(
    block_size=block_size,
    axes=axes,
    shared_axis=c_axis if share_channels else None,
    seed_rate_per_rate=seed_rate_per_rate,
  )
  return _noise.apply(rule, x, rate, key, rng_impl)


@dataclasses.dataclass(frozen=True)
class _DropBlock(_noise.NoiseRule):
  """Block seeds ``~ Bernoulli(gamma)`` where a block fits, then ``x * M * numel(M) / sum(M)``."""

  block_size: int = 1
  axes: tuple[int, ...] = (1, 2)
  shared_axis: int | None = None
  seed_rate_per_rate: float = 1.0

  def noise_shape(self, shape):
    """The seed array: ``shape`` with ``H, W`` (``D, H, W``) the fitting positions (``C`` 1 if
    shared)."""
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


def dropblock_rate_schedule(
  step: ArrayLike, total_steps: int, final_rate: float | jax.Array
) -> jax.Array:
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


def _check_fill(fill, dtype, op: str) -> Fill:
  """``fill``: ``'random'``, or a finite real number that stays finite in ``dtype``."""
  if isinstance(fill, str):
    if fill != "random":
      raise ValueError(f"{op}: `fill` must be a finite number or 'random'; got {fill!r}.")
    return "random"
  if _checks.is_traced(fill):
    raise TypeError(f"{op}: `fill` must be a concrete number or 'random', not a traced value.")
  array = (
    np.asarray(fill)
    if isinstance(fill, (numbers.Number, np.generic, np.ndarray, jax.Array))
    else None
  )
  if (
    array is None
    or array.shape != ()
    or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer))
  ):
    raise TypeError(f"{op}: `fill` must be a finite real number or 'random'; got {fill!r}.")
  value = float(array)
  with np.errstate(over="ignore"):
    in_dtype = np.asarray(value).astype(jnp.dtype(dtype))
  if not (math.isfinite(value) and np.isfinite(in_dtype.astype(np.float64))):
    raise ValueError(
      f"{op}: `fill` must be a finite number (finite in {jnp.dtype(dtype).name}) or 'random'; "
      f"got {fill!r}."
    )
  return value


def _check_interval(value, op: str, name: str, *, at_most_one: bool) -> tuple[float, float]:
  """A pair ``(low, high)`` of concrete reals, ``0 < low <= high`` (``<= 1`` or finite)."""
  if (
    not isinstance(value, (tuple, list))
    or len(value) != 2
    or any(
      isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating, np.integer))
      for v in value
    )
  ):
    raise TypeError(
      f"{op}: `{name}` must be a pair (low, high) of concrete real numbers; got {value!r}."
    )
  low, high = float(value[0]), float(value[1])
  bound = "<= 1" if at_most_one else "< inf"
  if not (0.0 < low <= high and (high <= 1.0 if at_most_one else math.isfinite(high))):
    raise ValueError(
      f"{op}: `{name}` must be a pair (low, high) with 0 < low <= high {bound}; got {value!r}."
    )
  return low, high


def _apply_probability(probability) -> jax.Array | float:
  """The probability to compare a uniform draw with: a traced one clipped, NaN or +-inf 0."""
  if not _checks.is_traced(probability):
    return probability
  p = probability.astype(jnp.float32)
  return jnp.where(jnp.isfinite(p), jnp.clip(p, 0.0, 1.0), 0.0)


def _fill_hole(x: jax.Array, hole: jax.Array, fill: float | str, key: jax.Array) -> jax.Array:
  """``x`` with ``fill`` where ``hole``: a select (exact even where ``x`` is inf or NaN).

  ``'random'``: ``N(0, 1)`` per element, drawn with ``key`` in the compute dtype
  (float32 for float16/bfloat16) and rounded once to ``x``'s dtype.
  """
  if fill == "random":
    noise = _random.normal(key, x.shape, _noise.compute_dtype(x.dtype)).astype(x.dtype)
    return jnp.where(hole, noise, x)
  return jnp.where(hole, jnp.asarray(fill, x.dtype), x)


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
  x: ArrayLike,
  size: int | jax.Array,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  probability: float | jax.Array = 1.0,
  fill: Fill = 0.0,
  data_format: DataFormat = "NHWC",
) -> jax.Array:
  """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): fill one square per image.

  Train mode: for every sample draw a centre ``(cy, cx)`` uniformly over the
  ``H x W`` pixels and set rows ``cy - size // 2 .. cy - size // 2 + size - 1``
  and the same columns around ``cx`` to ``fill`` (0, the paper's, by default),
  in every channel, clipped by the border (so a square near the edge is
  smaller, as in the paper). Nothing is rescaled: cutout is data augmentation
  for inputs, not a hidden-layer regularizer. Eval mode returns ``x``.

  For even ``size`` this is the reference code's square; for odd ``size`` the
  reference code zeroes ``size - 1`` rows, here exactly ``size``.

  With ``probability < 1`` each sample is cut out with that probability (one
  ``Bernoulli(probability)`` per sample, as the ``p`` of torchvision's
  ``RandomErasing``) and otherwise left as it is. The centres are the draw of
  ``probability=1`` (from ``key``), so a sample cut out at 0.5 gets the square
  it gets at 1; the decisions come from ``jax.random.fold_in(key, 2)`` and a
  random fill from ``jax.random.fold_in(key, 3)``.

  Args:
    x: floating-point array of rank 4, ``NHWC`` or ``NCHW`` (``jax.vmap``
      for a single image).
    size: side of the square, an int in ``[0, min(H, W)]``; 0 returns ``x``.
      A traced integer size is clipped to that range.
    key: PRNG key; required in train mode unless ``size`` or ``probability``
      is concretely 0.
    deterministic: if True, return ``x`` unchanged.
    probability: probability that a sample is cut out, in ``[0, 1]``; 1
      (default) cuts out every sample, 0 returns ``x``. A traced one is clipped
      to ``[0, 1]``; a traced NaN or +-inf returns ``x``'s values.
    fill: the value of the square's pixels, a finite number (cast to ``x``'s
      dtype; default 0), or ``'random'``: i.i.d. ``N(0, 1)`` per element (as
      torchvision's ``RandomErasing(value='random')``), drawn in float32 for
      float16/bfloat16 and rounded once.
    data_format: ``'NHWC'`` or ``'NCHW'``, as in :func:`regjax.dropblock`
      (the layout that ``channel_axis`` of :func:`regjax.channel_dropout` and
      ``axis`` of :func:`regjax.batch_norm` give as an axis).
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  op = "regjax.cutout"
  deterministic = _noise.check_common(x, key, deterministic, op)
  h_axis, w_axis, _ = _spatial_axes(x, data_format, op)
  height, width = x.shape[h_axis], x.shape[w_axis]
  size = _check_size(size, height, width, op)
  probability = _specs.PROBABILITY.check(probability, op)
  fill = _check_fill(fill, x.dtype, op)
  for spec, value in ((_specs.CUTOUT, size), (_specs.PROBABILITY, probability)):
    trivial = spec.result_without_draw(x, value, deterministic)
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
  if not _checks.is_concretely(probability, 1.0):
    # fold_in(key, i) is split(key, n)[i]: randint above uses split(key, 2), so 2 and 3 are new.
    applied = jax.random.uniform(jax.random.fold_in(key, 2), (batch,))
    hole = hole & (applied < _apply_probability(probability))[:, None, None]
  hole = hole[..., None] if data_format == "NHWC" else hole[:, None]
  # A select, not a product: the square is exactly `fill` even where x is inf or NaN.
  return _fill_hole(x, hole, fill, jax.random.fold_in(key, 3))


_ERASING_ATTEMPTS = 10  # torchvision's


def random_erasing(
  x: ArrayLike,
  probability: float | jax.Array = 0.5,
  *,
  key: jax.Array | None = None,
  deterministic: bool = False,
  area: tuple[float, float] = (0.02, 0.33),
  aspect: tuple[float, float] = (0.3, 3.3),
  fill: Fill = 0.0,
  data_format: DataFormat = "NHWC",
) -> jax.Array:
  """Random erasing (Zhong et al. 2017, arXiv:1708.04896): fill one random rectangle per image.

  Train mode, for each image of height ``H`` and width ``W``, independently:

  1. With probability ``1 - probability`` leave it as it is.
  2. Otherwise make up to 10 attempts (torchvision's number), all drawn at
     once: a target area ``S_e = U(area) * H * W``, an aspect ratio ``r_e``
     log-uniform on ``aspect`` (``exp(U(log lo, log hi))``), and
     ``h = round(sqrt(S_e * r_e))``, ``w = round(sqrt(S_e / r_e))`` (half to
     even). An attempt fits if ``1 <= h <= H`` and ``1 <= w <= W``; the first
     that fits is used, and if none does the image is left as it is (the
     paper retries until one fits, which has no fixed cost under ``jit``;
     with the default ``area`` and ``aspect``, 10 attempts all fail with
     probability below ``1e-20`` on square images of side 5 or more, e.g.
     ``1e-25`` at ``224 x 224``).
  3. Draw the top-left corner uniformly over the ``(H - h + 1) x (W - w + 1)``
     positions where the rectangle fits, and set its ``h x w`` pixels, in
     every channel, to ``fill``.

  So an image is erased with probability ``probability * (1 - (1 - q)**10)``,
  ``q`` the probability that one attempt fits, and the erased area is that of
  one attempt conditioned on fitting. Nothing is rescaled: this is data
  augmentation for inputs. Eval mode returns ``x``.

  The aspect ratio is log-uniform, as in torchvision and timm, not uniform as
  in the paper (``r_e ~ U(r_1, 1/r_1)``): log-uniform makes ``r`` and ``1/r``
  equally likely, so a rectangle is as often tall as wide (uniform on
  ``(0.3, 3.3)`` makes 77% of them taller than wide), and the results match
  those libraries'. The draws use ``jax.random``: with ``k1, k2 =
  jax.random.split(key)``, the decisions, areas, aspect ratios and corners are
  ``jax.random.uniform(k1, (N * 23,))`` (23 per image: decision, 10 areas, 10
  ratios, row, column; a corner is ``floor(u * (H - h + 1))``, uniform up to
  float32's resolution), and a random fill ``jax.random.normal(k2, x.shape)``.

  Args:
    x: floating-point array of rank 4, ``NHWC`` or ``NCHW``. A single image
      (rank 3) is refused, since ``(H, W, C)`` and a batch of grayscale
      ``(N, H, W)`` look alike: pass ``x[None]`` and take ``[0]``.
    probability: probability that an image is erased, in ``[0, 1]`` (default
      0.5, the paper's and torchvision's); 0 returns ``x``. It may be given
      positionally, as every op's strength. A traced one is clipped to
      ``[0, 1]``; a traced NaN or +-inf returns ``x``'s values.
    key: PRNG key; required in train mode unless ``probability`` is
      concretely 0.
    deterministic: if True, return ``x`` unchanged.
    area: ``(low, high)``, the range of the erased fraction of the image,
      ``0 < low <= high <= 1``.
    aspect: ``(low, high)``, the range of the aspect ratio ``h / w``,
      ``0 < low <= high < inf``.
    fill: the value of the erased pixels, a finite number (cast to ``x``'s
      dtype; default 0), or ``'random'``: i.i.d. ``N(0, 1)`` per element (as
      torchvision's ``value='random'``), drawn in float32 for float16/bfloat16
      and rounded once.
    data_format: ``'NHWC'`` or ``'NCHW'``, as in :func:`regjax.cutout`.
  """
  x = cast(jax.Array, x)  # typing only (a no-op); checked below
  op = "regjax.random_erasing"
  deterministic = _noise.check_common(x, key, deterministic, op)
  if x.ndim != 4:
    raise ValueError(
      f"{op}: `x` must be a batch of images of rank 4 ({data_format}); got shape {x.shape}. "
      "For a single image pass x[None] (a batch of one) and take [0]."
    )
  h_axis, w_axis, _ = _spatial_axes(x, data_format, op)
  area = _check_interval(area, op, "area", at_most_one=True)
  aspect = _check_interval(aspect, op, "aspect", at_most_one=False)
  fill = _check_fill(fill, x.dtype, op)
  probability = _specs.RANDOM_ERASING.check(probability, op)
  trivial = _specs.RANDOM_ERASING.result_without_draw(x, probability, deterministic)
  if trivial is not None:
    return trivial
  key = _checks.check_key(key, op)
  args = (area, aspect, fill, data_format == "NCHW")
  if _checks.is_traced(probability):
    return _erase_traced(x, key, probability, *args)
  return _erase_constant(x, key, probability, *args)


def _erase(x, key, probability, area, aspect, fill, channels_first):
  """Random erasing in train mode (see :func:`random_erasing`), one compiled computation.

  Every uniform comes from one flat draw (a rank-1 draw compiles several times
  faster than several shaped ones): per image, the decision, the attempts' areas
  and aspect ratios, and the corner.
  """
  batch = x.shape[0]
  height, width = (x.shape[2], x.shape[3]) if channels_first else (x.shape[1], x.shape[2])
  k_uniform, k_fill = jax.random.split(key)
  count = _ERASING_ATTEMPTS
  u = jax.random.uniform(k_uniform, (batch * (2 * count + 3),)).reshape(batch, 2 * count + 3)
  applied = u[:, 0] < _apply_probability(probability)
  target = (area[0] + (area[1] - area[0]) * u[:, 1 : 1 + count]) * (height * width)
  log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
  ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[:, 1 + count : 1 + 2 * count])
  # Clipped before the cast, so a huge (or inf) side cannot overflow int32; it still does not fit.
  h = jnp.clip(jnp.round(jnp.sqrt(target * ratio)), 0, height + 1).astype(jnp.int32)
  w = jnp.clip(jnp.round(jnp.sqrt(target / ratio)), 0, width + 1).astype(jnp.int32)
  fits = (h >= 1) & (h <= height) & (w >= 1) & (w <= width)
  first = jnp.argmax(fits, axis=1)[:, None]  # the first attempt that fits (0 if none)
  erase = applied & fits.any(axis=1)
  h = jnp.where(erase, jnp.take_along_axis(h, first, axis=1)[:, 0], 0)  # (batch,); 0: no hole
  w = jnp.where(erase, jnp.take_along_axis(w, first, axis=1)[:, 0], 0)
  # The corner, uniform over the height - h + 1 (width - w + 1) positions that fit.
  top = jnp.minimum(jnp.floor(u[:, -2] * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum(jnp.floor(u[:, -1] * (width - w + 1)).astype(jnp.int32), width - w)
  rows, cols = jnp.arange(height)[None, :], jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (batch, H)
  in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (batch, W)
  hole = in_rows[:, :, None] & in_cols[:, None, :]  # (batch, H, W)
  hole = hole[:, None] if channels_first else hole[..., None]
  return _fill_hole(x, hole, fill, k_fill)


_erase_constant = jax.jit(_erase, static_argnums=(2, 3, 4, 5, 6))
_erase_traced = jax.jit(_erase, static_argnums=(3, 4, 5, 6))


# ----------------------------------------------------------------------------
# FractalNet's drop-path over a join.

_JOIN_MODES = _types.JOIN_MODES
_MAX_JOIN_BRANCHES = 1 << 16  # the uniform choice uses 16 bits of a word


def _check_join(branches, rate, key, mode, deterministic, op):
  """The checks of :func:`join_drop_path`; returns ``(deterministic, rate)``."""
  _checks.check_floating(branches, op, "branches")
  deterministic = _checks.check_deterministic(deterministic, op)
  if key is not None:
    _checks.check_key(key, op)
  if not isinstance(mode, str) or mode not in _JOIN_MODES:
    raise ValueError(f"{op}: `mode` must be one of {_JOIN_MODES}; got {mode!r}.")
  if branches.ndim < 2:
    raise ValueError(
      f"{op}: `branches` must have shape (n_branches, batch, ...), rank >= 2; got shape "
      f"{branches.shape}. Stack the branch outputs with jnp.stack(outputs)."
    )
  n = branches.shape[0]
  if not 1 <= n <= _MAX_JOIN_BRANCHES:
    raise ValueError(
      f"{op}: `branches` must hold n_branches in [1, {_MAX_JOIN_BRANCHES}] along axis 0; "
      f"got shape {branches.shape}."
    )
  return deterministic, _specs.JOIN_DROP_PATH.check(rate, op)


def join_needs_no_draw(branches, rate, mode) -> bool:
  """Whether :func:`join_drop_path` makes no draw (one branch, or local mode at rate 0).

  For the modules, which ask for no key then; anything unusual answers False
  and is reported by the function.
  """
  shape: tuple = tuple(getattr(branches, "shape", ()))
  single = len(shape) >= 2 and shape[0] == 1
  return single or (mode == "local" and _checks.is_concretely(rate, 0.0))


def join_drop_path(
  branches: ArrayLike,
  rate: float | jax.Array,
  *,
  key: jax.Array | None = None,
  mode: JoinMode = "local",
  deterministic: bool = False,
  rng_impl: RngImpl = "hash",
) -> jax.Array:
  """Drop-path over a join (Larsson, Maire, Shakhnarovich 2016, FractalNet, arXiv:1605.07648).

  A FractalNet join averages its ``n`` input branches; drop-path trains it on
  random sub-networks. ``branches`` stacks the branches on axis 0, shape
  ``(n_branches, batch, ...)``; the result, shape ``(batch, ...)``, is the mean
  over the branches kept for each sample::

      y[b] = sum_i k[i, b] * branches[i, b] / sum_i k[i, b]

  - ``mode='local'`` (default): each branch is kept independently with
    probability ``keep = 1 - rate`` per sample; where all are dropped, one
    branch chosen uniformly is kept (the paper's "at least one survives"). A
    branch is thus kept with probability ``keep + rate**n / n``, and a pattern
    ``S`` of kept branches has probability ``keep**|S| * rate**(n - |S|)``,
    plus ``rate**n / n`` for ``|S| = 1``.
  - ``mode='global'``: exactly one branch per sample, chosen uniformly; ``rate``
    is checked but unused. (The paper's global sampling picks one column for
    the whole network; this is its step at one join, drawn independently of
    other joins. The paper mixes local and global sampling, half the
    mini-batches each.)

  Each sample draws its own pattern (as :func:`drop_path`'s ``mode='row'``),
  shared by all its other axes. Nothing is rescaled beyond the mean over the
  kept branches, and the gradient reaches the kept branches only, each with
  weight ``1 / (number kept)``. Eval mode (``deterministic=True``), or local
  mode with ``rate`` concretely 0, returns the mean of all branches and needs no
  key; one branch (``n_branches == 1``) returns ``branches[0]``.

  Generator (``rng_impl``): ``'hash'`` (default): the keep flags are
  :func:`regjax.random.bernoulli_from_bits` of the key's words
  ``counter_bits(seed_words(key), (n + 1, batch))`` (rows ``0..n-1``; realised
  keep probability ``round(keep * 2**16) / 2**16``), and the fallback / global
  branch is ``(w >> 16) * n >> 16`` of row ``n`` (each branch's probability
  within ``2**-16`` of ``1 / n``, exact for ``n`` a power of two). ``'jax'``:
  ``key`` is split in two, for ``jax.random.bernoulli(k1, keep, (n, batch))``
  and ``jax.random.randint(k2, (batch,), 0, n)``.

  Args:
    branches: floating-point array ``(n_branches, batch, ...)``, ``1 <=
      n_branches <= 2**16``; float16/bfloat16 are averaged in float32 and
      rounded once.
    rate: probability of dropping each branch in local mode, in ``[0, 1]``
      (``rate == 1`` keeps one uniform branch, as ``'global'``). A traced rate is
      clipped to ``[0, 1]``; a traced NaN or +-inf gives the eval output.
    key: PRNG key; required in train mode unless no draw is needed (see above).
    mode: ``'local'`` or ``'global'``.
    deterministic: if True, return the mean of all branches.
    rng_impl: ``'hash'`` (default) or ``'jax'``.

  Returns:
    The join, shape ``branches.shape[1:]``, dtype ``branches.dtype``.
  """
  branches = cast(jax.Array, branches)  # typing only (a no-op); checked below
  op = "regjax.join_drop_path"
  rng_impl = _noise.check_rng_impl(rng_impl, op)
  deterministic, rate = _check_join(branches, rate, key, mode, deterministic, op)
  if branches.shape[0] == 1:
    return branches[0]
  if deterministic or (mode == "local" and _checks.is_concretely(rate, 0.0)):
    return _join_mean(branches)
  key = _checks.check_key(key, op)
  if mode == "global":
    return _join_constant(branches, key, mode, rng_impl, 0.0)  # the rate is unused
  if _checks.is_traced(rate):
    return _join_traced(branches, rate, key, mode, rng_impl)
  return _join_constant(branches, key, mode, rng_impl, float(rate))


def _join_kept(key, keep, n: int, batch: int, mode: str, rng_impl: str) -> jax.Array:
  """Which branches each sample keeps: bool ``(n, batch)``, at least one per sample."""
  if rng_impl == "hash":
    words = random.counter_bits(random.seed_words(key), (n + 1, batch))
    drawn = random.bernoulli_from_bits(words[:n], keep)
    choice = ((words[n] >> 16) * jnp.uint32(n)) >> 16  # < n: 16 bits times n < 2**32
  else:
    k_keep, k_choice = jax.random.split(key)
    drawn = _random.bernoulli(k_keep, keep, (n, batch))
    choice = jax.random.randint(k_choice, (batch,), 0, n)
  chosen = jnp.arange(n, dtype=choice.dtype)[:, None] == choice[None, :]
  if mode == "global":
    return chosen
  return jnp.where(jnp.any(drawn, axis=0, keepdims=True), drawn, chosen)


@jax.jit
def _join_mean(branches):
  """The eval join: the mean of all branches, in the compute dtype (one rounding)."""
  dtype = _noise.compute_dtype(branches.dtype)
  return jnp.mean(branches.astype(dtype), axis=0).astype(branches.dtype)


def _join(branches, rate, key, mode: str, rng_impl: str):
  """The train join: the mean of the kept branches (a select, so dropped ones get no gradient)."""
  n, batch = branches.shape[:2]
  dtype = _noise.compute_dtype(branches.dtype)
  keep = 1.0 - jnp.clip(jnp.asarray(rate, jnp.float32), 0.0, 1.0)
  kept = _join_kept(key, keep, n, batch, mode, rng_impl)
  kept = kept.reshape(kept.shape + (1,) * (branches.ndim - 2))
  total = jnp.sum(jnp.where(kept, branches.astype(dtype), jnp.zeros((), dtype)), axis=0)
  count = jnp.sum(kept, axis=0, dtype=jnp.int32).astype(dtype)
  return (total / count).astype(branches.dtype)


def _join_guarded(branches, rate, key, mode: str, rng_impl: str):
  """:func:`_join` for a traced rate: the eval join where the rate is NaN or +-inf."""
  finite = jnp.isfinite(rate)
  safe = jnp.where(finite, rate, jnp.zeros_like(rate))
  return jax.lax.cond(
    finite,
    lambda b, r, k: _join(b, r, k, mode, rng_impl),
    lambda b, r, k: _join_mean(b),
    branches,
    safe,
    key,
  )


_join_traced = jax.jit(_join_guarded, static_argnums=(3, 4))
_join_constant = jax.jit(
  lambda branches, key, mode, rng_impl, rate: _join(branches, rate, key, mode, rng_impl),
  static_argnums=(2, 3, 4),
)
