"""What one training run is: a noise op, its strength, where it sits, and the network.

Noise placements, named by the path from the noise to the next BatchNorm
(Li et al. 2019, Sec. 3, cases (a) and (b)):

* ``direct``: ``conv-act-drop-bn-pool``, the noise goes straight into BN: case (a);
* ``weight``: ``conv-bn-act-pool-drop``, noise -> next block's conv -> BN: case (b);
* ``pooled``: ``conv-bn-act-drop-pool`` (the study's default block), noise ->
  max-pool -> conv -> BN: case (b) behind a nonlinearity;
* ``head``: the noise sits only after the last BatchNorm, before the classifier
  (the paper's fix (a)); no BN sees it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import models

METHODS = ("dropout", "gaussian", "uout")
# The settings each op is usually run at: dropout 0.5 (Srivastava et al.), Gaussian
# dropout at the same rate, Uout at Li et al.'s beta = 0.1.
CUSTOMARY = {"dropout": 0.5, "gaussian": 0.5, "uout": 0.1}
# The largest noise variance published Uout reaches (beta = 1): the matched level of
# the headline comparison, so every op there stays inside its published range.
MATCHED_S2 = models.noise_variance("uout", models.UOUT_PUBLISHED_MAX_BETA)

BLOCK_ORDERS = {
  "direct": "conv-act-drop-bn-pool",
  "weight": "conv-bn-act-pool-drop",
  "pooled": models.DEFAULT_ORDER,
}
PLACEMENT_NAMES = {
  "none": "no noise",
  "direct": "noise -> BN (case a)",
  "weight": "noise -> conv -> BN (case b)",
  "pooled": "noise -> pool -> conv -> BN",
  "head": "after the last BN",
  "order": "block order sweep",
}


@dataclasses.dataclass(frozen=True)
class Config:
  """One configuration; every seed of it is one run.

  Attributes:
    method: 'none' or a key of ``METHODS``.
    value: rate (dropout, gaussian) or beta (uout); 0 for 'none'.
    placement: 'none', a key of ``BLOCK_ORDERS``, 'head' or 'order'.
    order: the CNN block order.
    arch: model overrides (``features``, ``noise_blocks``, ``model='mlp'``...).
    tag: what varies in this experiment, shown in labels (e.g. 'd=64').
  """

  method: str
  value: float
  placement: str
  order: str = models.DEFAULT_ORDER
  arch: tuple[tuple[str, Any], ...] = ()
  tag: str = ""

  @property
  def s2(self) -> float:
    return models.noise_variance(self.method, self.value)

  @property
  def extension(self) -> bool:
    """Uout beyond the published beta <= 1."""
    return self.method == "uout" and self.value > models.UOUT_PUBLISHED_MAX_BETA + 1e-12

  @property
  def label(self) -> str:
    if self.method == "none":
      text = "no noise"
    else:
      knob = "beta" if self.method == "uout" else "rate"
      text = f"{self.method} {knob}={self.value:.3g} {self.placement}"
    if self.placement == "order" or (
      self.order != models.DEFAULT_ORDER and self.placement not in BLOCK_ORDERS
    ):
      text += f" [{self.order}]"
    return text + (f" {self.tag}" if self.tag else "")

  @property
  def strengths(self) -> tuple[float, float]:
    """(block, head) noise strength; the unused one is 0, the exact identity."""
    head = self.placement == "head"
    return (0.0 if head else self.value, self.value if head else 0.0)

  def group_key(self) -> tuple:
    """Configs with equal keys train as one group: one compilation, strengths traced."""
    method = "dropout" if self.method == "none" else self.method
    return (method, self.order, self.arch)


def baseline(order: str = models.DEFAULT_ORDER, arch=(), tag="") -> Config:
  return Config("none", 0.0, "none", order, arch, tag)


def at_variance(method: str, s2: float, placement: str, arch=(), tag="") -> Config:
  """``method`` at noise variance ``s2`` in ``placement`` (its block order if any)."""
  order = BLOCK_ORDERS.get(placement, models.DEFAULT_ORDER)
  return Config(method, models.value_for_variance(method, s2), placement, order, arch, tag)


def customary(method: str, placement: str, arch=(), tag="") -> Config:
  order = BLOCK_ORDERS.get(placement, models.DEFAULT_ORDER)
  return Config(method, CUSTOMARY[method], placement, order, arch, tag)


def same_s2(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
