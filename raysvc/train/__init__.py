"""Training on Ray Train: the one worker loop (loop.py), the one driver (driver.py) and the tasks it runs (tasks/)."""
