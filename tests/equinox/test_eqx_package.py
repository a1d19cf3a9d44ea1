"""regjax.equinox's public surface and its layering."""

import dataclasses
import inspect
import subprocess
import sys

import equinox as eqx

import regjax.equinox as rq
import regjax.linen as rl


def _run(code: str) -> str:
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_regjax_does_not_import_equinox_and_regjax_equinox_imports_only_the_core():
  code = (
    "import sys, regjax, jax.numpy as jnp; "
    "regjax.dropout(jnp.ones((4, 2)), 0.5, deterministic=True); "
    "print('equinox' in sys.modules); "
    "import regjax.equinox; "
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax' "
    "or m.startswith(('regjax.linen', 'regjax.nnx'))))"
  )
  assert _run(code).splitlines() == ["False", "[]"]


def test_every_linen_module_has_an_equinox_counterpart():
  assert set(rq.__all__) == set(rl.__all__)
  for name in rq.__all__:
    cls = getattr(rq, name)
    assert issubclass(cls, eqx.Module), name
    assert cls.__doc__ and len(cls.__doc__) > 40, name


def test_dropout_has_the_fields_and_signature_of_eqx_dropout():
  ours = {f.name for f in dataclasses.fields(rq.Dropout)}
  assert {f.name for f in dataclasses.fields(eqx.nn.Dropout)} <= ours
  theirs = [
    p for p in inspect.signature(eqx.nn.Dropout.__init__).parameters if p != "deterministic"
  ]
  assert list(inspect.signature(rq.Dropout.__init__).parameters)[: len(theirs)] == theirs
  call = inspect.signature(rq.Dropout.__call__).parameters
  assert call["key"].kind is inspect.Parameter.KEYWORD_ONLY
  assert call["inference"].kind is inspect.Parameter.KEYWORD_ONLY


def test_batch_norm_takes_eqx_batch_norm_arguments_in_order():
  theirs = list(inspect.signature(eqx.nn.BatchNorm.__init__).parameters)
  for cls in (rq.BatchNorm, rq.BatchRenorm):
    assert list(inspect.signature(cls.__init__).parameters)[: len(theirs)] == theirs, cls
    assert issubclass(cls, eqx.nn.StatefulLayer)


def test_dropconnect_takes_eqx_linear_arguments_in_order():
  theirs = list(inspect.signature(eqx.nn.Linear.__init__).parameters)
  assert list(inspect.signature(rq.DropConnect.__init__).parameters)[: len(theirs)] == theirs
