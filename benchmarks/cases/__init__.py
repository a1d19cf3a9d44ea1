"""The timed cases, one module per family.

``noise``: every regjax noise op against its flax.linen / Keras-style reference and
the copy floor ``x * 2``; ``memory``: what the backward of a noise op keeps;
``batch_norm``: regjax.linen.BatchNorm against flax.linen.BatchNorm; ``model_step``:
one training step of the benchmark's CNN with regjax layers against flax layers.
"""
