"""One data root: every DataModule's default folder is under ``$REPROZOO_DATA`` (else ``$REPROZOO_CACHE/data``),
relative paths in configs are looked up there, and no file of the project names a folder of this repository's CI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reprozoo._files import data_path, data_root
from reprozoo.datamodules import (
    AnimalFacesDataModule,
    CIFAR10CDataModule,
    FashionMNISTDataModule,
    SudokuExtremeDataModule,
)
from tests.conftest import ROOT


def test_data_root_is_the_variable_else_the_per_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "root"))
    assert data_root() == tmp_path / "root"
    monkeypatch.delenv("REPROZOO_DATA")
    monkeypatch.setenv("REPROZOO_CACHE", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "data"
    monkeypatch.delenv("REPROZOO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_root() == tmp_path / "home" / ".cache" / "reprozoo" / "data"


@pytest.mark.parametrize(
    "build, folder",
    [
        (lambda: SudokuExtremeDataModule(source="csv"), "sudoku-extreme"),
        (lambda: FashionMNISTDataModule(), "fashion_mnist"),
        (lambda: FashionMNISTDataModule(dataset="mnist"), "mnist"),
        (lambda: AnimalFacesDataModule(), "."),  # holds afhq/
        (lambda: CIFAR10CDataModule(corruptions=["fog"]), "."),  # holds CIFAR-10-C/
    ],
    ids=["sudoku", "fashion_mnist", "mnist", "afhq", "cifar10c"],
)
def test_every_datamodule_defaults_to_its_folder_under_the_root(build, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "root"))
    dm = build()
    assert dm.data_dir == (tmp_path / "root" / folder if folder != "." else tmp_path / "root")


def test_cifar10c_clean_sources_default_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "root"))
    assert CIFAR10CDataModule(corruptions=["fog"]).clean_root == tmp_path / "root" / "cifar10"


def test_relative_paths_are_looked_up_in_the_working_directory_then_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "root"))
    monkeypatch.chdir(tmp_path)
    assert data_path("cifar10/test.npz") == tmp_path / "root" / "cifar10" / "test.npz"  # absent here: the root's
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "test.npz").write_bytes(b"")
    assert data_path("cifar10/test.npz") == Path("cifar10/test.npz")  # present here: the working directory's
    assert data_path(tmp_path / "x") == tmp_path / "x"  # absolute: as it is


def test_a_missing_file_error_names_the_folder_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("REPROZOO_DATA", str(tmp_path / "root"))
    dm = FashionMNISTDataModule(dataset="mnist", train_source="test")
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "root" / "mnist") in message and "t10k-images-idx3-ubyte.gz" in message
    assert not (tmp_path / "root").exists()  # offline: nothing was created, nothing substituted


def test_no_product_file_names_the_ci_data_folder():
    """Only ``.ci/run`` may point the data root at the folder beside the clone that this repository's CI has."""
    needle = "../" + "shared"  # built here, so that this file does not name it either
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    offenders = []
    for name in tracked.decode().split("\0"):
        path = ROOT / name
        if not name or name.startswith(".ci/") or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if needle in text or '"' + 'shared" / "data"' in text:  # split: this file must not match itself
            offenders.append(name)
    assert offenders == []


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    import os

    from reprozoo._files import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
