"""The layout of the diagnostics: the front door regjax.diagnostics, one module
per framework (regjax.linen.diagnostics, regjax.nnx.diagnostics, each with one
signature), the imports each pulls in, and a compile cache that reuses a
compilation without keeping the user's function alive."""

import gc
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import regjax.linen as rnn
import regjax.nnx as rx
from regjax import _diagnostics, diagnostics
from regjax.linen import diagnostics as linen_diagnostics
from regjax.nnx import diagnostics as nnx_diagnostics

FEATURES = 3


def _batches():
  x = jax.random.normal(jax.random.key(0), (12, FEATURES)) * 2.0 + 1.0
  return [x[:8], x[8:]]


def _linen():
  model = rnn.BatchNorm(deterministic=True)
  return model, model.init(jax.random.key(1), _batches()[0])


def _assert_same_shifts(a, b):
  assert list(a) == list(b)
  for layer_a, layer_b in zip(a.values(), b.values(), strict=True):
    for field in ("moving_mean", "moving_var", "real_mean", "real_var"):
      np.testing.assert_array_equal(getattr(layer_a, field), getattr(layer_b, field))
    assert layer_a.count == layer_b.count


# --------------------------------------------------------------------------
# The front door hands each form to its framework's module, unchanged.


def test_front_door_gives_the_framework_modules_results():
  batches = _batches()
  model, variables = _linen()
  _assert_same_shifts(
    diagnostics.variance_shift(model.apply, variables, batches),
    linen_diagnostics.variance_shift(model.apply, variables, batches),
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    diagnostics.recalibrate_batch_stats(model.apply, variables, batches),
    linen_diagnostics.recalibrate_batch_stats(model.apply, variables, batches),
  )
  bn = rx.BatchNorm(FEATURES, rngs=nnx.Rngs(0))
  _assert_same_shifts(
    diagnostics.variance_shift(bn, batches), nnx_diagnostics.variance_shift(bn, batches)
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    diagnostics.recalibrate_batch_stats(bn, batches),
    nnx_diagnostics.recalibrate_batch_stats(bn, batches),
  )
  assert diagnostics.LayerShift is linen_diagnostics.LayerShift is nnx_diagnostics.LayerShift


def test_front_door_takes_keywords_as_before():
  batches = _batches()
  model, variables = _linen()
  expected = diagnostics.variance_shift(model.apply, variables, batches)
  _assert_same_shifts(
    diagnostics.variance_shift(apply_fn=model.apply, variables=variables, batches=batches), expected
  )
  _assert_same_shifts(diagnostics.variance_shift(model.apply, variables, batches=batches), expected)
  bn = rx.BatchNorm(FEATURES, rngs=nnx.Rngs(0))
  _assert_same_shifts(
    diagnostics.variance_shift(bn, batches=batches), diagnostics.variance_shift(bn, batches)
  )


@pytest.mark.parametrize("fn", [diagnostics.variance_shift, diagnostics.recalibrate_batch_stats])
def test_front_door_refuses_calls_that_fit_no_signature_like_python(fn):
  model, variables = _linen()
  x = _batches()[0]
  name = fn.__name__
  with pytest.raises(
    TypeError,
    match=rf"^{name}\(\) takes from 1 to 3 positional arguments "
    "but 4 were given$",
  ):
    fn(model.apply, variables, [x], None)
  with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'foo'$"):
    fn(model.apply, variables, [x], foo=1)
  with pytest.raises(
    TypeError,
    match=rf"^{name}\(\) got multiple values for argument "
    "'variables'$",
  ):
    fn(model.apply, variables, variables=variables)
  with pytest.raises(TypeError, match="missing `batches`"):
    fn(model.apply, variables)
  with pytest.raises(TypeError, match="no `variables`"):
    fn(rx.BatchNorm(FEATURES, rngs=nnx.Rngs(0)), [x], batches=[x])


