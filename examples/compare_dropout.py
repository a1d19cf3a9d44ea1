"""Uout vs Gaussian vs standard dropout around BatchNorm: regjax's main study.

Theory checks of Li et al.'s variance-shift formulas by Monte Carlo, then training
experiments on MNIST-1D with 1000 training samples (a regime where regularization
can help): the headline comparison of no noise, dropout, Gaussian dropout and Uout
at their customary settings and at matched noise variance, before the BNs vs after
the last one, with recalibration variants; with --full also dose-response, width,
depth and block-order sweeps. Writes results.json, results.csv, claims.md (one
verdict per claim) and PNG figures to runs/compare_dropout/<time>/.

    python examples/compare_dropout.py                 # theory + headline (< 5 min)
    python examples/compare_dropout.py --full          # every experiment
    python examples/compare_dropout.py --quick         # smoke run
    python examples/compare_dropout.py --experiments orders --orders all
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study.cli import main

if __name__ == "__main__":
  main()
