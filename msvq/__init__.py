"""msvq: a reproducible pipeline for MSVQ and its self-supervised baselines."""

__version__ = "0.1.0"
