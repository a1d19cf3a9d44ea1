"""The string options of regjax's public API, each a ``typing.Literal`` defined once.

An editor or a type checker reads these from the signatures (``rng_impl:
RngImpl``); the ops still check them at run time, against the tuple of the
same values (``typing.get_args`` of the alias), so the hint and the check
cannot drift apart and a caller without a type checker still gets the
``ValueError`` naming the argument.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, get_args

RngImpl: TypeAlias = Literal["hash", "jax"]
"""Generator of a random op: ``'hash'`` (:mod:`regjax.random`) or ``'jax'`` (``jax.random``)."""

DropPathMode: TypeAlias = Literal["row", "batch"]
""":func:`regjax.drop_path`: one draw per example (``'row'``) or one for the batch."""

DropPathConvention: TypeAlias = Literal["huang", "linspace"]
""":func:`regjax.drop_path_rates`: how the per-block rates ramp up to ``max_rate``."""

JoinMode: TypeAlias = Literal["local", "global"]
""":func:`regjax.join_drop_path`: FractalNet's local (per branch) or global (one column) drop."""

DataFormat: TypeAlias = Literal["NHWC", "NCHW"]
"""Layout of a batch of 2-D feature maps: channels last or channels first."""

BlockDataFormat: TypeAlias = Literal["NHWC", "NCHW", "NDHWC", "NCDHW"]
""":func:`regjax.dropblock`'s layouts: :data:`DataFormat` for rank 4 or 5, and the rank-5
spellings ``'NDHWC'`` / ``'NCDHW'``."""

RandomFill: TypeAlias = Literal["random"]
"""The ``fill`` of :func:`regjax.cutout` and :func:`regjax.random_erasing` that draws
standard-normal values instead of a constant."""

Fill: TypeAlias = float | RandomFill
"""A constant fill value, or ``'random'``."""

RNG_IMPLS: tuple[str, ...] = get_args(RngImpl)
DROP_PATH_MODES: tuple[str, ...] = get_args(DropPathMode)
DROP_PATH_CONVENTIONS: tuple[str, ...] = get_args(DropPathConvention)
JOIN_MODES: tuple[str, ...] = get_args(JoinMode)
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
DATA_FORMATS_3D: tuple[str, ...] = tuple(
  f for f in get_args(BlockDataFormat) if f not in DATA_FORMATS
)
