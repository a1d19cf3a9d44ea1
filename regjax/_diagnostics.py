"""Framework-neutral parts of :mod:`regjax.diagnostics`.

What both the linen and the NNX diagnostics share: :class:`LayerShift`, the
per-call moments of a BatchNorm input, their exact float64 pooling over
batches (Chan et al.'s parallel formula), the input of a batch, the numbering
of BatchNorm calls while a forward pass is traced, and a cache of compiled
captures that holds the user's function only weakly. Nothing here imports Flax.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import jax.numpy as jnp
import numpy as np

from regjax import normalization
from regjax._checks import canonical_axes

__all__ = ["LayerShift"]

BNTypes = Iterable[type] | type | None
# One BatchNorm call: (path, count, mean, m2), count a number or per feature.
Record = tuple[str, Any, Any, Any]
# Pooled per path: [count, mean, m2], float64.
Pooled = dict[str, list[np.ndarray]]

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class LayerShift:
  """Train/eval statistics of one BatchNorm layer's input, per feature (float64)."""

  moving_mean: np.ndarray
  moving_var: np.ndarray
  real_mean: np.ndarray
  real_var: np.ndarray
  count: int  # values per feature that entered real_mean / real_var

  @property
  def delta(self) -> np.ndarray:
    """``real_var / moving_var``: the variance ratio eval/train (``< 1`` after dropout)."""
    return self.real_var / self.moving_var

  @property
  def shift(self) -> np.ndarray:
    """``max(real/moving, moving/real)`` per feature (the paper's measure, ``>= 1``)."""
    return np.maximum(self.delta, 1.0 / self.delta)

  @property
  def mean_shift(self) -> float:
    return float(np.mean(self.shift))

  @property
  def max_shift(self) -> float:
    return float(np.max(self.shift))


# --------------------------------------------------------------------------
# Arguments.


def forms(op: str) -> str:
  """The two call forms, for the error messages of a call that fits neither."""
  return (
    f"`{op}(apply_fn, variables, batches, *, bn_types=None)` for a Flax linen model, or "
    f"`{op}(model, batches, *, call=None, bn_types=None)` for an nnx.Module"
  )


def bn_type_tuple(bn_types: BNTypes, op: str) -> tuple[type, ...] | None:
  """``bn_types`` as a hashable tuple of classes (None keeps the default)."""
  if bn_types is None:
    return None
  found = (bn_types,) if isinstance(bn_types, type) else tuple(bn_types)
  if not found or not all(isinstance(t, type) for t in found):
    raise TypeError(
      f"{op}: `bn_types` must be a class or a non-empty iterable of classes; got {bn_types!r}."
    )
  return found


def input_of(batch: Any) -> Any:
  """The model input of a batch: an array, ``batch[0]`` of a tuple/list, or ``batch['x']``."""
  if isinstance(batch, (tuple, list)):
    return batch[0]
  if isinstance(batch, Mapping):
    if "x" not in batch:
      raise ValueError(f"a dict batch needs its input under 'x'; got keys {sorted(batch)}.")
    return batch["x"]
  return batch


def has_running_stats(bn: Any) -> bool:
  """False for a BatchNorm made with ``track_running_stats=False``: it normalizes with
  the batch statistics in every mode, so it has no running statistics to compare
  or re-estimate, and the diagnostics leave it alone (no record, no update)."""
  return getattr(bn, "track_running_stats", True) is not False


NO_RUNNING_STATS_NOTE = (
  " BatchNorm layers with track_running_stats=False have no running statistics and are skipped."
)


# --------------------------------------------------------------------------
# Statistics of one call.


def moments(value: Any, axis: Any) -> tuple[int, Any, Any]:
  """``(count, mean, m2)`` per feature of a BN input: ``m2 = sum((x - mean)**2)``
  over every non-feature axis (two-pass, so ``|mean| >> std`` stays exact enough
  to pool in float64 later)."""
  axes = canonical_axes(axis, value.ndim, "variance_shift")
  reduce = tuple(a for a in range(value.ndim) if a not in axes)
  value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
  mean = jnp.mean(value, reduce)
  m2 = jnp.sum(jnp.square(value - jnp.mean(value, reduce, keepdims=True)), reduce)
  count = int(np.prod([value.shape[a] for a in reduce]))
  return count, mean, m2


def selected_count(value: Any, axis: Any, mask: Any) -> Any:
  """Per-feature number of values entering a BN's batch statistics (float32)."""
  axes = canonical_axes(axis, value.ndim, "recalibrate_batch_stats")
  reduce = tuple(a for a in range(value.ndim) if a not in axes)
  if mask is None:
    n = int(np.prod([value.shape[a] for a in reduce]))
    return jnp.full(tuple(value.shape[a] for a in axes), n, jnp.float32)
  return jnp.sum(jnp.broadcast_to(mask, value.shape), reduce, dtype=jnp.float32)


def normalize_with_batch_stats(
  x: Any, stats: Any, scale: Any, bias: Any, *, epsilon: float, axis: Any, mask: Any, dtype: Any
) -> tuple[Any, Any, Any, Any]:
  """``(y, count, mean, m2)``: a BN's output on batch statistics, and those
  statistics (``momentum=0``: the "updated" running statistics are this
  batch's, biased; the layer's convention is applied once, after pooling)."""
  y, batch = normalization.batch_norm(
    x,
    stats,
    scale,
    bias,
    deterministic=False,
    momentum=0.0,
    epsilon=epsilon,
    axis=axis,
    mask=mask,
    dtype=normalization.output_dtype(x, scale, bias, dtype),
  )
  count = selected_count(x, axis, mask)
  return y, count, batch["mean"], batch["var"].astype(jnp.float32) * count


