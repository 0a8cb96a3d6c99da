"""Neighbourhood Components Analysis: Goldberger, Hinton, Roweis & Salakhutdinov, NIPS 2004.

NCA learns a linear map A (d x D) under which the stochastic nearest-neighbour classifier is right as often as
possible: point i picks neighbour j with probability

    p_ij = exp(-||A x_i - A x_j||^2) / sum_{k != i} exp(-||A x_i - A x_k||^2),    p_ii = 0,

and is correct with p_i = sum of p_ij over the j of i's class. The objective is the mean of -log p_i (the paper's
log variant, eq. 5), here over mini-batches. With d << D, kNN then runs in a much smaller space.

The defaults are the recipe of the torchnca post (Kevin Zakka, "Neighbourhood Components Analysis", 2020, and its
``examples/knn.py``): raw inputs (no standardisation), A from N(0, 0.01^2), SGD with momentum 0.9 and weight decay,
and the post's squared hinge ``margin`` term between different classes (on by default, as in torchnca's loss).

Beyond the paper (each a switch): a small non-linear ``encoder`` before A ("deep NCA", Salakhutdinov & Hinton
2007's direction, not this paper's); the hinge ``margin`` term (the post's, not the paper's; ``margin=0`` gives the
paper's objective alone); mini-batch training with the batch all-gathered across processes.

Distributed and XLA: under DDP the batch is all-gathered (the exact global-batch gradient), the reference set and
the initialisation use the whole training split on every process, and k-NN accuracies are torchmetrics. Not
XLA-ready (boolean-mask indexing and a host read per step, float64 eigendecomposition): warned at start-up.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from reprozoo._checks import CheckpointGuard, check_finite_loss
from reprozoo._files import save_figure
from reprozoo._validate import check
from reprozoo._xla import warn_if_xla
from reprozoo.methods._knn import KNNIndex, vote
from reprozoo.zoo.registry import load_model, load_pretrained_into

__all__ = ["KNNIndex", "NCAModule", "knn_predict", "nca_log_p", "nca_loss", "pca_directions", "lda_directions"]


# ------------------------------------------------------------------------------------------------------- the loss


def nca_log_p(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_labels: torch.Tensor,
    key_labels: torch.Tensor,
    self_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_i (Q,), valid (Q,)) for query embeddings (Q, d) among key embeddings (K, d).

    ``self_index`` (Q,) gives each query's own row among the keys (excluded: p_ii = 0); None when the queries are
    the keys themselves (Q == K). Computed in log space: a log-softmax over the keys, then a logsumexp over the
    same-class keys, so nothing underflows however far apart the points are. ``valid`` is False for a query with
    no same-class key other than itself (its log p_i is -inf)."""
    if self_index is None:
        self_index = torch.arange(len(queries), device=queries.device)
    d2 = torch.cdist(queries, keys).pow(2)  # (Q, K)
    rows = torch.arange(len(queries), device=queries.device)
    logits = -d2
    logits[rows, self_index] = float("-inf")
    log_softmax = logits.log_softmax(dim=1)  # (Q, K): log p_ij
    same = query_labels[:, None] == key_labels[None, :]
    same[rows, self_index] = False
    valid = same.any(dim=1)
    log_p = log_softmax.masked_fill(~same, float("-inf")).logsumexp(dim=1)  # (Q,)
    return log_p, valid


def nca_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-(1/B') sum_i log p_i`` over a batch of embeddings (B, d) with labels (B,), where the mean runs over the
    B' points that have at least one same-class neighbour in the batch (the others have p_i = 0 by construction and
    carry no signal; they are left out). 0 (with a graph) when no point qualifies."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"nca_loss expects embeddings (B, d) and labels (B,), got {tuple(embeddings.shape)}, {tuple(labels.shape)}"
        )
    log_p, valid = nca_log_p(embeddings, embeddings, labels, labels)
    if not valid.any():
        return embeddings.sum() * 0.0
    return -log_p[valid].mean()


