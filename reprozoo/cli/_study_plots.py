"""The figures and the table of a study, drawn from its results files (``<out>/<run>.json``, see
:mod:`reprozoo.cli._study`): per experiment (or per ``plot: {figure: name}`` shared by several), one figure per
value of its ``plot: {group_by: variable}`` with one curve per run, labelled by ``plot: {curve: variable}`` (else by
run name); four panels per figure, by default training and validation loss and accuracy per epoch, as the course
plots its experiments (a study's ``panels: [[title, metric], ...]`` chooses others); and one markdown table of
every run."""

from __future__ import annotations

import json
from pathlib import Path

from reprozoo._files import save_figure, write_atomic

# (title, metric) of the four panels: the course's train/test loss and accuracy, with the held-out validation
# split standing in for the test set during training (the test set is evaluated once, on the best checkpoint)
PANELS = (
    ("train loss", "train/loss"),
    ("validation loss", "val/loss"),
    ("train accuracy", "train/acc"),
    ("validation accuracy", "val/acc"),
)


def _label(value) -> str:
    return "-".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _figure(title: str, results: list[dict], curve: str | None, path: Path, panels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (panel, metric) in zip(axes.flat, panels):
        for result in results:
            points = [(e["epoch"] + 1, e[metric]) for e in result["epochs"] if e.get(metric) is not None]
            if points:
                name = f"{curve}={_label(result['params'][curve])}" if curve else result["run"]
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def plot_study(spec: dict, runs: list, out: Path) -> list[Path]:
    """Write ``out/<experiment>_<group>.png`` per experiment and group, and ``out/<study>.md``; return the paths.
    Runs without a results file are listed in the table as not run."""
    out = Path(out)
    results = {}
    for run in runs:
        path = out / f"{run.name}.json"
        if path.exists():
            results[run.name] = json.loads(path.read_text())
    if not results:
        raise FileNotFoundError(f"study plot: no results file of this study in {out}/ (run `study run` first)")
    panels = [tuple(p) for p in spec.get("panels", PANELS)]
    figures: dict[str, tuple[str, str | None, list]] = {}  # file stem -> (title, curve variable, results)
    for run in runs:
        if run.name not in results:
            continue
        group_by, curve = run.plot.get("group_by"), run.plot.get("curve")
        stem = run.plot.get("figure", run.experiment)
        title = f"{spec['study']}: {stem}"
        if group_by:
            stem += f"_{group_by}{_label(run.params[group_by])}"
            title += f", {group_by}={_label(run.params[group_by])}"
        figures.setdefault(stem, (title, curve, []))[2].append(results[run.name])
    written = []
    for stem, (title, curve, group) in figures.items():
        path = out / f"{stem}.png"
        _figure(title, group, curve, path, panels)
        written.append(path)
    lines = [
        f"# {spec.get('title', spec['study'])}",
        "",
        "| run | parameters | epochs | best val acc | test loss | test acc | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        r = results.get(run.name)
        if r is None:
            lines.append(f"| {run.name} | not run | | | | | |")
            continue
        val = [e["val/acc"] for e in r["epochs"] if e.get("val/acc") is not None]
        lines.append(
            f"| {run.name} | {_cell(r.get('num_parameters'), ',')} | {len(r['epochs'])} | "
            f"{_cell(max(val) if val else None, '.4f')} | {_cell(r['test'].get('test/loss'), '.4f')} | "
            f"{_cell(r['test'].get('test/acc'), '.4f')} | {_cell(r.get('seconds'), '.0f')} |"
        )
    lines += ["", "Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in written), ""]
    table = out / f"{spec['study']}.md"
    write_atomic(table, "\n".join(lines).encode())
    print(f"wrote {table} and {len(written)} figures in {out}/")
    return [table, *written]
