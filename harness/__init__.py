"""dpo-harness: an experiment-tracking research harness for Direct Preference Optimization."""

__version__ = "0.1.0"
