"""Several nodes (docs/distributed.md, "Several nodes"): the preset ``configs/trainer/multi_node.yaml`` through the
real CLI under ``torchrun``, as two "nodes" of one CPU process each on this machine (two launchers, ``--node-rank 0``
and ``1``, meeting at ``127.0.0.1``), against one process.

What it shows: torchrun's environment is all Lightning needs (it picks ``TorchElasticEnvironment``, the ranks and
node ranks are torchrun's, ``num_nodes x devices`` is the world size); the two processes train on their halves of the
shuffled data with gloo, and with the global batch of the one-process run (25 per process, 50 on one) they end with
its weights and test metrics, to float rounding; rank zero alone writes logs and checkpoints, although the second
"node" has a local rank zero too. What it does not show: a real network between machines, NCCL, GPUs,
``sync_batchnorm`` (torch's SyncBatchNorm runs on GPUs only, so the engression generator runs without BatchNorm
here), a file system that differs between nodes. And (fast) that the preset composes with every experiment config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from reprozoo.cli import run_lightning
from tests.conftest import ROOT
from tests.test_configs import EXPERIMENTS, HOME, config_args
from tests.test_distributed import Run, _check_one_writer, _check_split, _compare, _keys

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")

PRESET = "configs/trainer/multi_node.yaml"
EXPERIMENT = "configs/engression/softplus.yaml"  # pins no accelerator or devices: the preset's settings apply
NODES = 2
BATCH = 50  # the global batch: BATCH / NODES per process on the nodes, BATCH on one process
N_TRAIN, EPOCHS = 300, 2
# Deterministic given the data order: noise_dim 0 (a generator without noise draws the same samples on any number of
# processes) and no BatchNorm (per-process batch statistics would differ from one process's, and SyncBatchNorm
# needs GPUs). The data order is SeededRandomSampler's, dealt to the processes by ResumableSampler: the union of the
# two processes' k-th batches is the one process's k-th batch, and DDP averages the two halves' mean gradients.
SHRINK = [
    "--trainer.max_epochs",
    str(EPOCHS),
    "--trainer.check_val_every_n_epoch",
    "1",
    "--data.init_args.n_train",
    str(N_TRAIN),
    "--data.init_args.n_val",
    "100",
    "--data.init_args.n_test",
    "100",
    "--model.init_args.generator.init_args.noise_dim",
    "0",
    "--model.init_args.generator.init_args.batch_norm",
    "false",
    "--model.init_args.generator.init_args.hidden_dim",
    "16",
    "--model.init_args.eval_samples",
    "10",
    "--test_after_fit",
    "true",
    "--trainer.enable_progress_bar",
    "false",
]
TIMEOUT = 300  # seconds, for both launchers together (about 15 s here)


class RecordProcess(L.Callback):
    """Writes, on every rank when training starts, what Lightning made of torchrun's environment to
    ``<path>/rank<r>.json``."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer.strategy.cluster_environment
        record = {
            "environment": type(env).__name__,
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "num_devices": trainer.num_devices,
            "backend": torch.distributed.get_backend(),
            "strategy": type(trainer.strategy).__name__,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """The ids of the processes ``pid`` started (torchrun's workers run in sessions of their own), where /proc tells."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each launcher that still runs (torchrun passes it on to its worker), SIGKILL after a grace."""
    workers = [c for p in procs if p.poll() is None for c in _children(p.pid)]
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _nodes(work: Path, logs: Path, records: Path) -> str:
    """Starts the two launchers at once, waits for both; returns node 0's stdout (rank zero's)."""
    port = _free_port()
    env = {**os.environ, "REPROZOO_OFFLINE": "1", "REPROZOO_CACHE": str(work.parent / "cache")}
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # left by in-process runs' seed_everything: not the CLI's
        env.pop(key, None)
    cli = [
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        str(HOME / PRESET),
        *config_args(HOME / EXPERIMENT),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.num_nodes",
        str(NODES),
        *SHRINK,
        "--data.init_args.batch_size",
        str(BATCH // NODES),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        "logs",
        "--trainer.callbacks+=tests.test_distributed.RecordSampler",
        f"--trainer.callbacks.path={work / 'samplers'}",
        "--trainer.callbacks+=tests.test_multinode.RecordProcess",
        f"--trainer.callbacks.path={records}",
    ]
    procs, outs = [], []
    try:
        for rank in range(NODES):
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1"]
            launcher += ["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
            out = open(logs / f"node{rank}.out", "w"), open(logs / f"node{rank}.err", "w")
            outs += out
            procs.append(subprocess.Popen(launcher + cli, cwd=work, env=env, stdout=out[0], stderr=out[1]))
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        timed_out = any(p.poll() is None for p in procs)
        _stop(procs)
        for fh in outs:
            fh.close()

    def output() -> str:
        return "\n".join(
            f"--- node {r} {stream} (exit {procs[r].returncode}):\n{(logs / f'node{r}.{stream}').read_text()[-keep:]}"
            for r in range(NODES)
            for stream, keep in (("out", 3000), ("err", 10000))  # the launcher's own traceback ends the worker's
        )

    assert not timed_out, f"the two nodes did not finish within {TIMEOUT} s:\n{output()}"
    assert all(p.returncode == 0 for p in procs), output()
    return (logs / "node0.out").read_text()


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_multi_node_preset_composes_with_every_experiment(experiment, capsys, monkeypatch):
    """The preset first, the experiment after it (its own trainer settings win): the multi-node settings stay."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        run_lightning(["fit", "--config", PRESET, *config_args(experiment), "--print_config"])
    assert info.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["num_nodes"], trainer["strategy"], trainer["sync_batchnorm"]) == (2, "ddp", True), trainer


@pytest.mark.slow  # two torchrun launchers and their two CLI processes, about 20 s
def test_two_nodes_through_torchrun_equal_one_process(tmp_path, monkeypatch):
    work, logs, records = tmp_path / "work", tmp_path / "launcher-output", tmp_path / "processes"
    work.mkdir(), logs.mkdir()
    run = Run(work, EXPERIMENT, SHRINK, _nodes(work, logs, records))  # one version folder under work/logs

    # torchrun's environment, as Lightning read it: node 1's process is global rank 1 and local rank 0.
    seen = {r: json.loads((records / f"rank{r}.json").read_text()) for r in range(NODES)}
    assert len(list(records.iterdir())) == NODES
    for rank, record in seen.items():
        assert record == {
            "environment": "TorchElasticEnvironment",
            "global_rank": rank,
            "local_rank": 0,
            "node_rank": rank,
            "world_size": NODES,
            "num_nodes": NODES,
            "num_devices": 1,
            "backend": "gloo",
            "strategy": "DDPStrategy",
        }, record

    # Rank zero alone wrote (one version folder, one checkpoint set, no files elsewhere); each process trained on
    # its half of every epoch's shuffle, and there were N_TRAIN / BATCH steps per epoch.
    _check_one_writer(run, set())
    _check_split(run, n_train=N_TRAIN, batch_size=BATCH // NODES, epochs=EPOCHS)
    assert run.checkpoint()["global_step"] == EPOCHS * N_TRAIN // BATCH

    # One process with the same global batch: the same weights and test metrics.
    one_dir = tmp_path / "one"
    one_dir.mkdir()
    monkeypatch.chdir(one_dir)
    one = run_lightning(
        [
            "fit",
            *config_args(HOME / EXPERIMENT),
            *SHRINK,
            "--data.init_args.batch_size",
            str(BATCH),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(one_dir),
        ]
    )
    assert one.trainer.global_step == run.checkpoint()["global_step"]
    nodes_state = run.checkpoint()["state_dict"]
    one_state = one.model.state_dict()
    assert set(nodes_state) == set(one_state)
    differences = {k: (nodes_state[k].double() - one_state[k].double()).abs().max().item() for k in one_state}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-6, f"largest difference {differences[worst]:.3g} in {worst}: {differences}"
    metrics = {k: float(v) for k, v in one.trainer.callback_metrics.items()}
    _compare(run, metrics, _keys(metrics, "test/"))  # every test/ metric, to rel 1e-5, abs 1e-6
    metric_gap = max(abs(run.last(k) - metrics[k]) for k in _keys(metrics, "test/"))
    print(f"max |2 nodes - 1 process|: weights {differences[worst]:.3g} ({worst}), test metrics {metric_gap:.3g}")
