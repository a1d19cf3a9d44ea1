"""The variance-shift study behind compare_dropout.py: one module per concern."""
