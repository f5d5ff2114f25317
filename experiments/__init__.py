"""Experiments run from a checkout (`python -m experiments.<name>`): studies whose results the docs quote, not part
of the served package (they are not in the wheel). They need the `train` extra."""