def test_framework_modules_check_their_own_arguments():
  model, variables = _linen()
  x = _batches()[0]
  with pytest.raises(TypeError, match="got a linen Module"):
    linen_diagnostics.variance_shift(model, variables, [x])
  with pytest.raises(TypeError, match="`variables` must be the linen variables dict"):
    linen_diagnostics.recalibrate_batch_stats(model.apply, [x], [x])
  bn = rx.BatchNorm(FEATURES, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="`call` must be a function"):
    nnx_diagnostics.variance_shift(bn, [x], call="bn")
  with pytest.raises(TypeError, match="`bn_types` must be a class"):
    nnx_diagnostics.recalibrate_batch_stats(bn, [x], bn_types=())


# --------------------------------------------------------------------------
# Imports: linen use never pulls in NNX, and the framework modules never each other.


@pytest.mark.parametrize(
  ("code", "absent"),
  [
    (
      "import regjax.diagnostics as d, regjax.linen as L, jax, jax.numpy as jnp; "
      "m = L.BatchNorm(deterministic=True); x = jnp.ones((4, 3)); "
      "d.variance_shift(m.apply, m.init(jax.random.key(0), x), [x])",
      ("regjax.nnx", "flax.nnx"),
    ),
    ("import regjax.linen.diagnostics", ("regjax.nnx",)),
    ("import regjax.nnx.diagnostics", ("regjax.linen",)),
  ],
)
def test_imports_stay_on_their_side(code, absent):
  check = f"{code}; import sys; print(sorted(m for m in sys.modules if m.startswith({absent})))"
  proc = subprocess.run(
    [sys.executable, "-c", check], capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------
# The compile cache.


class _Owner:
  """Stands for whatever a user's function closes over (arrays, a model)."""


def test_linen_cache_reuses_the_compilation_for_one_function_and_its_bound_methods():
  model, variables = _linen()
  batches = _batches()[:1]
  traces = []

  class Runner:
    def apply(self, v, x):
      traces.append(x.shape)  # runs only while jit traces
      return model.apply(v, x)

  runner = Runner()
  for _ in range(2):  # `runner.apply` is a new bound-method object each time
    diagnostics.variance_shift(runner.apply, variables, batches)
  assert traces == [batches[0].shape]
  diagnostics.recalibrate_batch_stats(runner.apply, variables, batches)
  assert len(traces) == 2  # its own capture, compiled once


def test_linen_cache_does_not_keep_the_function_alive():
  model, variables = _linen()

  def run():
    owner = _Owner()

    def apply_fn(v, x, owner=owner):
      return model.apply(v, x)

    diagnostics.variance_shift(apply_fn, variables, _batches())
    diagnostics.recalibrate_batch_stats(apply_fn, variables, _batches())
    return weakref.ref(owner)

  owner = run()
  gc.collect()
  assert owner() is None


def test_nnx_cache_does_not_keep_call_alive():
  def run():
    owner = _Owner()

    def call(m, x, owner=owner):
      return m(x)

    diagnostics.variance_shift(rx.BatchNorm(FEATURES, rngs=nnx.Rngs(0)), _batches(), call=call)
    return weakref.ref(owner)

  owner = run()
  gc.collect()
  assert owner() is None


def test_weak_cache_builds_uncached_for_a_function_it_cannot_hold_weakly():
  cache = _diagnostics.WeakCache(per_fn=2)
  builds = []

  def build(resolve):
    builds.append(resolve)
    return len(builds)

  class NoWeakref:
    __slots__ = ()

    def __call__(self):
      pass

  plain = NoWeakref()
  assert [cache.get(plain, "k", build) for _ in range(2)] == [1, 2]
  assert builds[0]() is plain

  def fn():
    pass

  assert [cache.get(fn, k, build) for k in ("a", "a", "b", "c", "a")] == [3, 3, 4, 5, 6]
  assert builds[-1]() is fn  # "a" was dropped for "c" (two keys per function)


def test_linen_results_are_the_same_with_a_cold_and_a_warm_cache():
  model, variables = _linen()
  batches = [*_batches(), jnp.ones((1, FEATURES))]
  cold = linen_diagnostics.variance_shift(lambda v, x: model.apply(v, x), variables, batches)
  apply_fn = model.apply
  linen_diagnostics.variance_shift(apply_fn, variables, batches)
  _assert_same_shifts(linen_diagnostics.variance_shift(apply_fn, variables, batches), cold)
