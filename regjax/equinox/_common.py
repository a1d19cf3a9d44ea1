"""What every regjax Equinox noise module shares: its mode and its key.

Conventions of ``equinox.nn.Dropout`` (equinox 0.13): a module is an
``eqx.Module`` (a frozen dataclass and a pytree) with a field
``inference: bool = False``; ``__call__(x, *, key=None, inference=None)``
prefers the call's ``inference`` to the field's; ``eqx.nn.inference_mode(model)``
sets every ``inference`` field of a model at once. The noise is drawn from
the ``key`` given at the call, one key per call: the caller splits keys (one
per layer and step, and one per example under ``jax.vmap``), as for
``eqx.nn.Dropout``.

A module acts on whatever array it is given: called per example under
``jax.vmap``, each example gets its own draw from its own key; called on a
batch, the op's own batch semantics hold (e.g. :func:`regjax.drop_path` draws
one value per row of axis 0).

Strength fields (``p``, ``rate``, ``beta``, ...) are ordinary fields, as in
``eqx.nn.Dropout``: a Python float is static under ``eqx.filter_jit``, a JAX
scalar is traced (a schedule compiles once; ``eqx.tree_at`` replaces it).
Layout options (``broadcast_dims``, ``rng_impl``, ...) are static fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from regjax import _checks, _noise, _specs


def op_name(module: Any) -> str:
  return f"regjax.equinox.{type(module).__name__}"


def resolve_inference(module: Any, inference: bool | None) -> bool:
  """The call's ``inference`` if given, else the field (as ``eqx.nn.Dropout``), as a bool.

  A traced value cannot choose the code path at trace time, so it raises.
  """
  value = module.inference if inference is None else inference
  if _checks.is_traced(value):
    raise TypeError(
      f"{op_name(module)}: `inference` must be a Python bool (concrete), not a traced "
      "value: it selects the code path (noise or identity) at trace time. Keep it a "
      "field of the module (static under eqx.filter_jit; switch it with "
      "eqx.nn.inference_mode) or pass a Python bool at call."
    )
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{op_name(module)}: `inference` must be a bool; got {value!r}.")
  return bool(value)


def noise_key(module: Any, inference: bool, key: jax.Array | None, trivial: bool):
  """The key for a training-mode draw, or None where no draw is made.

  ``trivial`` says that the strength needs no draw
  (:meth:`regjax._specs.Strength.needs_no_draw`). A missing key raises a
  ``RuntimeError``, the error ``eqx.nn.Dropout`` raises.
  """
  if inference or trivial:
    return None
  if key is None:
    raise RuntimeError(
      f"{op_name(module)} in training mode (inference=False) needs a key: pass "
      "`key=jax.random.key(...)` at the call (split a fresh one per layer and step, "
      "and per example under jax.vmap), or switch to inference mode with "
      "`inference=True` or eqx.nn.inference_mode(model)."
    )
  return key


def apply_noise(
  module: Any,
  op: Callable[..., jax.Array],
  spec: _specs.Strength,
  strength: Any,
  x: jax.Array,
  inference: bool | None,
  key: jax.Array | None,
  **kwargs: Any,
) -> jax.Array:
  """``op(x, strength, key=..., deterministic=inference, **kwargs)`` for ``module``."""
  inference = resolve_inference(module, inference)
  key = noise_key(module, inference, key, spec.needs_no_draw(strength))
  return op(x, strength, key=key, deterministic=inference, **kwargs)


def check_init(module: Any, spec: _specs.Strength | None, strength: Any) -> None:
  """Construction-time checks: the strength (concrete values) and the mode flag."""
  if spec is not None:
    spec.check(strength, op_name(module))
  if not isinstance(module.inference, (bool, np.bool_)) and not _checks.is_traced(module.inference):
    raise TypeError(f"{op_name(module)}: `inference` must be a bool; got {module.inference!r}.")
  rng_impl = getattr(module, "rng_impl", None)
  if rng_impl is not None:
    _noise.check_rng_impl(rng_impl, op_name(module))


def hashable(value: Any) -> Any:
  """Lists as tuples: static fields are hashed as part of the pytree structure."""
  return tuple(value) if isinstance(value, list) else value
