"""The package's layering and public surface."""

import subprocess
import sys

import regjax


def test_functional_core_does_not_import_flax():
  code = (
    "import sys, regjax, jax.numpy as jnp; "
    "regjax.batch_norm(jnp.ones((4, 2)), regjax.init_batch_stats(2)); "
    "print('flax' in sys.modules)"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_linen_is_importable_as_an_attribute():
  assert set(regjax.linen.__all__) == {
    "BatchNorm",
    "BatchRenorm",
    "Dropout",
    "GaussianDropout",
    "Uout",
    "AlphaDropout",
    "GaussianNoise",
    "ChannelDropout",
    "DropPath",
    "DropBlock",
    "Cutout",
    "DropConnect",
    "JoinDropPath",
    "RandomErasing",
  }


def test_nnx_is_importable_as_an_attribute_and_mirrors_linen():
  assert {"BatchNorm", "Dropout", "GaussianDropout", "Uout"} <= set(regjax.nnx.__all__)
  # Every linen module has its NNX counterpart, under the same name.
  assert set(regjax.nnx.__all__) == set(regjax.linen.__all__)
  for name in regjax.nnx.__all__:
    assert getattr(regjax.nnx, name).__doc__, name


def test_linen_and_nnx_wrappers_import_the_core_never_each_other():
  for ours, other in (("linen", "nnx"), ("nnx", "linen")):
    code = (
      f"import sys, regjax.{ours}; print(any(m.startswith('regjax.{other}') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", (ours, other)


def test_public_names_exist_and_have_docstrings():
  for name in regjax.__all__:
    obj = getattr(regjax, name)
    if callable(obj) and name != "BatchStats":
      assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_one_version_string():
  import importlib.metadata

  assert importlib.metadata.version("regjax") == regjax.__version__
