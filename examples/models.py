"""Small CNN and MLP classifiers with regjax BatchNorm and a configurable noise layer.

The CNN is a stack of blocks whose layer order is a string such as
``'conv-bn-act-drop-pool'`` (any order of the five tokens), followed by a head
``flatten -> dense -> BN -> act -> head noise -> classifier``. Noise can sit in
the blocks (at the ``drop`` token), in the head (after the last BatchNorm, the
placement Li et al. 2019 recommend), or both.

Noise strengths (``block_noise_value``, ``head_noise_value``) may be JAX
tracers, so a study can ``jax.vmap`` a model over rates and seeds; only the
noise *names* (strings) steer Python control flow.

Submodule names are stable, for diagnostics that walk the variables:
block ``i`` has ``conv{i}``, ``bn{i}``, ``noise{i}``; the head has ``dense``,
``head_bn``, ``head_noise`` and ``classifier``. ``batch_stats`` therefore holds
``bn0 ... bn{k-1}`` (in depth order) and ``head_bn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import regjax
import regjax.linen as rnn

# name -> (regjax.linen class name, its strength field, customary strength).
# Looked up by name so the examples run with whichever ops this regjax has.
_NOISE_CANDIDATES: dict[str, tuple[str, str, float]] = {
  "dropout": ("Dropout", "rate", 0.1),
  "gaussian": ("GaussianDropout", "rate", 0.1),
  "uout": ("Uout", "beta", 0.1),  # Li et al.'s setting
  "alpha": ("AlphaDropout", "rate", 0.1),
  "gaussian_noise": ("GaussianNoise", "stddev", 0.1),
  "channel": ("ChannelDropout", "rate", 0.1),
}

# name -> (regjax linen class, name of its strength field).
NOISE_OPS: dict[str, tuple[type[nn.Module], str]] = {
  name: (getattr(rnn, cls), field)
  for name, (cls, field, _) in _NOISE_CANDIDATES.items()
  if hasattr(rnn, cls)
}
# The strength each op is usually run at (CLI default for --noise-value).
DEFAULT_NOISE_VALUE: dict[str, float] = {name: _NOISE_CANDIDATES[name][2] for name in NOISE_OPS}
NOISE_CHOICES = ("none",) + tuple(NOISE_OPS)
# Ops that need spatial axes (their mask is shared over them): block noise of
# the CNN only, never after a dense layer.
SPATIAL_NOISE = frozenset({"channel"})

# Published Uout is defined for beta <= 1 (noise factor 1 + r stays >= 0); larger
# beta flips the sign of a fraction (beta - 1) / (2 beta) of the units.
UOUT_PUBLISHED_MAX_BETA = 1.0


def noise_variance(noise: str, value: float) -> float:
  """The multiplicative noise variance ``s2`` of op ``noise`` at strength ``value``.

  Dropout and Gaussian dropout at rate ``q``: ``q / (1 - q)``; Uout at ``beta``:
  ``beta**2 / 3``; ``'none'``: 0. Other ops have no multiplicative ``s2``.
  """
  if noise == "none":
    return 0.0
  if noise == "uout":
    return float(regjax.uout_noise_variance(value))
  if noise in ("dropout", "gaussian"):
    return float(regjax.dropout_noise_variance(value))
  raise ValueError(
    f"noise {noise!r} has no multiplicative noise variance; use 'dropout', "
    "'gaussian', 'uout' or 'none'"
  )


def value_for_variance(noise: str, s2: float) -> float:
  """The rate (dropout, gaussian) or beta (uout) whose noise variance is ``s2 >= 0``."""
  if not s2 >= 0:
    raise ValueError(f"noise variance s2 must be >= 0; got {s2}")
  if noise == "uout":
    return (3.0 * s2) ** 0.5
  if noise in ("dropout", "gaussian"):
    return s2 / (1.0 + s2)
  raise ValueError(f"noise {noise!r} has no multiplicative noise variance")


ORDER_TOKENS = ("conv", "bn", "act", "drop", "pool")
_TOKEN_ALIASES = {"dropout": "drop", "batchnorm": "bn"}
DEFAULT_ORDER = "conv-bn-act-drop-pool"

# A public experiment (two conv blocks, 32/64 filters, 3x3, ELU,
# 2x2 max-pool, dense 512, Adam, 20 epochs on MNIST, dropout 0.2-0.3, one run
# each) reported these MNIST test losses per block order. A claim to re-test.
PUBLISHED_ORDER_LOSSES: dict[str, float] = {
  "conv-act-drop-bn-pool": 0.0426,
  "conv-act-drop-pool-bn": 0.0501,
  "conv-act-bn-pool-drop": 0.0491,
  "conv-act-bn-drop-pool": 0.0681,
  "conv-bn-act-drop-pool": 0.0389,
  "conv-bn-act-pool-drop": 0.0413,
  "conv-bn-drop-act-pool": 0.0514,
  "conv-drop-act-bn-pool": 0.0483,
  "conv-drop-act-pool-bn": 0.0472,
  "conv-drop-bn-act-pool": 0.0324,
}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": nn.relu,
  "elu": nn.elu,
  "gelu": nn.gelu,
  "selu": nn.selu,
}


def parse_order(spec: str) -> tuple[str, ...]:
  """Parses a block order like ``'conv-bn-act-drop-pool'`` into its tokens.

  Tokens are ``conv``, ``bn``, ``act``, ``drop``, ``pool``, joined by ``-`` in
  any order, each at most once, ``conv`` required. Case and spaces around
  tokens are ignored, and ``dropout`` is accepted for ``drop``, so the spelling of
  the published experiment, ``'conv - BN - act - dropout - pool'``, parses as written.

  Raises:
    ValueError: an unknown, empty or repeated token, or no ``conv``.
  """
  if not isinstance(spec, str):
    raise ValueError(f"order must be a string like {DEFAULT_ORDER!r}; got {spec!r}")
  tokens = tuple(_TOKEN_ALIASES.get(t, t) for t in (t.strip().lower() for t in spec.split("-")))
  for t in tokens:
    if t not in ORDER_TOKENS:
      raise ValueError(
        f"order {spec!r}: unknown token {t!r}; use tokens from "
        f"{ORDER_TOKENS} joined by '-', e.g. {DEFAULT_ORDER!r}"
      )
  repeated = sorted({t for t in tokens if tokens.count(t) > 1})
  if repeated:
    raise ValueError(f"order {spec!r}: each token may appear once; repeated {repeated}")
  if "conv" not in tokens:
    raise ValueError(f"order {spec!r} has no 'conv' token")
  return tokens


def check_noise(noise: str, where: str = "noise", dense: bool = False) -> None:
  """Raises ValueError unless ``noise`` is 'none' or a key of ``NOISE_OPS``.

  ``dense``: the noise follows a dense layer, where ``SPATIAL_NOISE`` ops have
  no spatial axes to share their mask over.
  """
  if noise not in NOISE_CHOICES:
    raise ValueError(f"{where}: unknown noise {noise!r}; choose one of {NOISE_CHOICES}")
  if dense and noise in SPATIAL_NOISE:
    raise ValueError(
      f"{where}: {noise!r} noise needs spatial axes; it cannot follow a dense "
      "layer (use it as CNN block noise, or use 'dropout')"
    )


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose one of {tuple(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def make_noise(noise: str, value, name: str) -> nn.Module | None:
  """The noise module ``noise`` at strength ``value`` (None for 'none').

  ``value`` may be a tracer: it only becomes a module field.
  """
  check_noise(noise)
  if noise == "none":
    return None
  cls, field = NOISE_OPS[noise]
  return cls(**{field: value}, name=name)


def _apply_noise(noise: str, value, name: str, x, train: bool):
  layer = make_noise(noise, value, name)
  return x if layer is None else layer(x, deterministic=not train)


class CNN(nn.Module):
  """Conv blocks in a configurable order, then ``dense -> BN -> act -> noise -> classifier``.

  Works on 1-D inputs ``(N, L, C)`` and 2-D inputs ``(N, H, W, C)``: kernel and
  pooling windows get one entry per spatial axis.

  Attributes:
    features: output channels of each block.
    order: the layer order inside every block; see :func:`parse_order`.
    block_noise: noise at each block's ``drop`` token ('none' or a key of
      ``NOISE_OPS``).
    block_noise_value: its rate/beta/stddev (may be traced).
    head_noise: noise in the head, after the last BatchNorm and activation.
    head_noise_value: its strength (may be traced).
    noise_blocks: indices of the blocks whose ``drop`` token applies
      ``block_noise``; None (default) means every block.
    hidden: width of the head's dense layer.
    num_classes: classifier outputs.
    kernel_size: conv window length per spatial axis.
    bn_momentum: running-statistics momentum of every BatchNorm.
    activation: a key of ``ACTIVATIONS``.
  """

  features: tuple[int, ...]
  order: str = DEFAULT_ORDER
  block_noise: str = "none"
  block_noise_value: Any = 0.0
  head_noise: str = "none"
  head_noise_value: Any = 0.0
  noise_blocks: tuple[int, ...] | None = None
  hidden: int = 64
  num_classes: int = 10
  kernel_size: int = 3
  bn_momentum: float = 0.9
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    tokens = parse_order(self.order)
    check_noise(self.block_noise, "block_noise")
    check_noise(self.head_noise, "head_noise", dense=True)
    act = _activation(self.activation)
    spatial = x.ndim - 2
    if spatial < 1:
      raise ValueError(f"CNN expects (N, L, C) or (N, H, W, C) inputs; got shape {x.shape}")
    window = (2,) * spatial
    for i, features in enumerate(self.features):
      for j, token in enumerate(tokens):
        if token == "conv":
          # A bias right before BN is cancelled by its mean subtraction.
          next_is_bn = j + 1 < len(tokens) and tokens[j + 1] == "bn"
          x = nn.Conv(
            features,
            (self.kernel_size,) * spatial,
            padding="SAME",
            use_bias=not next_is_bn,
            name=f"conv{i}",
          )(x)
        elif token == "bn":
          x = rnn.BatchNorm(momentum=self.bn_momentum, deterministic=not train, name=f"bn{i}")(x)
        elif token == "act":
          x = act(x)
        elif token == "drop":
          x = _block_noise(self, i, x, train)
        else:  # pool; SAME padding keeps a length-1 axis from pooling to 0
          x = nn.max_pool(x, window, strides=window, padding="SAME")
    x = x.reshape(x.shape[0], -1)
    return _head(self, x, train, act)


def _block_noise(module: nn.Module, index: int, x: jax.Array, train: bool) -> jax.Array:
  """Block ``index``'s noise, or the identity outside ``module.noise_blocks``."""
  if module.noise_blocks is not None and index not in module.noise_blocks:
    return x
  return _apply_noise(module.block_noise, module.block_noise_value, f"noise{index}", x, train)


