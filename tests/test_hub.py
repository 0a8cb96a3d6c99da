"""Zoo entries beyond the package: the export forms (safetensors + card, Lightning checkpoint, Hub folder), Hub ids
resolved from a real Hugging Face cache layout with no network, and torch.hub entry points. Generated from the
registry: every entry is checked."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from reprozoo.cli import main
from reprozoo.zoo import HUB_DIR, export_entry, list_weights, load_model, registry
from reprozoo.zoo.registry import WeightsError

ROOT = Path(__file__).resolve().parents[1]
NAMES = list_weights()
REPO = "acme/reprozoo-zoo"


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def make_hub_cache(cache: Path, repo: str, folder: Path, *, tags: tuple[str, ...] = ()) -> str:
    """Lay the files of ``folder`` out as huggingface_hub's cache holds a downloaded repository
    (``models--org--name/{blobs,refs,snapshots}``; blobs named by their etag: the sha256 of large (LFS) files, the
    git blob id of small ones; snapshot entries are relative symlinks to them); returns the commit id."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode() + b"".join(sorted(p.name.encode() for p in folder.iterdir()))).hexdigest()
    snapshot = root / "snapshots" / commit
    for sub in (root / "blobs", root / "refs", snapshot):
        sub.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix in (".safetensors", ".ckpt"):
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (root / "blobs" / etag).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", etag))
    for ref in ("main", *tags):
        (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """Every entry exported as ``zoo export NAME --hub-folder DIR`` would (one folder each)."""
    out = tmp_path_factory.mktemp("hub")
    for name in NAMES:
        export_entry(name, out / name, model_card=True, hub_repo=REPO)
    return out


@pytest.fixture
def hub_cache(hub_folders, tmp_path, monkeypatch):
    """One Hub repository per entry (``acme/<name>``) in a Hugging Face cache, used offline."""
    cache = tmp_path / "hf"
    commits = {name: make_hub_cache(cache, f"acme/{name}", hub_folders / name, tags=("v1",)) for name in NAMES}
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, commits


def test_hub_folder_holds_the_entry_its_checkpoint_and_a_model_card(hub_folders):
    for name in NAMES:
        folder = hub_folders / name
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted(["README.md", f"{name}.ckpt", f"{name}.json", f"{name}.safetensors"])
        entry = registry.get_weights(name)
        # The same bytes as the packaged weights: the Hub copy and the package agree on the sha256.
        assert (folder / f"{name}.safetensors").read_bytes() == (registry.PACKAGE_DIR / entry.file).read_bytes()
        card = json.loads((folder / f"{name}.json").read_text())
        assert card["sha256"] == entry.sha256 and card["hparams"] == entry.hparams and card["metrics"] == entry.metrics
        readme = (folder / "README.md").read_text()
        assert readme.startswith("---\nlicense: mit\n") and entry.sha256 in readme
        assert f'load_model("hf://{REPO}/{name}.json")' in readme
        for key, value in entry.metrics.items():
            assert f"| {key} | {value:.4g} |" in readme
        assert f"reprozoo fit --config {entry.recipe}" in readme


@pytest.mark.parametrize("name", NAMES)
def test_exported_checkpoint_loads_with_lightning_and_equals_load_model(name, hub_folders):
    entry = registry.get_weights(name)
    cls = registry._import(entry.module)
    ckpt = hub_folders / name / f"{name}.ckpt"
    # Lightning's own loader, with its default weights_only loading: the file holds tensors and plain values only.
    model = cls.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(model) is cls and _same_state(model, load_model(name))
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["_class_path"] == entry.module


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_loads_from_a_hub_id_offline(name, hub_cache):
    _, commits = hub_cache
    packaged = load_model(name)
    for revision in ("", "@main", "@v1", f"@{commits[name]}"):
        model = load_model(f"hf://acme/{name}{revision}/{name}.json")
        assert _same_state(model, packaged) and not model.training


def test_a_card_naming_hub_weights_fetches_and_verifies_them(hub_cache, tmp_path):
    name = "nca_linear.rings"
    card = registry.get_weights(name).to_card() | {"name": "nca_linear.hub", "url": f"hf://acme/{name}@v1/{name}"}
    card["url"] += ".safetensors"
    (tmp_path / "nca_linear.hub.json").write_text(json.dumps(card))
    assert _same_state(load_model(tmp_path / "nca_linear.hub.json"), load_model(name))


def test_tampered_hub_cache_file_is_refused(hub_cache):
    cache, commits = hub_cache
    name = "nca_linear.rings"
    weights = cache / f"models--acme--{name}" / "snapshots" / commits[name] / f"{name}.safetensors"
    blob = weights.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"sha256 mismatch for {weights}.*it was not loaded"):
        load_model(f"hf://acme/{name}/{name}.json")


def test_hub_id_not_in_the_cache_offline_says_how_to_get_it(hub_cache):
    with pytest.raises(WeightsError) as info:
        load_model("hf://acme/absent@v2/absent.model.json")
    message = str(info.value)
    assert "offline" in message and "hf download acme/absent absent.model.json --revision v2" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "spec, words",
    [
        ("hf://acme/x.json", "not a Hub id"),
        ("hf://acme/zoo/x.safetensors", "not a zoo name"),
        ("hf://acme/zoo/README.md", "not a card"),
    ],
)
def test_bad_hub_ids(spec, words, hub_cache):
    with pytest.raises(WeightsError, match=words):
        load_model(spec)


def test_a_card_with_a_bad_url_is_refused(tmp_path):
    card = registry.get_weights("nca_linear.rings").to_card() | {"url": "ftp://example.org/x.safetensors"}
    with pytest.raises(WeightsError, match="'url' must be null, an https:// URL or hf://org/repo"):
        registry.WeightsEntry.from_card(card)


@pytest.mark.parametrize("name", NAMES)
def test_torch_hub_local_returns_every_entry(name):
    packaged = load_model(name)
    for folder in (HUB_DIR, str(ROOT)):  # the installed package's folder, and a checkout's hubconf.py
        model = torch.hub.load(folder, name, source="local")
        assert type(model) is type(packaged) and _same_state(model, packaged) and not model.training
    fresh = torch.hub.load(HUB_DIR, name, source="local", pretrained=False)
    assert type(fresh) is type(packaged) and set(fresh.state_dict()) == set(packaged.state_dict())


def test_cli_export_hub_folder_and_its_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["zoo", "export", "nca_linear.rings", "--hub-folder", "hub", "--hub-repo", REPO]) == 0
    assert sorted(os.listdir("hub")) == ["README.md", "nca_linear.rings.ckpt", "nca_linear.rings.json"] + [
        "nca_linear.rings.safetensors"
    ]
    assert "wrote hub/nca_linear.rings.safetensors" in capsys.readouterr().out
    assert main(["zoo", "export", "nca_linear.rings", "--hub-folder", "a", "--out", "b"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["zoo", "export", "nca_linear.rings", "--name", "nca_linear.mine", "--license", "CC-BY-4.0"]) == 0
    card = json.loads(Path("zoo_exports/nca_linear.mine.json").read_text())
    assert card["name"] == "nca_linear.mine" and card["license"] == "CC-BY-4.0"
    assert not Path("a").exists() and not Path("b").exists()
