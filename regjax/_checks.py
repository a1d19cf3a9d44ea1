"""Argument checks shared by the functional core.

Every check runs at trace time: it looks only at Python values, shapes and
dtypes, never at the contents of a traced array, so it costs nothing inside
``jit``. A rate that is itself traced cannot be range-checked here; the ops
clip a finite one into their valid range (documented on each op) and return
``x`` for a NaN or infinite one (see :mod:`regjax._noise`), so a schedule can
never produce NaN.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import TypeGuard

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(value) -> TypeGuard[jax.core.Tracer]:
  return isinstance(value, jax.core.Tracer)


def is_concretely(value, *targets) -> bool:
  """Whether a rate is a concrete (untraced) scalar equal to one of ``targets``.

  :class:`regjax._specs.Strength` uses it to tell which values need no draw
  (and no key); anything that is not a concrete real scalar answers False and
  is reported by the op.
  """
  if is_traced(value):
    return False
  try:
    return float(value) in targets
  except (TypeError, ValueError):
    return False


def resolve_deterministic_alias(
  deterministic: bool | None, use_running_average: bool | None, where: str
) -> bool | None:
  """Merges BatchNorm's ``deterministic`` with its flax alias ``use_running_average``."""
  if deterministic is None:
    return use_running_average
  if use_running_average is not None and bool(use_running_average) != bool(deterministic):
    raise ValueError(
      f"BatchNorm: `deterministic={deterministic}` and its alias "
      f"`use_running_average={use_running_average}` disagree ({where}); pass one."
    )
  return deterministic


def check_floating(x, op: str, name: str = "x") -> None:
  dtype = getattr(x, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f"{op}: `{name}` must be a floating-point array "
      f"(float16, bfloat16, float32 or float64); got {dtype or type(x).__name__}."
    )


def check_deterministic(deterministic, op: str) -> bool:
  """Returns ``deterministic`` as a Python bool; it selects code at trace time.

  The one check of ``deterministic`` for the pure ops and the linen and NNX
  modules: a traced value (a jitted argument) cannot choose between the noise
  path and the identity while the function is being traced.
  """
  if is_traced(deterministic):
    raise TypeError(
      f"{op}: `deterministic` must be a Python bool (concrete), not a traced value "
      f"({type(deterministic).__name__}): it selects the code path (noise or "
      "identity) at trace time, so it cannot be an argument of a jitted function. "
      "Mark it static (jax.jit(f, static_argnums=...) / static_argnames="
      "'deterministic', or nn.jit / nnx.jit with static_argnums), or trace both "
      "modes and pick one with jax.lax.cond."
    )
  if not isinstance(deterministic, (bool, np.bool_)):
    raise TypeError(f"{op}: `deterministic` must be a bool; got {deterministic!r}.")
  return bool(deterministic)


