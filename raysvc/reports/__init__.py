"""The tables and plots of a results/ experiment, rebuilt from its runs (`raysvc results table DIR`).

An experiment with an `experiment.yaml` declares its tables and plots there and its runs are the run records under
DIR/runs/ (`experiment_tables`: no code per experiment). An older experiment is one module here with
`build(runs, plots) -> {table name: markdown}`: it reads the run directories
under `runs`, draws its plots into `plots` (None: draw nothing) and returns its tables. BUILDERS registers it under
the name of its results/ folder. The tables go into DIR/README.md between `<!-- table:NAME -->` markers
(raysvc.reports.readme); the prose around them stays hand-written. Only the command line imports this package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from raysvc.reports import cross_experiment, experiment_tables
from raysvc.reports.readme import first_difference, tables_in, with_tables

Builder = Callable[[Path, Path | None], dict[str, str]]

# results/<name>/ -> its builder
BUILDERS: dict[str, Builder] = {
    "cross-experiment": cross_experiment.build,
}


def builder_for(folder: Path) -> Builder:
    if (folder / experiment_tables.SPEC).is_file():
        return functools.partial(experiment_tables.build, folder)
    name = folder.resolve().name
    if name not in BUILDERS:
        raise ValueError(f"no table builder for {name!r} (known: {', '.join(sorted(BUILDERS))})")
    return BUILDERS[name]


def default_runs(folder: Path) -> Path:
    """Where an experiment's runs are unless told: DIR/runs/ for one with an experiment.yaml, else ./runs (the run
    directories of the commands in its README, not committed)."""
    return folder / "runs" if (folder / experiment_tables.SPEC).is_file() else Path("runs")


def rebuild(folder: Path, runs: Path) -> bool:
    """Rebuild `folder`'s tables and plots from `runs`; write README.md only if a table changed (returns whether)."""
    readme = folder / "README.md"
    text = readme.read_text()
    new = with_tables(text, builder_for(folder)(runs, folder), str(readme))
    if new != text:
        readme.write_text(new)
    return new != text


def check(folder: Path, runs: Path) -> str | None:
    """The first difference between `folder`'s committed tables and those rebuilt from `runs`, or None; draws no
    plot and writes nothing."""
    readme = folder / "README.md"
    text = readme.read_text()
    rebuilt = builder_for(folder)(runs, None)
    with_tables(text, rebuilt, str(readme))  # the same markers-and-tables check as a rebuild
    return first_difference(tables_in(text), rebuilt)
