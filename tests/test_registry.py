import hashlib
import json
import urllib.request

import pytest
import torch

from reprozoo.methods.engression import EngressionRegressor
from reprozoo.zoo import export_checkpoint, registry
from reprozoo.zoo.registry import WeightsError
from tests.helpers import tiny_data, tiny_engression, tiny_trainer

CLASS = "reprozoo.methods.engression.EngressionRegressor"


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_engression()
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=tiny_data())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path, model


@pytest.fixture
def exported(checkpoint, tmp_path):
    """An exported entry, registered as if it lived behind a URL (a file:// URL to a 'server' folder)."""
    ckpt, model = checkpoint
    server = tmp_path / "server"
    weights_file, card_file = export_checkpoint(
        ckpt, "engression_test.tiny", server, module=CLASS, metrics={"test/energy_score": 0.5}, recipe="configs/x.yaml"
    )
    card = json.loads(card_file.read_text())
    card["url"] = weights_file.as_uri()
    entry = registry.register_weights(registry.WeightsEntry.from_card(card), overwrite=True)
    yield entry, weights_file, model
    registry._REGISTRY.pop(entry.name, None)


def test_export_writes_slim_file_and_card(exported):
    entry, weights_file, model = exported
    from safetensors import safe_open

    with safe_open(weights_file, "pt") as fh:  # tensors only: no optimizer or loop state, nothing to unpickle
        assert fh.metadata() == {"format": registry.FORMAT, "module": CLASS}
        assert set(fh.keys()) == set(model.state_dict())
    assert weights_file.suffix == ".safetensors" and entry.file == weights_file.name
    assert entry.sha256 == registry.sha256_file(weights_file) and len(entry.sha256) == 64
    assert entry.metrics == {"test/energy_score": 0.5} and entry.recipe == "configs/x.yaml"
    assert entry.size_bytes == weights_file.stat().st_size


def test_roundtrip_gives_identical_predictions(exported, tmp_path):
    entry, _, model = exported
    loaded = registry.load_model(entry.name, offline=False, cache_dir=tmp_path / "cache")
    assert isinstance(loaded, EngressionRegressor) and not loaded.training
    x = torch.linspace(0, 4, 33)[:, None]
    model.eval()
    torch.manual_seed(123)
    expected = model.sample(x, 10)
    torch.manual_seed(123)
    assert torch.equal(loaded.sample(x, 10), expected)
    # second load comes from the cache, verified, without downloading again
    (tmp_path / "server" / entry.file).unlink()
    assert isinstance(registry.load_model(entry.name, offline=True, cache_dir=tmp_path / "cache"), EngressionRegressor)


