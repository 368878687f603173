"""Bring published PTv3 checkpoints in and out (Sonata, pimm) and encode points with a loaded model."""
