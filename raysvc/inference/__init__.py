"""Inference: the exported-model record, the featurisation shared with training, and load / predict / evaluate.
Serving and the batch commands use it; it never imports training code."""
