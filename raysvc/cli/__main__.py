"""`python -m raysvc.cli ...`, as the `raysvc` console script (subprocesses use it: bench/loaders.py)."""

from raysvc.cli import main

main()
