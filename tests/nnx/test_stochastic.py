"""Tests of regjax.nnx's stochastic modules beyond the shared module tests."""

import numpy as np
from _helpers import _x

import regjax.nnx as rx


def test_dropout_rate_one_returns_zeros_without_a_key():
  y = rx.Dropout(1.0)(_x((4, 3)))
  np.testing.assert_array_equal(np.asarray(y), 0.0)