# --------------------------------------------------------------------------
# Pooling over calls and batches.


def pool_moments(records: Iterable[Record]) -> Pooled:
  """Pools ``(path, count, mean, m2)`` records per path exactly, in float64
  (Chan et al.'s parallel formula): ``n = n_a + n_b``, ``mean = mean_a + d *
  n_b / n``, ``m2 = m2_a + m2_b + d**2 * n_a * n_b / n`` with ``d = mean_b -
  mean_a``. ``count`` is a number or per feature: every sample weighs the
  same however the data is split into batches (e.g. a last batch of 1), and a
  feature with count 0 in a call (masked out) gets no weight from it."""
  pooled: Pooled = {}
  for path, count, mean, m2 in records:
    count = np.asarray(count, np.float64)
    mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
    mean, m2 = np.where(count > 0, mean, 0.0), np.where(count > 0, m2, 0.0)
    if path not in pooled:
      pooled[path] = [count, mean, m2]
      continue
    n_a, mean_a, m2_a = pooled[path]
    n = n_a + count
    safe = np.maximum(n, 1.0)
    delta = np.where(count > 0, mean - mean_a, 0.0)
    pooled[path] = [n, mean_a + delta * count / safe, m2_a + m2 + delta**2 * n_a * count / safe]
  return pooled


def layer_shifts(pooled: Pooled, moving: Mapping[str, tuple[Any, Any]]) -> dict[str, LayerShift]:
  """``{path: LayerShift}`` from the pooled eval-mode moments and the running
  ``(mean, var)`` per path: ``real_var = m2 / n`` (the population variance)."""
  return {
    path: LayerShift(
      moving_mean=np.asarray(moving[path][0], np.float64),
      moving_var=np.asarray(moving[path][1], np.float64),
      real_mean=mean,
      real_var=m2 / n,
      count=int(n),
    )
    for path, (n, mean, m2) in pooled.items()
  }


def pooled_stats(
  pooled_entry: list[np.ndarray], old_mean: Any, old_var: Any, unbiased: bool
) -> tuple[Any, Any]:
  """``(mean, var)`` from a pooled ``[count, mean, m2]``, in the layer's
  convention (biased, or ``m2 / (n - 1)`` for ``unbiased_running_var``) and the
  old statistics' dtypes; a feature no sample reached keeps its old values."""
  n, mean, m2 = pooled_entry
  divisor = np.where(n > 1, n - 1, np.maximum(n, 1.0)) if unbiased else np.maximum(n, 1.0)
  var = m2 / divisor
  old_mean_np = np.asarray(old_mean, np.float64)
  old_var_np = np.asarray(old_var, np.float64)
  mean = np.where(n > 0, mean, old_mean_np)
  var = np.where(n > 0, var, old_var_np)
  return (
    jnp.asarray(mean, jnp.asarray(old_mean).dtype),
    jnp.asarray(var, jnp.asarray(old_var).dtype),
  )


# --------------------------------------------------------------------------
# Call order while tracing.

# A counter of BatchNorm calls, set only while a capture is traced: the index
# of each call is baked into the compiled capture (a static number in linen's
# callbacks, a returned value in NNX's records), so records can be put back
# in call order on a jit cache hit too.
_CALL_INDEX: contextvars.ContextVar[Iterator[int] | None] = contextvars.ContextVar(
  "regjax_bn_call_index", default=None
)


@contextlib.contextmanager
def numbered_calls() -> Iterator[None]:
  """Numbers the BatchNorm calls traced inside the block 0, 1, 2, ..."""
  token = _CALL_INDEX.set(itertools.count())
  try:
    yield
  finally:
    _CALL_INDEX.reset(token)


def next_call_index() -> int:
  """This BatchNorm call's position in the traced forward pass (0 outside one)."""
  counter = _CALL_INDEX.get()
  return next(counter) if counter is not None else 0


# --------------------------------------------------------------------------
# Compiled captures, cached without keeping the user's function alive.


class WeakCache(Generic[_T]):
  """One value per ``(fn, key)``, kept only while ``fn`` lives.

  ``lru_cache`` would keep every function it saw alive, with whatever arrays
  its closure holds, for the whole process. Here ``fn`` is held weakly and
  ``build(resolve)`` gets ``resolve()``, which returns ``fn`` while it
  lives, so the cached value never holds ``fn`` itself. A bound method (a new
  object on every attribute access, e.g. ``model.apply``) is held through its
  ``__self__``, so passing ``model.apply`` again finds the same entry. A
  function that cannot be held weakly or hashed is not cached. At most
  ``per_fn`` keys per function are kept (the oldest is dropped first).
  """

  def __init__(self, per_fn: int = 64):
    self._per_fn = per_fn
    self._entries: weakref.WeakKeyDictionary[Any, dict[Hashable, _T]] = weakref.WeakKeyDictionary()

  def get(
    self, fn: Callable[..., Any], key: Hashable, build: Callable[[Callable[[], Any]], _T]
  ) -> _T:
    owner, func = (fn.__self__, fn.__func__) if isinstance(fn, types.MethodType) else (fn, None)
    entry_key = (func, key)
    try:
      ref = weakref.ref(owner)
      entries = self._entries.setdefault(owner, {})
      hash(entry_key)
    except TypeError:
      return build(lambda: fn)
    if entry_key not in entries:
      if len(entries) >= self._per_fn:
        entries.pop(next(iter(entries)))
      entries[entry_key] = build(ref if func is None else lambda: types.MethodType(func, ref()))
    return entries[entry_key]
