"""prefix-serve: serve many Prefix-Tuning tasks from one frozen language model."""

__version__ = "0.1.0"
