"""NCA: the loss against an independent computation (and where the naive one underflows), inits, kNN, the
Lightning module on the concentric rings and on real MNIST images, DDP."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from reprozoo.datamodules.rings import ConcentricRingsDataModule, make_rings
from reprozoo.methods.nca import NCAModule, knn_predict, lda_directions, nca_log_p, nca_loss, pca_directions
from tests.helpers import tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")


def _naive(e: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The textbook computation in float64: pairwise distances, exp, masked diagonal, normalise, sum same class."""
    e = e.double()
    n = len(e)
    p = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i != j:
                p[i, j] = math.exp(-float(((e[i] - e[j]) ** 2).sum()))
    p = p / p.sum(dim=1, keepdim=True)
    same = (y[:, None] == y[None, :]) & ~torch.eye(n, dtype=torch.bool)
    p_i = (p * same).sum(dim=1)
    valid = same.any(dim=1)
    return -torch.log(p_i[valid]).mean()


def test_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(12, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 3])  # class 3 has one point: left out of the mean
    assert nca_loss(e, y).item() == pytest.approx(_naive(e, y).item(), rel=1e-5)
    _, valid = nca_log_p(e, e, y, y)
    assert valid.tolist() == [True] * 11 + [False]


def test_loss_finite_where_the_naive_formula_underflows():
    e = torch.tensor([[0.0, 0.0], [40.0, 0.0], [0.0, 45.0], [41.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    naive = _naive(e.detach(), y)
    assert not torch.isfinite(naive)  # exp(-1600) underflows to 0 -> log 0
    loss = nca_loss(e, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all() and loss.item() > 100
    # no same-class neighbour anywhere: 0 with a graph, not NaN
    lone = torch.randn(3, 2, requires_grad=True)
    zero = nca_loss(lone, torch.tensor([0, 1, 2]))
    zero.backward()
    assert zero.item() == 0 and torch.equal(lone.grad, torch.zeros_like(lone))


def test_knn_predict_and_identity_init_equal_raw_knn():
    g = torch.Generator().manual_seed(1)
    ref, ref_y = torch.randn(60, 4, generator=g), torch.randint(0, 3, (60,), generator=g)
    q = torch.randn(25, 4, generator=g)
    for k in (1, 3, 5):
        pred = knn_predict(q, ref, ref_y, k, 3, chunk=7)
        d = torch.cdist(q, ref)
        idx = d.argsort(dim=1)[:, :k]
        for i in range(len(q)):
            counts = torch.bincount(ref_y[idx[i]], minlength=3)
            best = (counts == counts.max()).nonzero().flatten().tolist()
            assert pred[i].item() in best
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(q, ref, ref_y, 0, 3)
    # identity init, untrained, no standardisation: the learned space is the raw space
    model = NCAModule(in_dim=4, out_dim=4, init="identity", standardize=False)
    assert torch.equal(model.transform(q), q)


def test_pca_and_lda_directions():
    x, y = make_rings(100, noise_dims=1, noise_std=10.0, seed=0)
    pca = pca_directions(x.double(), 1)
    assert abs(pca[0, 2].item()) > 0.99  # the noise coordinate has most of the variance
    g = torch.Generator().manual_seed(0)
    blobs_y = torch.arange(300) % 3
    blobs = torch.randn(300, 5, generator=g, dtype=torch.float64)
    blobs[:, 4] += 3.0 * blobs_y  # classes differ along coordinate 4 only
    lda = lda_directions(blobs, blobs_y, 1)
    assert abs(lda[0, 4].item()) > 0.95


# configs/nca/rings.yaml's model (the zoo entry nca_linear.rings): the old defaults, before the post's recipe
RINGS_RECIPE = dict(in_dim=3, out_dim=2, init="pca", standardize=True, margin=0.0, optimizer="adam", lr=0.2)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return tiny_trainer(tmp_path, **({"max_epochs": 15, "enable_checkpointing": False} | kwargs))


def test_rings_nca_recovers_the_rings_pca_does_not(tmp_path):
    torch.manual_seed(0)
    dm = ConcentricRingsDataModule(n_train_per_class=60, n_val_per_class=40, n_test_per_class=40, batch_size=100)
    model = NCAModule(**RINGS_RECIPE, k=(1,))
    trainer = _trainer(tmp_path, max_epochs=40, check_val_every_n_epoch=20)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/knn1_acc"]
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert before < 0.6  # the PCA init (of the standardised data) mixes the noise coordinate in
    assert result["test/knn1_acc"] > 0.9 > before + 0.3
    assert result["test/knn1_acc_raw"] < result["test/knn1_acc"]  # the 3-D raw space still has the noise
    assert result["test/reference_bytes"] < result["test/reference_bytes_raw"]
    A = model.A.detach()
    assert (A[:, 2].abs() / A.norm(dim=0)[:2].mean()).max() < 0.2  # the noise coordinate projected out
    # one figure per validation epoch of fit (epochs 19 and 39), none for the validate/test runs
    assert sorted(p.name for p in (tmp_path / "nca").iterdir()) == ["embedding_epoch19.png", "embedding_epoch39.png"]


def test_standardisation_is_in_the_checkpoint_and_errors(tmp_path):
    dm = ConcentricRingsDataModule(n_train_per_class=20, n_val_per_class=10, n_test_per_class=10)
    model = NCAModule(in_dim=3, out_dim=2, init="lda", standardize=True, k=(1, 3))
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    assert model.std[2] > 5 and bool(model.initialised)
    loaded = NCAModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert torch.equal(loaded.std, model.std) and torch.equal(loaded.A, model.A)
    for kwargs, field in [
        ({"out_dim": 0}, "out_dim"),
        ({"init": "svd"}, "init"),
        ({"k": [0]}, "k"),
        ({"lr": 0.0}, "lr"),
        ({"margin": -1.0}, "margin"),
        ({"out_dim": 4, "init": "identity"}, "out_dim"),
    ]:
        with pytest.raises(ValueError, match=field):
            NCAModule(in_dim=3, **{"out_dim": 2, **kwargs})


def test_margin_term_is_the_posts_hinge_rescaled_to_the_batch_mean():
    from reprozoo.methods.nca import _margin_term

    e = torch.zeros(4, 2, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    assert _margin_term(e, e, y, y, 1.0).item() == pytest.approx(0.5)  # 8 of 16 pairs at distance 0: hinge 1
    far = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 0.0], [5.0, 0.1]])
    assert _margin_term(far, far, y, y, 1.0).item() == 0.0
    # torchnca's loss: sum_i -log p_i + mean_i sum_{j of another class} relu(1 - d_ij^2)^2. Ours is the batch mean
    # of -log p_i plus this term, so ours times B must be the post's loss, term by term, in float64 loops.
    g = torch.Generator().manual_seed(0)
    emb, labels = 0.4 * torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    b = len(emb)
    hinge_sum = sum(
        max(0.0, 1.0 - float(((emb[i] - emb[j]) ** 2).sum())) ** 2
        for i in range(b)
        for j in range(b)
        if labels[i] != labels[j]
    )
    post = b * _naive(emb, labels).item() + hinge_sum / b
    ours = nca_loss(emb, labels) + _margin_term(emb, emb, labels, labels, 1.0)
    assert 0 < hinge_sum and b * ours.item() == pytest.approx(post, rel=1e-9)


def test_defaults_are_the_posts_recipe_and_a_plain_fit_then_test_works(tmp_path):
    """The defaults are the torchnca post's MNIST recipe (raw inputs, N(0, 0.01^2) init, SGD with weight decay
    rescaled to the batch mean, the margin term); they learn to ignore 8 near-constant noise coordinates, and a test
    after a plain fit (no datamodule) uses fit's train loader as the reference set."""
    hp = NCAModule(in_dim=784).hparams
    assert (hp.init, hp.standardize, hp.optimizer, hp.margin, hp.margin_weight) == ("random", False, "sgd", 1.0, 1.0)
    assert hp.lr == pytest.approx(1e-4 * 512) and hp.weight_decay == pytest.approx(10 / 512)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    signal = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.9]])[labels] + 0.15 * torch.randn(600, 2, generator=g)
    x = torch.cat([signal, 1.0 * torch.randn(600, 8, generator=g)], dim=1)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:400], labels[:400]), batch_size=100)
    queries = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[400:], labels[400:]), batch_size=200)
    torch.manual_seed(0)
    model = NCAModule(in_dim=10, out_dim=2, k=(5,), plot=False)
    trainer = _trainer(tmp_path, max_epochs=15, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=train)
    result = trainer.test(model, dataloaders=queries, verbose=False)[0]
    assert result["test/knn5_acc"] > 0.9 and result["test/knn5_acc"] > result["test/knn5_acc_raw"] + 0.15
    A = model.A.detach()
    assert A[:, 2:].norm() < 0.5 * A[:, :2].norm()  # the noise coordinates mostly projected out
    with pytest.raises(ValueError, match="NCAModule: train_dataloaders must be one DataLoader"):
        _trainer(tmp_path).test(NCAModule(in_dim=10, k=(5,)), dataloaders=queries, verbose=False)


