"""Shards on object storage and how they are read: manifests, preprocessing, the task and Ray Data streams."""