def _head(module: nn.Module, x: jax.Array, train: bool, act) -> jax.Array:
  """``dense -> BN -> act -> head noise -> classifier``, inside ``module``'s compact scope."""
  x = nn.Dense(module.hidden, use_bias=False, name="dense")(x)
  x = rnn.BatchNorm(momentum=module.bn_momentum, deterministic=not train, name="head_bn")(x)
  x = act(x)
  x = _apply_noise(module.head_noise, module.head_noise_value, "head_noise", x, train)
  return nn.Dense(module.num_classes, name="classifier")(x)


class MLP(nn.Module):
  """Dense blocks ``dense -> BN -> act -> block noise``, then the CNN's head.

  The input is flattened first. Same noise fields and submodule naming as
  :class:`CNN` (``dense{i}``, ``bn{i}``, ``noise{i}``; ``dense``, ``head_bn``,
  ``head_noise``, ``classifier``; ``noise_blocks`` selects the noisy blocks), so
  the two are interchangeable in a study.
  """

  features: tuple[int, ...] = (256,)
  block_noise: str = "none"
  block_noise_value: Any = 0.0
  head_noise: str = "none"
  head_noise_value: Any = 0.0
  noise_blocks: tuple[int, ...] | None = None
  hidden: int = 256
  num_classes: int = 10
  bn_momentum: float = 0.9
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    check_noise(self.block_noise, "block_noise", dense=True)
    check_noise(self.head_noise, "head_noise", dense=True)
    act = _activation(self.activation)
    x = x.reshape(x.shape[0], -1)
    for i, features in enumerate(self.features):
      x = nn.Dense(features, use_bias=False, name=f"dense{i}")(x)
      x = rnn.BatchNorm(momentum=self.bn_momentum, deterministic=not train, name=f"bn{i}")(x)
      x = act(x)
      x = _block_noise(self, i, x, train)
    return _head(self, x, train, act)


