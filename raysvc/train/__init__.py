"""Per-worker training loops run by Ray Train."""