@functools.cache
def _raw_key_shape(default_impl: str) -> tuple[int, ...]:
  """Shape of the raw key data of jax's default PRNG impl ((2,) for threefry)."""
  del default_impl  # the cache key
  return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def check_key(key: jax.Array | None, op: str) -> jax.Array:
  """Returns ``key`` if it is a typed key (``jax.random.key``, any impl) or a raw key of the
  default impl; raises otherwise (also for None: train mode needs a key).

  A raw key is a uint32 array of the default impl's key shape ((2,) for
  threefry, from ``jax.random.PRNGKey``); raw data of another impl (rbg's
  shape (4,)) would be misread as threefry, so it must be wrapped first.
  """
  if key is None:
    raise ValueError(
      f"{op}: train mode (deterministic=False) needs a PRNG key: pass "
      "`key=jax.random.key(...)`, or set `deterministic=True` for eval."
    )
  dtype = getattr(key, "dtype", None)
  shape = getattr(key, "shape", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if shape != ():
      raise ValueError(
        f"{op}: `key` must be a single PRNG key (shape ()); got a batch of shape "
        f"{shape}. Use jax.vmap over the op to apply many keys."
      )
    return key
  default_impl = str(getattr(jax.config, "jax_default_prng_impl", "threefry2x32"))
  raw_shape = _raw_key_shape(default_impl)
  if dtype == jnp.uint32 and shape is not None and tuple(shape) == raw_shape:
    return key
  accepted = (
    "a PRNG key: a typed key from jax.random.key(seed) (any impl), or a raw "
    f"{default_impl} key, a uint32 array of shape {raw_shape} "
    "from jax.random.PRNGKey(seed)"
  )
  if dtype == jnp.uint32 and shape is not None and len(shape) >= 1:
    raise TypeError(
      f"{op}: `key` must be {accepted}; got a raw uint32 array of shape {shape}, "
      "which is not a key of jax's default PRNG impl. Raw key data of another impl "
      "must be wrapped into a typed key first, e.g. "
      "`jax.random.wrap_key_data(data, impl='rbg')` for rbg data (shape (4,)), or "
      "create the key with jax.random.key(seed, impl='rbg'). For many keys, "
      "jax.vmap over the op."
    )
  raise TypeError(
    f"{op}: `key` must be {accepted}; got {type(key).__name__} "
    f"with dtype {dtype} and shape {shape}."
  )


def check_rate(
  value,
  op: str,
  name: str,
  *,
  low: float,
  high: float,
  high_inclusive: bool,
  low_inclusive: bool = True,
) -> float | jax.Array:
  """Validates a scalar rate.

  Concrete values (Python numbers, NumPy or concrete JAX scalars) must lie in
  ``[low, high]`` (``(low`` where not ``low_inclusive``, ``high)`` where not
  ``high_inclusive``) and are returned as a Python float.
  Traced scalars are returned unchanged: the op clips a finite one into its
  range and returns ``x`` for a NaN or infinite one (the rule of
  :mod:`regjax._noise`).
  """
  shape = np.shape(value)
  if shape != ():
    raise ValueError(f"{op}: `{name}` must be a scalar; got shape {shape}.")
  if is_traced(value):
    if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(
      value.dtype, jnp.integer
    ):
      raise TypeError(f"{op}: `{name}` must be a real number; got dtype {value.dtype}.")
    return value
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (numbers.Real, np.ndarray, np.generic, jax.Array)
  ):
    raise TypeError(f"{op}: `{name}` must be a real number; got {value!r}.")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{op}: `{name}` must be a real number; got {value!r}.") from None
  lower, upper = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
  below = number < low if low_inclusive else number <= low
  above = number > high if high_inclusive else number >= high
  if math.isnan(number) or below or above:
    raise ValueError(f"{op}: `{name}` must be in {lower}{low:g}, {high:g}{upper}; got {value!r}.")
  return number


def check_broadcast_dims(broadcast_dims: Sequence[int], ndim: int, op: str) -> tuple[int, ...]:
  if isinstance(broadcast_dims, int):
    broadcast_dims = (broadcast_dims,)
  dims = []
  for dim in broadcast_dims:
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool):
      raise TypeError(f"{op}: `broadcast_dims` must hold ints; got {dim!r}.")
    if not -ndim <= dim < ndim:
      raise ValueError(
        f"{op}: `broadcast_dims` entry {dim} is out of range for an input of "
        f"rank {ndim}; accepted range is [{-ndim}, {ndim - 1}]."
      )
    dims.append(int(dim) % ndim)
  return tuple(sorted(set(dims)))


def canonical_axes(axis, ndim: int, op: str, name: str = "axis") -> tuple[int, ...]:
  if isinstance(axis, (int, np.integer)):
    axes: tuple = (axis,)
  elif isinstance(axis, (tuple, list)):
    axes = tuple(axis)
  else:
    raise TypeError(f"{op}: `{name}` must be an int or a tuple of ints; got {axis!r}.")
  out = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
      raise TypeError(f"{op}: `{name}` must be an int or a tuple of ints; got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
        f"{op}: `{name}`={axis!r} is out of range for an input of rank {ndim}; "
        f"accepted range is [{-ndim}, {ndim - 1}]."
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{op}: `{name}`={axis!r} repeats an axis.")
  if not out:
    raise ValueError(f"{op}: `{name}` must name at least one feature axis.")
  return tuple(sorted(out))


def check_epsilon(epsilon, op: str) -> float:
  """BatchNorm's ``epsilon``: a finite Python or NumPy number ``> 0``, returned as a float."""
  is_number = isinstance(epsilon, (int, float, np.integer, np.floating)) and not isinstance(
    epsilon, (bool, np.bool_)
  )
  if is_traced(epsilon) or not is_number or not (epsilon > 0 and math.isfinite(epsilon)):
    raise ValueError(
      f"{op}: `epsilon` must be a finite Python or NumPy number > 0; got {epsilon!r}."
    )
  return float(epsilon)
