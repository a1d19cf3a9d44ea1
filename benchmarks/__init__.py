"""Benchmarks of regjax: timings against flax and a copy floor, and PractRand streams.

Not part of the installed package. Run from the repository root:
``python -m benchmarks.run`` (timings and targets, see benchmarks/README.md) and
``python -m benchmarks.rng_quality`` (the generator's streams through PractRand).

Modules: ``timing`` (interleaved timing, ratios and their intervals), ``cases``
(one module per family of timed cases), ``report`` (tables, targets, JSON) with the
targets in ``targets.toml``, ``environment`` (what the JSON records about the
machine) and ``run`` (the command line).
"""
