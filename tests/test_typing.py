"""The type hints of the public API: each string option is a Literal of exactly the values the
op accepts at run time, and a type checker rejects a wrong one (mypy on a small snippet)."""

import inspect
import textwrap
import types
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import regjax
import regjax.linen as L
import regjax.nnx as N
from regjax import _types

X4 = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
X5 = jnp.linspace(-1.0, 1.0, 2 * 2 * 4 * 4 * 3).reshape(2, 2, 4, 4, 3)
KEY = jax.random.key(0)
KERNEL = jnp.ones((3, 2))


def _hints(obj) -> dict:
  """``typing.get_type_hints`` of a function, a linen module's fields or an NNX constructor."""
  if isinstance(obj, type):
    if issubclass(obj, nn.Module):
      return {
        name: hint
        for name, hint in typing.get_type_hints(obj, localns={"optax": optax}).items()
        if name in inspect.signature(obj).parameters
      }
    obj = obj.__init__
  return typing.get_type_hints(obj, localns={"optax": optax})


def _literal_values(hint) -> set:
  """The values of the Literal(s) in ``hint`` (``Literal[...]`` or a union containing one)."""
  if typing.get_origin(hint) is typing.Literal:
    return set(typing.get_args(hint))
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return set().union(*(_literal_values(a) for a in typing.get_args(hint)))
  return set()


def _public():
  """Every public function and module class of regjax, regjax.random, regjax.linen, regjax.nnx."""
  found = {}
  for module in (regjax, regjax.random, L, N):
    names = getattr(module, "__all__", None) or [
      n
      for n, v in vars(module).items()
      if inspect.isfunction(v) and v.__module__ == module.__name__
    ]
    for name in names:
      obj = getattr(module, name)
      if inspect.isfunction(obj) or inspect.isclass(obj) and name != "BatchStats":
        found[f"{module.__name__}.{name}"] = obj
  return found


PUBLIC = _public()

# Free-form string arguments (any name a user picks).
FREE_STRINGS = {"rng_collection"}


def _str_params(obj):
  target = obj.__init__ if isinstance(obj, type) and not issubclass(obj, nn.Module) else obj
  for name, param in inspect.signature(target).parameters.items():
    if isinstance(param.default, str) and name not in FREE_STRINGS:
      yield name


def test_public_hints_resolve():
  # Every annotation names something importable (an editor and mkdocstrings can show it).
  assert len(PUBLIC) > 40
  for obj in PUBLIC.values():
    _hints(obj)


