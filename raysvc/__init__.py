"""raysvc: Ray-distributed training service for self-supervised point-cloud models of neutrino detectors."""

__version__ = "0.1.0"
