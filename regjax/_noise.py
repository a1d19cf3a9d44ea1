"""What every random op shares: the generator choice, the trivial cases, one compiled kernel.

An op is described by a :class:`NoiseRule` (a small frozen dataclass: static,
hashable) that says what its noise array looks like, which constants its
strength gives, and how the noise meets ``x`` -- once from hashed words
(``rng_impl='hash'``, :mod:`regjax.random`) and once from a ``jax.random``
draw (``rng_impl='jax'``). :func:`apply` runs the rule as one ``jax.jit``
computation, so an eager call compiles the very program a call under ``jit``
does, and every value is rounded alike: XLA may contract ``a * b + c`` into
one fused multiply-add, or reassociate products of constants, inside a
compiled program, which op-by-op execution would not do. A concrete strength
is compiled in as a constant (as a Python float is inside the caller's
``jit``); a traced one is an argument. A rule computes the constants of its
strength (keep, stddev, ...) with correctly rounded operations (``+ - * /
sqrt``) and without a product that feeds an addition, so constants folded
at compile time equal those computed at run time, and a traced strength gives
the same result as a constant one (tested for every op). With ``'hash'``, the
backward pass recomputes the noise from the seed words (``jax.checkpoint``)
and keeps nothing per element.

Strengths (``rate``, ``beta``, ``stddev``) that cannot be checked. A concrete
strength is range-checked at trace time against its op's range in
:mod:`regjax._specs` (a NaN, infinite or out-of-range one raises
``ValueError`` naming the argument), which also says which values need no
draw. A traced one cannot be, and follows one rule, applied here (in
:func:`apply`) for every op:

* a traced NaN or +-inf strength makes the op the identity: it returns ``x``
  unchanged, with the gradient of the identity (finite; 0 for the strength);
* a traced finite strength outside the op's range is clipped into it (each
  op's docstring gives the range; the rule's :meth:`NoiseRule.param` clips).

So a diverged or mistyped schedule never turns activations into NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import jax
import jax.numpy as jnp

from regjax import _checks, _specs, _types, random

RNG_IMPLS = _types.RNG_IMPLS


def check_rng_impl(rng_impl, op: str) -> _types.RngImpl:
  if not isinstance(rng_impl, str) or rng_impl not in RNG_IMPLS:
    raise ValueError(f"{op}: `rng_impl` must be one of {RNG_IMPLS}, got {rng_impl!r}.")
  return cast(_types.RngImpl, rng_impl)


def compute_dtype(dtype) -> jnp.dtype:
  """float16/bfloat16 are computed in float32, so the result is rounded only once."""
  return jnp.promote_types(dtype, jnp.float32)


def dropout_factor(mask, keep):
  """``1 / keep`` where ``mask`` keeps a unit, else 0.

  Multiplying by this factor (rather than dividing x and selecting) keeps the
  gradient exactly 0 where ``keep == 0``, instead of ``0 * inf = NaN``.
  """
  safe_keep = jnp.where(keep > 0, keep, 1.0)
  return jnp.where(mask, 1.0 / safe_keep, 0.0)


def check_common(x, key, deterministic, op: str) -> bool:
  """The checks every random op makes (``x``, ``deterministic``, a given ``key``)."""
  _checks.check_floating(x, op)
  deterministic = _checks.check_deterministic(deterministic, op)
  if key is not None:
    _checks.check_key(key, op)
  return deterministic


def prepare(x, key, deterministic, broadcast_dims: Sequence[int], op: str):
  """:func:`check_common` and the broadcast dims; returns ``(deterministic, broadcast_dims)``."""
  deterministic = check_common(x, key, deterministic, op)
  return deterministic, _checks.check_broadcast_dims(broadcast_dims, x.ndim, op)


def elementwise_op(
  op: str,
  spec: _specs.Strength,
  rule: type[NoiseRule],
  x: jax.Array,
  strength,
  key: jax.Array | None,
  deterministic,
  broadcast_dims: Sequence[int],
  rng_impl,
) -> jax.Array:
  """The whole of an elementwise noise op (dropout, Uout, alpha dropout, ...).

  Checks the arguments (``rng_impl``, ``x``, ``deterministic``, a given key,
  ``broadcast_dims``, then the strength by ``spec``), returns the result
  without a draw where ``spec`` gives one, and otherwise applies
  ``rule(broadcast_dims)`` with a key that must then be given.
  """
  rng_impl = check_rng_impl(rng_impl, op)
  deterministic, dims = prepare(x, key, deterministic, broadcast_dims, op)
  strength = spec.check(strength, op)
  result = spec.result_without_draw(x, strength, deterministic)
  if result is not None:
    return result
  return apply(rule(dims), x, strength, _checks.check_key(key, op), rng_impl)


@dataclasses.dataclass(frozen=True)
class NoiseRule:
  """One op's noise, static and hashable (so that :func:`apply` compiles once per op).

  Subclasses define :meth:`param` (the constants of the strength, in the
  compute dtype), :meth:`from_words` and :meth:`from_key`; the noise has
  ``x``'s shape with ``broadcast_dims`` set to 1 unless :meth:`noise_shape`
  says otherwise.
  """

  broadcast_dims: tuple[int, ...] = ()

  def noise_shape(self, shape: tuple) -> tuple:
    """``shape`` with the ``broadcast_dims`` set to 1: the axes that share one draw."""
    return tuple(1 if i in self.broadcast_dims else d for i, d in enumerate(shape))

  def param(self, strength: jax.Array):
    raise NotImplementedError

  def from_words(self, x: jax.Array, words: jax.Array, param) -> jax.Array:
    """The output (in the compute dtype) from ``x`` and the uint32 words of the noise shape."""
    raise NotImplementedError

  def from_key(self, x: jax.Array, key: jax.Array, noise_shape: tuple, param) -> jax.Array:
    """The output (in the compute dtype) with the noise drawn by ``jax.random``."""
    raise NotImplementedError


def apply(rule: NoiseRule, x: jax.Array, strength, key: jax.Array, rng_impl: str) -> jax.Array:
  """``rule`` applied to ``x`` in train mode, as one compiled computation (see the module).

  A concrete strength is part of the compiled program (a constant, as it is for a
  Python float inside the caller's ``jit``); a traced one is an argument, and a
  NaN or +-inf one returns ``x`` (the module's rule for unchecked strengths).
  """
  if _checks.is_traced(strength):
    return _apply_traced(rule, x, strength, key, rng_impl)
  return _apply_constant(rule, x, key, rng_impl, float(strength))


def _apply(rule: NoiseRule, x: jax.Array, strength, key: jax.Array, rng_impl: str) -> jax.Array:
  dtype = compute_dtype(x.dtype)
  param = rule.param(jnp.asarray(strength, dtype))
  noise_shape = rule.noise_shape(x.shape)
  if rng_impl == "jax":
    return rule.from_key(x.astype(dtype), key, noise_shape, param).astype(x.dtype)

  @jax.checkpoint  # the backward recomputes the words: its residuals are seed and param
  def fused(x, param, seed):
    words = random.counter_bits(seed, noise_shape)
    return rule.from_words(x.astype(dtype), words, param).astype(x.dtype)

  return fused(x, param, random.seed_words(key))


def _apply_guarded(
  rule: NoiseRule, x: jax.Array, strength, key: jax.Array, rng_impl: str
) -> jax.Array:
  """:func:`_apply` for a traced strength: ``x`` itself where it is NaN or +-inf (see the module).

  A scalar ``lax.cond``, not an elementwise select: the noise branch is compiled
  as it is without the guard (a select fused into it may change whether XLA
  contracts ``a * x + b`` into a multiply-add, and so the last bit), and it does
  not run for a non-finite strength. Under ``vmap`` the cond becomes a select
  that evaluates both branches, so the noise branch gets a stand-in strength of
  0 there: no NaN reaches the output or, through the unselected branch, the
  gradient.
  """
  finite = jnp.isfinite(strength)
  safe = jnp.where(finite, strength, jnp.zeros_like(strength))
  return jax.lax.cond(
    finite, lambda x, s, k: _apply(rule, x, s, k, rng_impl), lambda x, s, k: x, x, safe, key
  )


_apply_traced = jax.jit(_apply_guarded, static_argnums=(0, 4))
_apply_constant = jax.jit(
  lambda rule, x, key, rng_impl, strength: _apply(rule, x, strength, key, rng_impl),
  static_argnums=(0, 3, 4),
)
