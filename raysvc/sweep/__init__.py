"""Ray Tune sweeps: `raysvc sweep tune/<spec>.yaml` (the C-NMS coverage grid, the label-efficiency matrix)."""

from __future__ import annotations


def run_sweep(spec, log=print) -> dict:
    """Run (or resume) the sweep `spec`; its summary dict, with the Markdown table under `table_md`."""
    from raysvc.sweep.spec import CNMSSweep

    if isinstance(spec, CNMSSweep):
        from raysvc.sweep.grouping import run_cnms_sweep, table_md

        summary = run_cnms_sweep(spec, log)
        return summary | {"table_md": table_md(summary)}
    from raysvc.sweep.label_efficiency import run_finetune_sweep, table_md

    summary = run_finetune_sweep(spec, log)
    return summary | {"table_md": table_md(summary["table"], summary["failed"], summary["columns"])}