def _margin_term(queries, keys, query_labels, key_labels, margin: float) -> torch.Tensor:
    """The torchnca post's squared hinge ``relu(margin - ||e_i - e_j||^2)^2`` on different-class pairs, averaged
    over all (Q, K) query-key pairs (same-class pairs count 0): keeps classes at least ``margin`` apart (squared
    distance), so the embedding cannot shrink onto a point.

    torchnca adds ``mean_i sum_j hinge^2`` to the batch *sum* of -log p_i; divided by the batch size B (our loss is
    the batch mean) that is ``sum_ij hinge^2 / B^2``, this pair mean: weight 1 keeps the post's balance at any B."""
    d2 = torch.cdist(queries, keys).pow(2)  # (Q, K)
    other = query_labels[:, None] != key_labels[None, :]
    return (F.relu(margin - d2) * other).pow(2).mean()


# ------------------------------------------------------------------------------------------------------- inits


def pca_directions(x: torch.Tensor, d: int) -> torch.Tensor:
    """The top-``d`` principal directions of x (N, D) as rows (d, D) (SVD of the centred data)."""
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh[:d]


def lda_directions(x: torch.Tensor, y: torch.Tensor, d: int, shrinkage: float = 1e-3) -> torch.Tensor:
    """The top-``d`` Fisher discriminant directions (d, D): eigenvectors of S_w^-1 S_b (S_w shrunk towards the
    identity by ``shrinkage`` times its mean eigenvalue so it is invertible), scaled to unit norm. Beyond
    ``num_classes - 1`` directions LDA has no more discriminant ones; the rest are the next eigenvectors."""
    mean = x.mean(dim=0)
    dim = x.shape[1]
    s_w = torch.zeros(dim, dim, dtype=x.dtype)
    s_b = torch.zeros(dim, dim, dtype=x.dtype)
    for c in y.unique():
        xc = x[y == c]
        mc = xc.mean(dim=0)
        s_w += (xc - mc).T @ (xc - mc)
        s_b += len(xc) * torch.outer(mc - mean, mc - mean)
    s_w += shrinkage * s_w.diagonal().mean() * torch.eye(dim, dtype=x.dtype)
    # Symmetric form: S_w^-1/2 S_b S_w^-1/2 has the same eigenvalues; map its eigenvectors back.
    evals, evecs = torch.linalg.eigh(s_w)
    inv_sqrt = evecs @ torch.diag(evals.clamp_min(1e-12).rsqrt()) @ evecs.T
    _, vecs = torch.linalg.eigh(inv_sqrt @ s_b @ inv_sqrt)
    directions = (inv_sqrt @ vecs[:, -d:].flip(1)).T  # (d, D), largest first
    return directions / directions.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------------- kNN


def knn_predict(
    queries: torch.Tensor,
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    k: int,
    num_classes: int,
    chunk: int = 1024,
) -> torch.Tensor:
    """Majority vote of the ``k`` nearest reference points (Euclidean) for each query (Q, D) -> (Q,) labels.
    Ties go to the class whose members are nearer (:func:`reprozoo.methods._knn.vote`). Queries are processed in
    chunks to bound memory. A plain exact search (``torch.cdist`` + ``topk``), the raw-space baseline; for a fixed
    reference set of NCA codes, :class:`KNNIndex` is the search made for it (fp16 storage, faster, faiss)."""
    if not 1 <= k <= len(reference):
        raise ValueError(f"knn_predict: k must be in 1..{len(reference)} (the reference size), got {k}")
    out = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], reference)  # (q, N)
        idx = d.topk(k, dim=1, largest=False).indices  # (q, k), nearest first
        out.append(vote(reference_labels[idx], num_classes))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------- module


