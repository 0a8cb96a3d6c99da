"""Studies: a grid of runs of the experiment configs, each one ``cli.py fit`` + ``cli.py test`` call, with one results
file per run under the course's run names (``exp1_1_L2_K32``), and the figures and table drawn from those files.

A study is a YAML file in ``configs/studies/`` (``python cli.py study list`` shows them)::

    study: cnn_architecture
    name: "{experiment}_L{L}_K{K}"        # the run name; a list value is joined with "-" (K64-128)
    set:                                  # what each grid variable sets, as a command-line option
      L: model.init_args.net.init_args.layers_per_block
      K: model.init_args.net.init_args.channels
    experiments:
      exp1_1:
        configs: [configs/cnn_study/base.yaml, configs/cnn_study/exp1_1.yaml]
        grids: [{K: [[32], [64]], L: [2, 4, 8, 16]}]   # the product of each grid, in this order
        plot: {group_by: K, curve: L}                  # one figure per K, one curve per L

Commands (``STUDY``: a name in ``configs/studies/`` or a file)::

    python cli.py study list STUDY                   # the runs: index, name, the fit command
    python cli.py study run STUDY --out DIR          # all of them, one after the other
    python cli.py study run STUDY --only exp1_1      # an experiment (or run names)
    python cli.py study run STUDY --task-id $SLURM_ARRAY_TASK_ID   # the run of that index: one job per run
    python cli.py study plot STUDY --out DIR         # figures and a markdown table from DIR/<run>.json
    ... -- --trainer.max_epochs 2                    # after "--": options passed to every fit and test call

A run whose results file exists is skipped (``--rerun`` runs it again); one that was interrupted (a ``last.ckpt``
in its log folder and no results file) is resumed from that checkpoint. Logs and checkpoints go to
``DIR/logs/<run>/``; the results file ``DIR/<run>.json`` holds the run's parameters, its command, the metrics of
every epoch (:class:`~reprozoo.callbacks.MetricsHistory`), the test metrics of its best checkpoint, the number of
parameters and the wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reprozoo._files import write_atomic
from reprozoo.cli._configs import CONFIG_DIR, packaged_config

STUDY_DIR = CONFIG_DIR / "studies"
HISTORY = "metrics_history.json"
_TEST_VERSION = "test"


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: its name, experiment, grid values and the options they set."""

    name: str
    experiment: str
    params: dict[str, Any]
    configs: tuple[str, ...]
    options: tuple[str, ...]
    plot: dict[str, str] = field(default_factory=dict)

    def fit_args(self, log_root: Path, extra: list[str] = ()) -> list[str]:
        words = ["fit"]
        for config in self.configs:
            words += ["--config", config]
        return [
            *words,
            *self.options,
            *("--trainer.logger.init_args.save_dir", str(log_root)),
            *("--trainer.logger.init_args.name", self.name),
            *extra,
        ]

    def test_args(self, log_root: Path, ckpt: str, extra: list[str] = ()) -> list[str]:
        words = self.fit_args(log_root, extra)
        return [
            "test",
            *words[1:],
            *("--trainer.logger.init_args.version", _TEST_VERSION),
            # the fit's checkpoint folder: the checkpoint callback's state in `ckpt` belongs to it
            *("--checkpoint.dirpath", str(Path(ckpt).parent)),
            *("--ckpt_path", ckpt),
        ]


def _format(value: Any) -> str:
    return "-".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _option_value(value: Any) -> str:
    return (
        json.dumps(value, separators=(",", ":"))
        if isinstance(value, (list, tuple, dict, bool)) or value is None
        else str(value)
    )


