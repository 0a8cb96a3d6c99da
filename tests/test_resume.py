"""Exact resume, for every trainable method: N steps straight == N/2 steps, a checkpoint, a fresh start from it
(other global seed, new objects) and the remaining N/2 — weights, EMA, optimiser state, callback state and the
order of the data included. The checkpoint falls mid-epoch on purpose: that is where loaders usually lose track.

TentModule has no training (it adapts inside the test loop), so it has no resume to test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from reprozoo.callbacks import FrobeniusNormMonitor, LossLandscape, RNGStateCheckpoint
from reprozoo.datamodules import ConcentricRingsDataModule, ResumableDataLoader, SudokuExtremeDataModule
from reprozoo.methods.classifier import ClassifierModule
from reprozoo.methods.distillation import DistillationModule
from reprozoo.methods.nca import NCAModule
from reprozoo.methods.trm import TRMModule
from reprozoo.nets import MLP
from tests.conftest import ROOT
from tests.helpers import tiny_data, tiny_engression, trm_net


def _rings(**kwargs):
    # 3 classes x 10 = 30 training points in batches of 8: 4 batches an epoch, so step 5 is inside epoch 1
    return ConcentricRingsDataModule(
        **{
            "n_train_per_class": 10,
            "n_val_per_class": 4,
            "n_test_per_class": 4,
            "num_classes": 3,
            "batch_size": 8,
            **kwargs,
        }
    )


def _classifier():
    return ClassifierModule(MLP(3, 3, hidden=(16,), dropout=0.3), optimizer="adam", lr=1e-2)


def _distillation():
    with torch.random.fork_rng():  # a fixed teacher (it stands for a zoo file): it is not in the checkpoint
        torch.manual_seed(7)
        teacher = MLP(3, 3, hidden=(8,)).eval()
    return DistillationModule(MLP(3, 3, hidden=(16,), dropout=0.3), teacher=teacher, temperature=2.0, lr=1e-2)


def _nca():
    return NCAModule(3, 2, init="random", lr=1e-2, k=(1,), compare_raw=False, plot=False)


@pytest.fixture(scope="module")
def sudoku_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sudoku")


def _trm():
    return TRMModule(
        net=trm_net(hidden_size=32, expansion=2.0, puzzle_emb_ndim=32),
        n=2,
        T=2,
        n_sup=3,
        warmup_steps=1,
        lr=1e-3,
        halt_exploration_prob=0.5,
    )


CASES = {
    # name: (module factory, datamodule factory, N optimizer steps, save every, extra callbacks factory)
    "engression": (tiny_engression, lambda d: tiny_data(n_train=160, batch_size=32), 8, 4, lambda: []),
    "classifier+callbacks": (
        _classifier,
        lambda d: _rings(),
        10,
        5,
        lambda: [
            FrobeniusNormMonitor(plot=False),
            LossLandscape(resolution=3, num_batches=1, every_n_epochs=1, plot=False),
        ],
    ),
    "distillation": (_distillation, lambda d: _rings(), 10, 5, lambda: []),
    "nca": (_nca, lambda d: _rings(), 10, 5, lambda: []),
    # TRM: manual optimisation, the streaming carry (n_sup=3: the step-4 checkpoint falls mid-carry), EMA;
    # 24 puzzles / 8 = 3 batches
    "trm": (
        _trm,
        lambda d: SudokuExtremeDataModule(
            data_dir=str(d),
            num_givens=50,
            n_train_generated=32,
            n_test_generated=8,
            num_train_puzzles=24,
            num_val=8,
            batch_size=8,
        ),
        10,
        4,
        lambda: [],
    ),
}


def _fit(tmp_path, name, steps, every, ckpt_path=None, seed=0, data_dir=None):
    make_module, make_data, _, _, make_callbacks = CASES[name]
    L.seed_everything(seed)
    module, data = make_module(), make_data(data_dir)
    extra = make_callbacks()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[RNGStateCheckpoint(), saver, *extra],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer, extra


@pytest.mark.parametrize("name", list(CASES))
def test_n_steps_straight_equal_half_then_resume(name, tmp_path, sudoku_dir):
    _, _, steps, every, _ = CASES[name]
    straight, trainer, callbacks = _fit(tmp_path / "straight", name, steps, every, data_dir=sudoku_dir)
    assert trainer.global_step == steps
    half = (
        tmp_path / "straight" / "ckpt" / f"epoch={_epoch_of(tmp_path / 'straight' / 'ckpt', every)}-step={every}.ckpt"
    )
    state = torch.load(half, weights_only=True)  # RNG states and loader position are plain tensors and numbers
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert 0 < loader_state["batches"] < len(trainer.train_dataloader), "the checkpoint should fall mid-epoch"
    if name == "trm":
        assert not state["trm_carry"]["slots"]["halted"].all(), "the checkpoint should fall mid-carry"

    resumed, trainer2, callbacks2 = _fit(
        tmp_path / "resumed", name, steps, every, ckpt_path=half, seed=123, data_dir=sudoku_dir
    )
    assert trainer2.global_step == steps
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {key} differs after resume"
    opt_a, opt_b = trainer.optimizers[0].state_dict()["state"], trainer2.optimizers[0].state_dict()["state"]
    for k in opt_a:
        for field, value in opt_a[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[k][field])), (
                f"{name}: optimizer {k}.{field}"
            )
    for a, b in zip(callbacks, callbacks2, strict=True):
        if isinstance(a, FrobeniusNormMonitor):
            assert a.history == b.history and a.initial == b.initial
        if isinstance(a, LossLandscape):
            assert [(h["epoch"], h["step"], h["center_loss"]) for h in a.history] == [
                (h["epoch"], h["step"], h["center_loss"]) for h in b.history
            ]
    if name == "trm":
        assert any(k.startswith("ema.") for k in straight.state_dict())
        for key, value in straight._carry.state().items():
            assert torch.equal(value, resumed._carry.state()[key]), f"trm: carry {key} differs after resume"


def _epoch_of(folder, step):
    (path,) = folder.glob(f"epoch=*-step={step}.ckpt")
    return path.name.split("-")[0].split("=")[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_order_and_skip(num_workers):
    """The loader on its own: same order for the same (seed, epoch), other order for another epoch, and a
    loaded state skips exactly the batches already taken (also with worker processes)."""
    data = _rings(n_train_per_class=10, batch_size=8, num_workers=num_workers)
    data.setup("fit")
    torch.manual_seed(5)
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    first = [b[1].tolist() for b in loader]
    assert [b[1].tolist() for b in loader] == first  # no set_epoch: the same epoch again
    loader.set_epoch(1)
    second = [b[1].tolist() for b in loader]
    assert second != first
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == sorted(data.splits["train"].tensors[1].tolist())
    taken = iter(loader)
    next(taken), next(taken)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    fresh = _rings(n_train_per_class=10, batch_size=8, num_workers=num_workers)
    fresh.setup("fit")
    fresh.load_state_dict(data.state_dict())  # the shuffle seed travels in the datamodule's checkpoint state
    other = fresh.train_dataloader()
    other.load_state_dict(state)
    assert [b[1].tolist() for b in other] == second[2:]
    assert other.state_dict() == {"epoch": 1, "batches": len(second)}
    other.load_state_dict(other.state_dict())  # an end-of-epoch state starts the next epoch from its beginning
    assert other.state_dict() == {"epoch": 2, "batches": 0}


# --------------------------------------------------------------------------------- kill -9 mid-epoch, then resume

_KILL_ARGS = [
    "--config",
    str(ROOT / "reprozoo" / "configs" / "engression" / "quickstart.yaml"),
    "--trainer.max_steps",
    "24",
    "--trainer.max_epochs",
    "-1",
    "--trainer.deterministic",
    "true",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.logger",
    "false",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.check_val_every_n_epoch",
    "100",
    "--data.init_args.n_train",
    "320",
    "--data.init_args.batch_size",
    "32",
    "--checkpoint.every_n_train_steps",
    "3",
    "--checkpoint.save_top_k",
    "-1",
]


def _cli_args(root):
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        *_KILL_ARGS,
        "--trainer.default_root_dir",
        str(root),
        "--checkpoint.dirpath",
        str(root / "ckpt"),
    ]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_loses_nothing(tmp_path):
    """A real `cli.py fit` is killed with SIGKILL after its checkpoint at step 9 (inside epoch 0 of 10 batches);
    `fit --ckpt_path last.ckpt` then ends with exactly the weights of an uninterrupted run."""
    env = {**os.environ, "REPROZOO_OFFLINE": "1"}
    straight = subprocess.run(
        _cli_args(tmp_path / "straight"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_root = tmp_path / "killed"
    # slow each step down so that the kill lands between two saves, not after the run
    args = _cli_args(killed_root) + ["--trainer.callbacks+=tests.test_resume.SleepAfterStep"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = killed_root / "ckpt" / "epoch=0-step=9.ckpt"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # inside step 10 or 11: work after the last save is lost, nothing before it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself first: {proc.stderr.read()[-2000:]}"
    saved = sorted(p.name for p in (killed_root / "ckpt").glob("*.ckpt"))
    assert "last.ckpt" in saved and not any("step=24" in s for s in saved), saved
    last = torch.load(killed_root / "ckpt" / "last.ckpt", weights_only=False)
    assert 9 <= last["global_step"] < 24 and last["global_step"] % 3 == 0

    resumed = subprocess.run(
        _cli_args(killed_root) + ["--ckpt_path", str(killed_root / "ckpt" / "last.ckpt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "straight" / "ckpt" / "epoch=2-step=24.ckpt", weights_only=False)["state_dict"]
    b = torch.load(killed_root / "ckpt" / "epoch=2-step=24.ckpt", weights_only=False)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


class SleepAfterStep(L.Callback):
    """Slows a run down (0.1 s a step) so that a test can kill it part-way."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.1)