# Per-dataset defaults. MNIST-1D: measured in the module docstring of train.py.
_CNN_DEFAULTS: dict[str, dict[str, Any]] = {
  "mnist1d": dict(features=(32, 32, 32), hidden=64, kernel_size=3),
  "digits": dict(features=(32, 64), hidden=64, kernel_size=3),
  "mnist": dict(features=(32, 64), hidden=128, kernel_size=3),
  "fashion_mnist": dict(features=(32, 64), hidden=128, kernel_size=3),
  "cifar10": dict(features=(32, 64, 128), hidden=256, kernel_size=3),
}
_MLP_DEFAULTS: dict[str, dict[str, Any]] = {
  "mnist1d": dict(features=(256,), hidden=256),
  "digits": dict(features=(256,), hidden=256),
  "mnist": dict(features=(512,), hidden=512),
  "fashion_mnist": dict(features=(512,), hidden=512),
  "cifar10": dict(features=(1024,), hidden=512),
}


def default_cnn(dataset_name: str, num_classes: int, **overrides) -> CNN:
  """The study's CNN for ``dataset_name``; ``overrides`` replace any field."""
  if dataset_name not in _CNN_DEFAULTS:
    raise ValueError(f"no default CNN for {dataset_name!r}; known: {tuple(_CNN_DEFAULTS)}")
  return CNN(**{**_CNN_DEFAULTS[dataset_name], "num_classes": num_classes, **overrides})


def default_mlp(dataset_name: str, num_classes: int, **overrides) -> MLP:
  """The MLP for ``dataset_name``; ``overrides`` replace any field."""
  if dataset_name not in _MLP_DEFAULTS:
    raise ValueError(f"no default MLP for {dataset_name!r}; known: {tuple(_MLP_DEFAULTS)}")
  return MLP(**{**_MLP_DEFAULTS[dataset_name], "num_classes": num_classes, **overrides})


def count_params(params) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(jnp.size(p) for p in jax.tree.leaves(params)))


def main(argv=None) -> None:
  """``python models.py``: what this module holds (it is imported, not run)."""
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
    prog="models.py",
    description=__doc__.split("\n\n")[0],
    epilog="A library module of the examples: run examples/compare_dropout.py (the study) "
    "or examples/train.py (one run).",
  )
  parser.parse_args(argv)
  print(
    f"noise ops: {', '.join(NOISE_CHOICES)}; block tokens: {', '.join(ORDER_TOKENS)}; "
    f"activations: {', '.join(ACTIVATIONS)}; default CNNs for: {', '.join(_CNN_DEFAULTS)}"
  )


if __name__ == "__main__":
  main()