# One alias per option; a call that reaches the op's run-time check of the value.
OPTIONS = {
  "rng_impl": (
    _types.RngImpl,
    lambda v: regjax.dropout(X4, 0.5, key=KEY, deterministic=True, rng_impl=v),
  ),
  "drop_path mode": (
    _types.DropPathMode,
    lambda v: regjax.drop_path(X4, 0.5, key=KEY, deterministic=True, mode=v),
  ),
  "join_drop_path mode": (
    _types.JoinMode,
    lambda v: regjax.join_drop_path(X4, 0.5, key=KEY, deterministic=True, mode=v),
  ),
  "drop_path_rates convention": (
    _types.DropPathConvention,
    lambda v: regjax.drop_path_rates(4, 0.2, convention=v),
  ),
  "cutout data_format": (
    _types.DataFormat,
    lambda v: regjax.cutout(X4, 2, key=KEY, deterministic=True, data_format=v),
  ),
  "dropblock data_format": (
    _types.BlockDataFormat,
    lambda v: regjax.dropblock(
      X4 if v in ("NHWC", "NCHW") else X5,
      0.3,
      key=KEY,
      deterministic=True,
      block_size=2,
      data_format=v,
    ),
  ),
  "fill": (
    _types.RandomFill,
    lambda v: regjax.cutout(X4, 2, key=KEY, deterministic=True, fill=v),
  ),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_literal_values_are_exactly_the_accepted_ones(option):
  alias, call = OPTIONS[option]
  for value in typing.get_args(alias):
    call(value)  # accepted
  for wrong in ("threefry", "nhwc", "Random", ""):
    with pytest.raises(ValueError):
      call(wrong)


# The alias a string option's hint must be: by parameter, or by (parameter, op) where ops differ.
ALIAS = {
  "rng_impl": _types.RngImpl,
  "convention": _types.DropPathConvention,
  **{("mode", op): _types.DropPathMode for op in ("drop_path", "DropPath")},
  **{("mode", op): _types.JoinMode for op in ("join_drop_path", "JoinDropPath")},
  **{("data_format", op): _types.BlockDataFormat for op in ("dropblock", "DropBlock")},
  **{
    ("data_format", op): _types.DataFormat
    for op in ("cutout", "Cutout", "random_erasing", "RandomErasing")
  },
}


@pytest.mark.parametrize("name", sorted(n for n, o in PUBLIC.items() if list(_str_params(o))))
def test_every_string_option_is_its_literal(name):
  # A string option is hinted by its alias from regjax._types, the definition its run-time
  # check also reads; a new option without a Literal fails here.
  obj, short = PUBLIC[name], name.rsplit(".", 1)[1]
  hints = _hints(obj)
  for param in _str_params(obj):
    alias = ALIAS.get((param, short), ALIAS.get(param))
    assert alias is not None, f"{name}({param}=...): no Literal alias for this string option"
    assert _literal_values(hints[param]) == set(typing.get_args(alias)), (name, param)
  if "fill" in hints:
    assert hints["fill"] == _types.Fill, name


def test_runtime_tuples_are_the_literals():
  from regjax import _noise, structured

  assert _noise.RNG_IMPLS == typing.get_args(_types.RngImpl) == ("hash", "jax")
  assert structured._DROP_PATH_MODES == ("row", "batch")
  assert structured._JOIN_MODES == ("local", "global")
  formats = structured._DATA_FORMATS + structured._DATA_FORMATS_3D
  assert formats == typing.get_args(_types.BlockDataFormat)


def test_array_arguments_accept_numpy():
  hints = _hints(regjax.dropout)
  assert hints["x"] == jax.typing.ArrayLike and hints["return"] is jax.Array
  assert hints["key"] == jax.Array | None
  bn = _hints(regjax.batch_norm)
  assert bn["batch_stats"] == regjax.BatchStats | None
  assert _hints(regjax.batch_renorm)["batch_stats"] is regjax.BatchStats
  assert _hints(regjax.init_batch_stats)["return"] is regjax.BatchStats


SNIPPET = """
import jax
import jax.numpy as jnp
import numpy as np

import regjax
import regjax.linen
import regjax.nnx
from flax import nnx

x = jnp.ones((2, 4, 4, 3))
k = jax.random.key(0)
a: jax.Array = regjax.dropout(np.ones((2, 3), np.float32), 0.1, key=k, rng_impl="jax")
regjax.dropout(x, 0.1, key=k, rng_impl="threefry")  # E
regjax.drop_path(x, 0.1, key=k, mode="batch")
regjax.drop_path(x, 0.1, key=k, mode="column")  # E
regjax.join_drop_path(x, 0.1, key=k, mode="row")  # E
regjax.dropblock(x, 0.1, key=k, data_format="NCDHW")
regjax.cutout(x, 2, key=k, data_format="NCDHW")  # E
regjax.cutout(x, 2, key=k, fill="random")
regjax.cutout(x, 2, key=k, fill="noise")  # E
regjax.linen.Dropout(0.1, rng_impl="jax")
regjax.linen.Dropout(0.1, rng_impl="threefry")  # E
regjax.nnx.Dropout(0.1, rng_impl="threefry", rngs=nnx.Rngs(dropout=0))  # E
stats: regjax.BatchStats = regjax.batch_norm(x, regjax.init_batch_stats(3))[1]
none: None = regjax.batch_norm(x, None)[1]
"""


def test_mypy_rejects_a_wrong_literal(tmp_path):
  api = pytest.importorskip("mypy.api")
  source = textwrap.dedent(SNIPPET)
  path = tmp_path / "snippet.py"
  path.write_text(source)
  expected = {i for i, line in enumerate(source.splitlines(), 1) if line.endswith("# E")}
  stdout, stderr, _ = api.run(
    [
      "--follow-imports=silent",  # report the snippet only
      "--no-error-summary",
      "--cache-dir",
      str(tmp_path / "cache"),
      "--config-file",
      "",
      str(path),
    ]
  )
  errors = [line for line in stdout.splitlines() if ": error:" in line]
  lines = {int(line.split(":")[1]) for line in errors}
  assert lines == expected, (stdout, stderr)
  assert all("Literal" in line for line in errors), stdout
