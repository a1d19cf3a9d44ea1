"""What every regjax NNX noise module shares: its checks, its stream, its mode, its key.

A module's constructor keeps its own signature (``flax.nnx.Dropout``'s, so
that it is a drop-in) and checks its strength with the op's spec
(:mod:`regjax._specs`, the bounds the op itself applies); its ``__call__``
hands the op, the spec and its arguments to :meth:`NoiseModule._call_noise`.

Conventions of ``flax.nnx.Dropout`` (flax 0.12): the constructor takes
``deterministic`` (default ``False``), ``rng_collection`` (default
``'dropout'``) and ``rngs``, and keeps ``rngs[rng_collection].fork()`` as the
attribute ``rngs``; ``__call__(x, *, deterministic=None, rngs=None)`` prefers
the call's values; ``set_view(deterministic)`` serves ``nnx.view``, and
``model.train()`` / ``model.eval()`` set the ``deterministic`` attribute.

One deliberate difference: ``nnx.Rngs.__getitem__`` falls back to the
``'default'`` stream for a missing name, so flax draws dropout masks from
``nnx.Rngs(0)``'s only stream. regjax never draws from a stream other than
``rng_collection``: a module built from an ``nnx.Rngs`` without it keeps no
stream, and a train-mode call then raises a ``ValueError`` naming the stream.

A rate given as a JAX scalar (``Dropout(jnp.float32(0.1))``) is pytree data:
it is traced under ``nnx.jit`` and can be reassigned (``module.rate =
jnp.float32(0.2)``) without recompiling, so a schedule costs one compilation.
A Python-float rate is static, as in flax: changing it recompiles.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.typing import ArrayLike

from regjax import _checks, _noise, _specs
from regjax._types import RngImpl

RngsArg = nnx.Rngs | nnx.RngStream | jax.Array | None


def own_stream(module_name: str, rngs, rng_collection: str):
  """The stream a module keeps: a fork of ``rngs[rng_collection]``, or None."""
  if isinstance(rngs, nnx.Rngs):
    return rngs[rng_collection].fork() if rng_collection in rngs else None
  if isinstance(rngs, nnx.RngStream):
    return rngs.fork()
  if rngs is None:
    return None
  raise TypeError(
    f"{module_name}: `rngs` must be an nnx.Rngs, an nnx.RngStream or None; got "
    f"{type(rngs).__name__}."
  )


def hashable(value):
  """Lists as tuples: static attributes are part of nnx's (hashed) graph definition."""
  return tuple(value) if isinstance(value, list) else value


class NoiseModule(nnx.Module):
  """Base of the regjax NNX noise modules (not exported)."""

  def _op_name(self) -> str:
    return f"regjax.nnx.{type(self).__name__}"

  def _strength(self, spec: _specs.Strength, value):
    """``value`` checked against ``spec`` and returned as given.

    Not converted: a JAX scalar stays pytree data (traced under ``nnx.jit``).
    """
    spec.check(value, self._op_name())
    return value

  def _rng_impl(self, rng_impl) -> RngImpl:
    return _noise.check_rng_impl(rng_impl, self._op_name())

  def _init_noise(
    self, deterministic: bool | None, rng_collection: str, rngs: nnx.Rngs | nnx.RngStream | None
  ) -> None:
    name = type(self).__name__
    if not isinstance(rng_collection, str):
      raise TypeError(f"{name}: `rng_collection` must be a str; got {rng_collection!r}.")
    if deterministic is not None:
      _checks.check_deterministic(deterministic, self._op_name())
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    self.rngs = nnx.data(own_stream(name, rngs, rng_collection))

  def set_view(self, deterministic: bool | None = None):
    """Class method used by ``nnx.view``.

    Args:
      deterministic: if True, no noise is applied (eval mode).
    """
    if deterministic is not None:
      _checks.check_deterministic(deterministic, self._op_name())
      self.deterministic = deterministic

  def _deterministic(self, deterministic: bool | None) -> bool:
    """The call's ``deterministic`` if given, else the attribute (as ``nnx.Dropout``)."""
    value = deterministic if deterministic is not None else self.deterministic
    if value is None:
      raise ValueError(
        f"{type(self).__name__}: no `deterministic` value: pass it to the constructor, "
        "at call, or switch the model with model.train() / model.eval() or "
        "nnx.view(model, deterministic=...)."
      )
    return _checks.check_deterministic(value, self._op_name())

  def _key(self, deterministic: bool, rngs: RngsArg, trivial: bool):
    """The key for a train-mode draw, or None where no draw is made.

    Precedence as in ``nnx.Dropout``: ``rngs`` given at call (a key, an
    ``RngStream`` or an ``Rngs``), then the stream kept since construction.
    """
    if deterministic or trivial:
      return None
    name, collection = type(self).__name__, self.rng_collection
    if rngs is None:
      rngs = self.rngs
    if isinstance(rngs, nnx.Rngs):
      if collection not in rngs:
        raise ValueError(
          f"{name} in train mode (deterministic=False) needs the '{collection}' PRNG "
          f"stream, but the nnx.Rngs passed at call has only {sorted(rngs)}. Pass "
          f"`nnx.Rngs({collection}=seed)`. (regjax never falls back to the 'default' "
          "stream.)"
        )
      return rngs[collection]()
    if isinstance(rngs, nnx.RngStream):
      return rngs()
    if rngs is None:
      # Starts with flax's own message, which flax's tests match.
      raise ValueError(
        f"`deterministic` is False, but no `rngs` argument was provided to {name} "
        "as either a __call__ argument or class attribute. "
        f"{name} in train mode (deterministic=False) needs the '{collection}' PRNG "
        f"stream: construct it with `rngs=nnx.Rngs({collection}=seed)` (or "
        f"`nnx.Rngs(seed, {collection}=seed2)`; a plain nnx.Rngs(seed) has only the "
        f"'default' stream, which regjax does not fall back to), pass `rngs=key` at "
        "call, or set deterministic=True / call model.eval()."
      )
    if isinstance(rngs, jax.Array):
      return rngs  # validated by the functional core
    raise TypeError(
      f"{name}: `rngs` at call must be a PRNG key, an nnx.RngStream or an nnx.Rngs; "
      f"got {type(rngs).__name__}."
    )

  def _call_noise(
    self,
    op: Callable[..., jax.Array],
    spec: _specs.Strength,
    strength,
    inputs: ArrayLike,
    deterministic: bool | None,
    rngs: RngsArg,
    **kwargs,
  ) -> jax.Array:
    """``op(inputs, strength, key=..., deterministic=..., **kwargs)`` for this module.

    ``deterministic`` and the key as :meth:`_deterministic` and :meth:`_key`
    give them; no key is asked for where ``spec`` says the strength needs no draw.
    """
    deterministic = self._deterministic(deterministic)
    key = self._key(deterministic, rngs, spec.needs_no_draw(strength))
    return op(inputs, strength, key=key, deterministic=deterministic, **kwargs)