@pytest.mark.slow
def test_ddp_gradient_equals_the_single_process_gradient(tmp_path):
    """ddp_spawn with 2 processes, one step of SGD on the same global batch: the same A as one process."""
    data = ConcentricRingsDataModule(n_train_per_class=8, n_val_per_class=4, n_test_per_class=4, batch_size=20, seed=3)
    results = {}
    for devices in (1, 2):
        torch.manual_seed(0)
        model = NCAModule(
            in_dim=3, out_dim=2, init="random", standardize=False, optimizer="sgd", lr=0.5, k=(1,), plot=False
        )
        start = model.A.detach().clone()
        # 40 training items: one global batch of 40 in one process, two of 20 (one per rank) under DDP
        data.hparams.batch_size = 40 // devices
        kwargs = dict(strategy="ddp_spawn", devices=2) if devices == 2 else {}
        trainer = _trainer(
            tmp_path / str(devices),
            max_steps=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            use_distributed_sampler=True,
            **kwargs,
        )
        trainer.fit(model, datamodule=data)
        results[devices] = model.A.detach().clone()
    assert not torch.allclose(results[1], start)  # it moved
    torch.testing.assert_close(results[1], results[2], rtol=1e-4, atol=1e-6)


def test_nca_on_a_frozen_zoo_backbone_and_real_mnist(tmp_path):
    """NCA on the features of the zoo teacher (1200-d), on real MNIST images; the backbone stays frozen."""
    from reprozoo.datamodules import FashionMNISTDataModule
    from tests.conftest import real_data

    dm = FashionMNISTDataModule(
        dataset="mnist",
        data_dir=str(real_data("mnist")),
        train_source="test",
        num_train=400,
        val_size=100,
        num_test=100,
        flatten=True,
        batch_size=100,
    )
    torch.manual_seed(0)
    model = NCAModule(in_dim=1200, out_dim=8, encoder="mlp1200_mnist.teacher", init="pca", lr=0.01, k=(5,))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    assert not model.encoder.training and all(not p.requires_grad for p in model.encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test/knn5_acc"] > 0.9  # the teacher's features separate the digits