class NCAModule(CheckpointGuard, L.LightningModule):
    """NCA as a LightningModule: a linear projection A (``out_dim`` x ``in_dim``) trained with :func:`nca_loss` on
    mini-batches, evaluated by k-NN in the learned space against k-NN in the raw input space.

    * ``init``: ``identity`` (the first ``out_dim`` rows of I), ``random`` (N(0, 0.01^2), as torchnca; the
      default), ``pca`` or ``lda`` (top principal / Fisher directions of the (standardised, if ``standardize``)
      training inputs, computed at the start of ``fit`` on up to ``init_samples`` training items).
    * ``standardize`` (off by default, as the post's MNIST run): inputs are shifted and scaled by the per-feature
      mean and std of the training data (computed with the init; constant features keep std 1); both are buffers,
      so checkpoints and zoo files carry them. On MNIST it costs about 1.5 points of 5-NN error: it blows up
      near-constant border pixels to unit variance (docs/nca.md).
    * ``encoder``: an optional module before A (deep NCA; beyond the paper), e.g. an MLP ``class_path``, trained
      with A unless ``freeze_encoder``; or a zoo name, whose model is a frozen feature extractor (its
      ``forward_features``). ``in_dim`` is then the feature size.
    * Under DDP the batch's embeddings are all-gathered with gradients flowing back to their rank
      (``all_gather(sync_grads=True)``), so every point's neighbourhood is the global batch and the gradient is
      exactly that of the global batch loss.
    * Validation/test: the training split (``reference="train"``: the datamodule's train loader, read whole, in
      order, on every rank) is embedded as the reference set; each query batch is classified by k-NN for every
      ``k`` in the learned space (``{stage}/knn{k}_acc``) and, with ``compare_raw``, in the raw input space (the
      flattened inputs as given, not standardised: ``{stage}/knn{k}_acc_raw``); ``{stage}/knn_ms_per_query`` and ``..._raw`` time the search, and
      ``{stage}/reference_bytes`` and ``..._raw`` give the reference set's storage.
    * ``transform(x)`` and ``predict_step`` give embeddings. After each validation epoch of ``fit`` (``plot``), a
      scatter plot of the validation embeddings (the two coordinates when ``out_dim`` is 2, else their top two
      principal components; rank 0's share under DDP) is written to ``<log_dir>/nca/embedding_epoch{N}.png`` and
      logged to TensorBoard (``nca/embedding``).
    * Plain Lightning works: ``trainer.fit(model, train_dataloaders=..., val_dataloaders=...)``; the reference set
      and the initialisation then come from the train loader's dataset.

    Args:
        in_dim: input size D (after flattening); out_dim: d.
        margin: squared-distance margin of the post's squared hinge term between different classes (0 = off, the
            paper's objective alone); margin_weight: its weight.
        lr, weight_decay, optimizer: of the optimiser (weight decay acts on A and the encoder; ``sgd`` has
            momentum 0.9). The defaults are torchnca's lr 1e-4 and weight decay 10 on its batch-*summed* loss,
            rescaled to our batch-mean loss at its batch of 512: lr 1e-4 * 512, weight decay 10 / 512.
        k: the k of the k-NN evaluations (the number of classes comes from the datamodule's ``num_classes``, or
            else from the reference labels).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 2,
        *,
        init: Literal["identity", "random", "pca", "lda"] = "random",
        standardize: bool = False,
        encoder: nn.Module | str | None = None,
        freeze_encoder: bool = False,
        margin: float = 1.0,
        margin_weight: float = 1.0,
        optimizer: Literal["adam", "sgd"] = "sgd",
        lr: float = 0.0512,
        weight_decay: float = 0.01953125,
        k: Sequence[int] = (1, 5),
        compare_raw: bool = True,
        init_samples: int = 10000,
        plot: bool = True,
        weights: str | None = None,
    ):
        super().__init__()

        check(isinstance(in_dim, int) and in_dim >= 1, "NCAModule", "in_dim", in_dim, "an integer >= 1")
        check(isinstance(out_dim, int) and out_dim >= 1, "NCAModule", "out_dim", out_dim, "an integer >= 1")
        check(
            init in ("identity", "random", "pca", "lda"),
            "NCAModule",
            "init",
            init,
            "'identity', 'random', 'pca' or 'lda'",
        )
        check(
            init != "identity" or out_dim <= in_dim,
            "NCAModule",
            "out_dim",
            out_dim,
            f"<= in_dim ({in_dim}) with init='identity'",
        )
        check(margin >= 0, "NCAModule", "margin", margin, ">= 0")
        check(margin_weight >= 0, "NCAModule", "margin_weight", margin_weight, ">= 0")
        check(lr > 0, "NCAModule", "lr", lr, "> 0")
        check(weight_decay >= 0, "NCAModule", "weight_decay", weight_decay, ">= 0")
        check(optimizer in ("adam", "sgd"), "NCAModule", "optimizer", optimizer, "'adam' or 'sgd'")
        check(
            len(k) > 0 and all(isinstance(v, int) and v >= 1 for v in k),
            "NCAModule",
            "k",
            k,
            "a non-empty list of integers >= 1",
        )
        check(init_samples >= 1, "NCAModule", "init_samples", init_samples, ">= 1")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        if isinstance(self.hparams.get("encoder"), nn.Module):
            self.hparams["encoder"] = None  # a Python object, not a config: pass it again to load_from_checkpoint
        if isinstance(encoder, str):  # a zoo entry: a pretrained feature extractor, always frozen
            encoder, freeze_encoder = load_model(encoder), True
        if encoder is not None and freeze_encoder:
            encoder.requires_grad_(False).eval()
        self._freeze_encoder = bool(freeze_encoder)
        self.encoder = encoder
        self.A = nn.Parameter(self._initial_A())  # (d, D)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.register_buffer("initialised", torch.tensor(init in ("identity", "random") and not standardize))
        self.train_loss = MeanMetric()
        self._metrics = nn.ModuleDict()  # k-NN accuracies, made in setup once the number of classes is known
        self._num_classes: int | None = None
        self._reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (embedded, raw, labels)
        self._timings: dict[str, float] = {}
        self._val_embeddings: list[tuple[torch.Tensor, torch.Tensor]] = []  # for the figure
        self._fit_loader = None  # the train loader of the last plain fit: the reference set of a later test
        if weights:
            load_pretrained_into(self, weights)

    def _initial_A(self) -> torch.Tensor:
        hp = self.hparams
        if hp.init == "identity":
            return torch.eye(hp.out_dim, hp.in_dim)
        return 0.01 * torch.randn(hp.out_dim, hp.in_dim)  # random, and the placeholder of pca/lda until fit starts

    # ---- the map ------------------------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs NCA sees (B, in_dim): flattened, or the encoder's features (its ``forward_features`` when it
        has one, e.g. a zoo classifier, else its output)."""
        if self.encoder is None:
            return x.flatten(1)
        net = getattr(self.encoder, "net", None)  # a zoo ClassifierModule: its network's features
        extract = (
            getattr(self.encoder, "forward_features", None) or getattr(net, "forward_features", None) or self.encoder
        )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._freeze_encoder):
            return extract(x).flatten(1)

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return (x - self.mean) / self.std if self.hparams.standardize else x

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None and self._freeze_encoder:
            self.encoder.eval()  # a frozen encoder keeps its BatchNorm statistics and dropout off
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, out_dim) of inputs (B, ...)."""
        return self.standardized(x) @ self.A.T

    forward = transform

    # ---- initialisation from the training data -------------------------------------------------------------

    def _training_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, n = [], [], 0
        for batch in self._plain_train_loader():
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            with torch.no_grad():
                x = self.features(x)
            xs.append(x)
            ys.append(y)
            n += len(y)
            if n >= self.hparams.init_samples:
                break
        return torch.cat(xs)[: self.hparams.init_samples], torch.cat(ys)[: self.hparams.init_samples]

    def _plain_train_loader(self):
        """The training split in dataset order, unsharded: the same on every rank (statistics and the reference
        set must not depend on the process)."""
        from torch.utils.data import DataLoader

        trainer = self.trainer
        if trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        else:
            loader = trainer.train_dataloader
            # Lightning sets trainer.train_dataloader only when the training loop starts, after on_fit_start and
            # the sanity check; the loader given to fit is already in the fit loop's data source.
            source = getattr(trainer.fit_loop, "_data_source", None)
            if loader is None and getattr(source, "instance", None) is not None and source.is_defined():
                loader = source.dataloader()
            # validate/test after a plain fit: the reference set is the training split that fit saw
            loader = self._fit_loader if loader is None else loader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "NCAModule: train_dataloaders must be one DataLoader of (inputs, labels) batches (the k-NN reference "
                f"set and the initialisation read its dataset), got {type(loader).__name__}: fit with "
                "trainer.fit(model, train_dataloaders=...) first, or use a datamodule"
            )
        if trainer.state.fn == "fit":
            self._fit_loader = loader
        batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 256
        return DataLoader(loader.dataset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn)

    def on_fit_start(self) -> None:
        for metric in self.modules():  # fresh states outside inference mode (see ClassifierModule.on_fit_start)
            if isinstance(metric, Metric):
                metric.reset()
        if self.trainer.datamodule is None:
            self._plain_train_loader()  # checks the train loader now, and keeps it for a later validate/test
        if bool(self.initialised) or self.trainer.global_step > 0:
            return
        hp = self.hparams
        x, y = self._training_sample()
        x = x.double()
        if hp.standardize:
            mean, std = x.mean(dim=0), x.std(dim=0)
            std = torch.where(std > 1e-8, std, torch.ones_like(std))
            x = (x - mean) / std
            self.mean.copy_(mean.float())
            self.std.copy_(std.float())
        if hp.init == "pca":
            self.A.data.copy_(pca_directions(x, hp.out_dim).float())
        elif hp.init == "lda":
            self.A.data.copy_(lda_directions(x, y, hp.out_dim).float())
        self.initialised.fill_(True)

    # ---- training -----------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        emb = self.transform(x)  # (B, d)
        world = self.trainer.world_size
        if world > 1:
            # (world, B, d), gradients summed back to each rank: the exact gradient of the global-batch loss.
            keys = self.all_gather(emb, sync_grads=True).flatten(0, 1)
            key_labels = self.all_gather(y).flatten(0, 1)
            offset = self.global_rank * len(y)
        else:
            keys, key_labels, offset = emb, y, 0
        self_index = torch.arange(len(y), device=emb.device) + offset
        log_p, valid = nca_log_p(emb, keys, y, key_labels, self_index)
        n_valid = valid.sum()
        total_valid = self.trainer.strategy.reduce(n_valid.float(), reduce_op="sum") if world > 1 else n_valid.float()
        # This rank's share of -(1/N') sum_i log p_i; the world factor undoes DDP's gradient averaging.
        loss = -log_p[valid].sum() * world / total_valid.clamp_min(1)
        if self.hparams.margin > 0:
            hinge = _margin_term(emb, keys, y, key_labels, self.hparams.margin)
            loss = loss + self.hparams.margin_weight * hinge
            self.log("train/margin", hinge.detach(), on_step=True, on_epoch=True, batch_size=len(y))
        check_finite_loss(self, loss, batch_idx)
        if n_valid > 0:
            self.train_loss(-log_p[valid].mean().detach(), n_valid)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay)
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ---- k-NN evaluation ----------------------------------------------------------------------------------

    def _prepare_reference(self, stage: str) -> None:
        embedded, raws, labels = [], [], []
        with torch.no_grad():
            for batch in self._plain_train_loader():
                x = batch[0].to(self.device)
                embedded.append(self.transform(x))
                raws.append(x.flatten(1))
                labels.append(batch[1].to(self.device))
        labels = torch.cat(labels)
        self._make_metrics(int(labels.max()) + 1)  # when the datamodule did not say
        self._reference = (torch.cat(embedded), torch.cat(raws), labels)
        self._timings = {"learned": 0.0, "raw": 0.0, "queries": 0.0}

    def setup(self, stage: str) -> None:
        warn_if_xla(
            self,
            "its loss keeps the valid pairs by boolean-mask indexing (shapes that depend on the data) "
            "and reads their count on the host every step, the pca/lda initialisation is a float64 "
            "eigendecomposition, and the k-NN timings measure graph tracing, not the device",
        )
        self._make_metrics(getattr(self.trainer.datamodule, "num_classes", None))

    def _make_metrics(self, num_classes: int | None) -> None:
        if len(self._metrics) or num_classes is None:
            return
        self._num_classes = int(num_classes)
        for split in ("val", "test"):
            for kk in self.hparams.k:
                for space in ("", "_raw"):
                    metric = MulticlassAccuracy(num_classes=self._num_classes, average="micro")
                    self._metrics[f"{split}_knn{kk}{space}"] = metric.to(self.device)

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings = []
        self._prepare_reference("val")

    def on_test_epoch_start(self) -> None:
        self._prepare_reference("test")

    def _knn_step(self, batch, stage: str) -> None:
        x, y = batch[0], batch[1]
        embedded, raw, labels = self._reference
        learned = self.transform(x)
        if stage == "val" and self.hparams.plot and not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            self._val_embeddings.append((learned.detach().cpu(), y.detach().cpu()))
        spaces = [("", "learned", learned, embedded)]
        if self.hparams.compare_raw:
            spaces.append(("_raw", "raw", x.flatten(1), raw))
        for suffix, space, q, ref in spaces:
            start = time.perf_counter()
            preds = {kk: knn_predict(q, ref, labels, min(kk, len(ref)), self._num_classes) for kk in self.hparams.k}
            self._timings[space] += time.perf_counter() - start
            for kk, pred in preds.items():
                key = f"{stage}_knn{kk}{suffix}"
                metric = self._metrics[key]
                metric.update(pred, y)
                self.log(f"{stage}/knn{kk}_acc{suffix}", metric, batch_size=len(y), metric_attribute=f"_metrics.{key}")
        self._timings["queries"] += len(y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._knn_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._knn_step(batch, "test")

    def _log_costs(self, stage: str) -> None:
        embedded, raw, _ = self._reference
        n = max(self._timings["queries"], 1)
        values = {
            f"{stage}/knn_ms_per_query": 1000 * self._timings["learned"] / n,
            f"{stage}/reference_bytes": float(embedded.numel() * embedded.element_size() + self.A.numel() * 4),
        }
        if self.hparams.compare_raw:
            values[f"{stage}/knn_ms_per_query_raw"] = 1000 * self._timings["raw"] / n
            values[f"{stage}/reference_bytes_raw"] = float(raw.numel() * raw.element_size())
        self.log_dict(values, rank_zero_only=True)

    def on_test_epoch_end(self) -> None:
        self._log_costs("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch if isinstance(batch, torch.Tensor) else batch[0]
        out = {"embedding": self.transform(x)}
        if not isinstance(batch, torch.Tensor) and len(batch) > 1:
            out["label"] = batch[1]
        return out

    # ---- figure -------------------------------------------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        self._log_costs("val")
        if self._val_embeddings:
            emb, labels = (torch.cat(parts) for parts in zip(*self._val_embeddings))
            self._val_embeddings = []
            self._save_scatter(emb, labels, Path(self.trainer.log_dir or self.trainer.default_root_dir) / "nca")

    @rank_zero_only
    def _save_scatter(self, emb: torch.Tensor, labels: torch.Tensor, folder: Path) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        emb, labels = emb[:5000].double(), labels[:5000]  # enough points to see the classes, a light PNG
        if emb.shape[1] > 2:  # the plane where the embedding spreads most
            emb, what = (emb - emb.mean(dim=0)) @ pca_directions(emb, 2).T, "top 2 principal components"
        else:
            emb, what = torch.cat([emb, torch.zeros(len(emb), 2 - emb.shape[1], dtype=emb.dtype)], dim=1), "A x"
        fig = Figure(figsize=(5.5, 5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        scatter = ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=6)
        ax.legend(*scatter.legend_elements(), fontsize=7, loc="best", title="class")
        ax.set_title(f"NCA {self.hparams.out_dim}-d embedding, {what} (validation, epoch {self.current_epoch})")
        folder.mkdir(parents=True, exist_ok=True)
        save_figure(fig, folder / f"embedding_epoch{self.current_epoch}.png")
        for logger in self.trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("nca/embedding", fig, global_step=self.global_step)