def test_offline_never_downloads(exported, tmp_path, monkeypatch):
    entry, _, _ = exported

    def forbidden(*args, **kwargs):
        raise AssertionError("network touched in offline mode")

    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    with pytest.raises(WeightsError, match="offline") as info:
        registry.load_model(entry.name, cache_dir=tmp_path / "cache")  # REPROZOO_OFFLINE=1 from conftest
    assert str(tmp_path / "cache" / entry.file) in str(info.value) and entry.url in str(info.value)
    monkeypatch.setenv("REPROZOO_OFFLINE", "0")
    with pytest.raises(WeightsError, match="offline"):
        registry.load_model(entry.name, offline=True, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_hash_mismatch_refused_and_nothing_left_behind(exported, tmp_path):
    entry, weights_file, _ = exported
    data = bytearray(weights_file.read_bytes())
    data[-10] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as info:
        registry.load_model(entry.name, offline=False, cache_dir=cache)
    message = str(info.value)
    assert "sha256 mismatch" in message and entry.sha256 in message and registry.sha256_file(weights_file) in message
    assert list(cache.iterdir()) == []  # the bad download was never renamed into place, the temp file removed


def test_tampered_cache_file_refused(exported, tmp_path):
    entry, _, _ = exported
    cache = tmp_path / "cache"
    registry.load_model(entry.name, offline=False, cache_dir=cache)
    cached = cache / entry.file
    cached.write_bytes(cached.read_bytes()[:-100])  # truncated
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        registry.load_model(entry.name, offline=True, cache_dir=cache)


def test_weights_file_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    # Today's files are safetensors: tensors only. Files of the first format (.pt) are read with weights_only=True.
    path = tmp_path / "evil.pt"
    torch.save({"format": registry.LEGACY_FORMAT, "module": CLASS, "hparams": {}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(WeightsError, match="not a readable weights file"):
        registry.read_weights_bytes(path.read_bytes(), str(path), legacy=True)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(WeightsError, match="format"):
        registry.read_weights_bytes(path.read_bytes(), str(path), legacy=True)
    with pytest.raises(WeightsError, match="x.safetensors is not a readable safetensors file"):
        registry.read_weights_bytes(path.read_bytes(), "x.safetensors")
    from safetensors.torch import save

    unmarked = save({"w": torch.zeros(2)})
    with pytest.raises(WeightsError, match="its metadata lacks format 'reprozoo-weights/2'"):
        registry.read_weights_bytes(unmarked, "x.safetensors")
    module, state = registry.read_weights_bytes(
        save({"w": torch.ones(2)}, {"format": registry.FORMAT, "module": CLASS}), "y"
    )
    assert module == CLASS and torch.equal(state["w"], torch.ones(2))


def test_unknown_name_suggests_close_ones(exported):
    with pytest.raises(WeightsError, match="Did you mean 'engression_test.tiny'"):
        registry.get_weights("engression_test.tinny")


def test_export_refuses_without_class_and_bad_names(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    with pytest.raises(WeightsError, match="does not record its module class"):
        export_checkpoint(ckpt, "engression_x.y", tmp_path / "out")
    with pytest.raises(WeightsError, match="method_arch.data"):
        export_checkpoint(ckpt, "no dots here", tmp_path / "out", module=CLASS)


def test_strict_loading_refuses_other_architecture(exported, tmp_path):
    entry, weights_file, _ = exported
    card = entry.to_card()
    card["hparams"]["generator"]["init_args"]["hidden_dim"] = 32  # the card says another width than the file holds
    registry.register_weights(registry.WeightsEntry.from_card(card), overwrite=True)
    with pytest.raises(WeightsError, match="does not fit EngressionRegressor"):
        registry.load_model(entry.name, offline=False, cache_dir=tmp_path / "cache2")


def test_fine_tune_from_zoo_weights(exported, tmp_path, monkeypatch):
    entry, _, model = exported
    monkeypatch.setenv("REPROZOO_CACHE", str(tmp_path / "cache3"))
    monkeypatch.setenv("REPROZOO_OFFLINE", "0")
    start = tiny_engression(weights=entry.name)
    for key, value in model.state_dict().items():
        assert torch.equal(start.state_dict()[key], value), key
    assert start.hparams.weights == entry.name
    with pytest.raises(WeightsError, match="does not fit"):
        tiny_engression(hidden_dim=8, weights=entry.name)


def test_bad_card_is_refused(tmp_path):
    card = tmp_path / "bad.json"
    card.write_text(json.dumps({"name": "a.b", "module": CLASS, "hparams": {}, "sha256": "0" * 64, "fil": "x"}))
    with pytest.raises(WeightsError, match="missing keys \\['file'\\]"):
        registry.register_weights(card)


@pytest.mark.parametrize(
    "name, old_module, network",
    [
        ("trm_mlp64.sudoku_gen40", "reprozoo.zoo.trm.TRMModule", "net"),
        ("engression_stonet.softplus_pre", "reprozoo.zoo.engression.EngressionRegressor", "generator"),
    ],
)
def test_zoo_files_written_before_the_layout_change_still_load(name, old_module, network, tmp_path):
    """A zoo file of the old layout (the class under reprozoo.zoo, the network's arguments flat in the module's
    hyperparameters) loads into the same model as the converted packaged entry."""
    entry = registry.get_weights(name)
    state = registry.read_weights(entry, registry.PACKAGE_DIR / entry.file)
    payload = {"format": registry.LEGACY_FORMAT, "state_dict": state}
    hparams = dict(entry.hparams)
    net = hparams.pop(network)["init_args"]
    flat = hparams | {k: v for k, v in net.items() if k not in ("rope_theta", "norm_eps")}  # TRM's two new ones
    torch.save({**payload, "module": old_module, "hparams": flat}, tmp_path / "old.pt")
    data = (tmp_path / "old.pt").read_bytes()
    card = entry.to_card() | {
        "name": "old_layout.x",
        "file": "old.pt",
        "module": old_module,
        "hparams": flat,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "url": None,
    }
    (tmp_path / "old_layout.x.json").write_text(json.dumps(card))

    old, new = registry.load_model(tmp_path / "old_layout.x.json"), registry.load_model(entry.name)
    assert type(old) is type(new) and old.hparams[network] == new.hparams[network]
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


@pytest.mark.parametrize("method", ["trm", "engression"])
def test_checkpoints_written_before_the_layout_change_are_converted_once(method, tmp_path, capsys):
    """A Lightning checkpoint of the old layout (class under reprozoo.zoo, network arguments flat) does not build
    today's module; `zoo upgrade` converts it, after which it loads into the same model as before."""
    from reprozoo._checks import RECORD_KEY, CheckpointError
    from reprozoo.cli import main
    from reprozoo.methods import EngressionRegressor, TRMModule
    from reprozoo.nets import StochasticMLP, TinyRecursiveNetwork

    if method == "trm":
        cls, network, old = TRMModule, "net", "reprozoo.zoo.trm.TRMModule"
        model = TRMModule(TinyRecursiveNetwork(hidden_size=16, expansion=1.0, puzzle_emb_ndim=16), n=1, T=1, n_sup=1)
    else:
        cls, network, old = EngressionRegressor, "generator", "reprozoo.zoo.engression.EngressionRegressor"
        model = EngressionRegressor(StochasticMLP(in_dim=2, hidden_dim=8, noise_dim=3))
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    hparams = dict(ckpt["hyper_parameters"])
    flat = {k: v for k, v in hparams.pop(network)["init_args"].items() if k not in ("rope_theta", "norm_eps")}
    ckpt["hyper_parameters"], ckpt[RECORD_KEY] = hparams | flat, old
    torch.save(ckpt, tmp_path / "old.ckpt")

    with pytest.raises(CheckpointError, match="zoo upgrade"):
        cls.load_from_checkpoint(tmp_path / "old.ckpt")
    assert main(["zoo", "upgrade", str(tmp_path / "old.ckpt"), "--out", str(tmp_path / "upgraded.ckpt")]) == 0
    assert "upgraded.ckpt" in capsys.readouterr().out
    loaded = cls.load_from_checkpoint(tmp_path / "upgraded.ckpt")
    assert loaded.hparams[network] == model.hparams[network]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