class _SeenRows(L.Callback):
    """Records, per process, the first input feature of every training row it is given (rows are distinct)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.extend(batch[0][:, 0].tolist())

    def state_dict(self):
        return {}

    def on_train_end(self, trainer, pl_module):
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, self.seen)
        if trainer.is_global_zero:
            torch.save(gathered, os.path.join(trainer.default_root_dir, "seen.pt"))


@pytest.mark.slow
def test_ddp_two_processes_resume_exactly_with_disjoint_shards(tmp_path):
    """ddp_spawn, 2 processes: each takes its own half of the seeded order (disjoint, together the whole set per
    epoch), and N/2 + resume (global seed changed) ends with the straight run's weights."""

    def fit(root, ckpt_path=None, seed=0):
        L.seed_everything(seed)
        module, data = tiny_engression(), tiny_data(n_train=128, batch_size=16)  # 4 steps an epoch per process
        seen = _SeenRows()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp_spawn",
            max_steps=10,
            deterministic=True,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=root,
            callbacks=[
                RNGStateCheckpoint(),
                seen,
                ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=5, save_top_k=-1),
            ],
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module, torch.load(root / "seen.pt", weights_only=False)

    straight, seen = fit(tmp_path / "a")
    first_epoch = [rows[:64] for rows in seen]  # 4 batches of 16 per process
    assert not set(first_epoch[0]) & set(first_epoch[1])
    assert len(set(first_epoch[0]) | set(first_epoch[1])) == 128
    (half,) = (tmp_path / "a" / "ckpt").glob("*step=5.ckpt")
    resumed, seen_after = fit(tmp_path / "b", ckpt_path=half, seed=99)
    for rank in range(2):
        assert seen_after[rank] == seen[rank][5 * 16 :]  # the same rows in the same order after the checkpoint
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