def study_path(name: str) -> Path:
    """The study file that ``name`` names: a file, or a study of ``configs/studies/`` (with or without .yaml)."""
    if os.path.isfile(name):
        return Path(name)
    for candidate in (f"studies/{name}", name):
        found = packaged_config(candidate)
        if found is not None:
            return found
    known = ", ".join(sorted(p.stem for p in STUDY_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"study {name!r}: no such file and no such study in configs/studies/ ({known})")


def load_study(name: str) -> tuple[dict, list[StudyRun]]:
    """The study file's contents and its runs, in order; ValueError naming the file and the field when it is off."""
    path = study_path(name)
    where = f"study file {path}"
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping with study, name, set and experiments")
    if "extends" in spec:  # another study's grid, with this one's name, title and options added to every run
        if not isinstance(spec["extends"], str) or spec["extends"] == spec.get("study"):
            raise ValueError(f"{where}: 'extends' must name another study, got {spec['extends']!r}")
        parent, _ = load_study(spec["extends"])
        spec = {**parent, **spec, "options": [*parent.get("options", []), *spec.get("options", [])]}
        del spec["extends"]
    options = spec.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: 'options' must be a list of command-line words (strings), got {options!r}")
    for key, kind in (("study", str), ("name", str), ("set", dict), ("experiments", dict)):
        if not isinstance(spec.get(key), kind):
            raise ValueError(f"{where}: '{key}' must be a {kind.__name__}, got {spec.get(key)!r}")
    runs: list[StudyRun] = []
    for experiment, exp in spec["experiments"].items():
        at = f"{where}: experiments.{experiment}"
        if not isinstance(exp, dict) or not isinstance(exp.get("configs"), list) or not exp["configs"]:
            raise ValueError(f"{at}.configs must be a non-empty list of config files")
        grids = exp.get("grids")
        if not isinstance(grids, list) or not all(isinstance(g, dict) and g for g in grids):
            raise ValueError(f"{at}.grids must be a list of mappings (variable -> list of values)")
        for grid in grids:
            for var, values in grid.items():
                if var not in spec["set"]:
                    raise ValueError(f"{at}.grids: variable {var!r} is not in 'set' ({', '.join(spec['set'])})")
                if not isinstance(values, list) or not values:
                    raise ValueError(f"{at}.grids: {var} must be a non-empty list of values")
            for combo in itertools.product(*grid.values()):
                params = dict(zip(grid, combo))
                try:
                    run_name = exp.get("name", spec["name"]).format(
                        experiment=experiment, **{k: _format(v) for k, v in params.items()}
                    )
                except KeyError as err:
                    raise ValueError(f"{at}: the run name uses {err}, which the grid does not set") from None
                grid_options = []
                for var, value in params.items():
                    grid_options += [f"--{spec['set'][var]}", _option_value(value)]
                runs.append(
                    StudyRun(
                        run_name,
                        experiment,
                        params,
                        tuple(exp["configs"]),
                        tuple(grid_options + options),
                        exp.get("plot", {}),
                    )
                )
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: the name pattern gives several runs the name {dupes[0]!r}")
    return spec, runs


def select(runs: list[StudyRun], only: list[str] | None, task_id: int | None) -> list[StudyRun]:
    """The runs named (by experiment or run name) in ``only`` (all when None), then the one of index ``task_id``."""
    if only:
        unknown = [o for o in only if not any(o in (r.name, r.experiment) for r in runs)]
        if unknown:
            raise ValueError(f"--only: no experiment or run named {unknown[0]!r} (see `study list`)")
        runs = [r for r in runs if r.name in only or r.experiment in only]
    if task_id is not None:
        if not 0 <= task_id < len(runs):
            raise ValueError(f"--task-id {task_id}: the selection has runs 0..{len(runs) - 1}")
        runs = [runs[task_id]]
    return runs


def _latest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _cli(words: list[str]) -> None:
    """One ``python -m reprozoo.cli`` call, its output shown; a failure stops the study with its exit status."""
    proc = subprocess.run([sys.executable, "-m", "reprozoo.cli", *words], check=False)
    if proc.returncode != 0:
        print(f"[study] `cli.py {words[0]}` exited with status {proc.returncode}: the study stops", file=sys.stderr)
        raise SystemExit(proc.returncode)


def run_one(run: StudyRun, out: Path, extra: list[str], rerun: bool = False) -> Path | None:
    """Fit and test one run, then write ``out/<run>.json``; None when it was already done (and not ``rerun``)."""
    result = out / f"{run.name}.json"
    if result.exists() and not rerun:
        print(f"[study] {run.name}: done before ({result}), skipped (--rerun runs it again)", flush=True)
        return None
    log_root = out / "logs"
    run_dir = log_root / run.name
    resume = [] if rerun else (["--ckpt_path", "last"] if _latest(run_dir, "version_*/checkpoints/last.ckpt") else [])
    start = time.perf_counter()
    print(f"[study] {run.name}: fit{' (resuming)' if resume else ''}", flush=True)
    _cli(run.fit_args(log_root, extra) + resume)
    history_file = _latest(run_dir, f"version_*/{HISTORY}")
    if history_file is None:
        raise ValueError(
            f"{run.name}: the fit wrote no {HISTORY}: the study's configs need the MetricsHistory callback"
        )
    history = json.loads(history_file.read_text())
    best = history.get("best_model_path") or str(history_file.parent / "checkpoints" / "last.ckpt")
    print(f"[study] {run.name}: test on {best}", flush=True)
    _cli(run.test_args(log_root, best, extra))
    tested = json.loads((run_dir / _TEST_VERSION / HISTORY).read_text())
    record = {
        "run": run.name,
        "experiment": run.experiment,
        "params": run.params,
        "command": ["python", "cli.py", *run.fit_args(Path("<out>/logs"), extra)],
        "epochs": history["epochs"],
        "test": tested.get("test", {}),
        "best_model_path": history.get("best_model_path"),
        "best_model_score": history.get("best_model_score"),
        "num_parameters": history.get("num_parameters"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_atomic(result, (json.dumps(record, indent=1) + "\n").encode())
    print(f"[study] {run.name}: wrote {result}", flush=True)
    return result


def study_main(argv: list[str]) -> int:
    """``python cli.py study {list,run,plot} STUDY ...``."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="cli.py study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("list", "run", "plot"):
        p = sub.add_parser(command)
        p.add_argument("study", help="a study of configs/studies/ (e.g. cnn_architecture) or a study file")
        p.add_argument("--only", nargs="+", help="experiments or run names")
        if command != "list":
            p.add_argument("--out", type=Path, required=True, help="folder of the results files (and logs)")
        if command == "run":
            p.add_argument("--task-id", type=int, help="run only the run of this index, e.g. $SLURM_ARRAY_TASK_ID")
            p.add_argument("--rerun", action="store_true", help="run again the runs that have a results file")
    args = parser.parse_args(argv)
    try:
        spec, runs = load_study(args.study)
        runs = select(runs, args.only, getattr(args, "task_id", None))
    except (ValueError, FileNotFoundError) as err:  # the study file or the selection: the user's to fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "list":
        for i, run in enumerate(runs):
            print(f"{i:3d}  {run.name:<28} python cli.py {shlex.join(run.fit_args(Path('<out>/logs'), extra))}")
        print(f"{len(runs)} runs (a SLURM array over them: --array=0-{len(runs) - 1})")
        return 0
    if args.command == "plot":
        from reprozoo.cli._study_plots import plot_study

        try:
            plot_study(spec, runs, args.out)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        run_one(run, args.out, extra, rerun=args.rerun)
    return 0
