"""k-nearest-neighbour search over a fixed reference set of small codes (NCA embeddings): :class:`KNNIndex`.

Three backends, chosen explicitly (``backend``), never silently:

* ``"torch"`` (the default; exact): ``||r||^2 - 2 q.r`` for a chunk of queries against all references by one
  plain GEMM, ``[q, 1] . [-2 r, ||r||^2]`` with the squared norms precomputed (``||q||^2`` is the same for every
  reference of a query, so it is added only to the k kept). The k smallest per query are found in two steps that
  are exact: the references are cut into blocks of ``block`` consecutive items and each block's minimum taken (one
  cheap reduction); the k blocks with the smallest minima hold the k nearest items (an item among the k nearest has
  a block minimum no larger than its own distance, so k other blocks cannot all come before its block), so the
  final top-k runs over k * ``block`` candidates instead of the whole row. Chunks of ``chunk`` queries keep the
  distance block near the cache. Exact search stays bounded by its GEMM: at d = 32 it is 784 / 32 = 24.5x fewer
  FLOPs than the raw 784-d search, the most any exact search in the codes can gain over an equally efficient raw
  one.
* ``"faiss_flat"`` (exact, needs faiss): faiss's brute-force index on the same stored codes.
* ``"faiss_ivf"`` (approximate, needs faiss): an inverted file: k-means into ``nlist`` cells, and each query scans
  only the items of its ``nprobe`` nearest cells. The only backend whose cost does not grow with the whole
  reference set; it can miss a true neighbour that sits in an unprobed cell. It stores each code as its residual to
  its cell's centroid (faiss's default), in fp16 when ``dtype`` is float16.

Storage (``dtype``): the codes are kept as ``float16`` (the default: 2 bytes per coordinate, faiss's fp16 scalar
quantiser for the faiss backends) or ``float32``; the search computes in float32. The codes are centred on their
mean first (stored with the index), which keeps the fp16 rounding and the ``||q||^2 + ||r||^2 - 2 q.r``
cancellation small relative to the distances between neighbours: each stored coordinate is within 2^-11 of its
centred value in relative terms (fp16's rounding, plus 2^-25 absolute below fp16's normal range).
:attr:`KNNIndex.nbytes` counts every stored array (codes, norms, mean; faiss's serialised index).

Neighbours come back nearest first; among exactly equal distances in lower index order. Which of several items
exactly tied at the k-th distance is kept follows ``torch.topk`` or faiss (the same on every run on the same
input).
faiss is optional: ``pip install 'reprozoo[faiss]'``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["KNNIndex", "vote"]

Backend = Literal["torch", "faiss_flat", "faiss_ivf"]
_FP16_MAX = 65504.0


def vote(neighbour_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote over neighbour labels (Q, k), nearest first -> (Q,) labels. Ties go to the class whose members
    are nearer: each vote weighs 1 plus a tie-breaker that favours nearer ranks (less than one vote in total)."""
    k = neighbour_labels.shape[1]
    weights = 1.0 + 1e-3 * (k - torch.arange(k, device=neighbour_labels.device)) / k
    votes = torch.zeros(len(neighbour_labels), num_classes, device=neighbour_labels.device)
    votes.scatter_add_(1, neighbour_labels, weights.expand_as(neighbour_labels).contiguous())
    return votes.argmax(dim=1)


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "KNNIndex: the faiss backends need faiss (pip install 'reprozoo[faiss]', or pip install faiss-cpu); "
            "backend='torch' needs nothing else"
        ) from err
    return faiss


class KNNIndex:
    """Exact or approximate Euclidean k-NN over ``reference`` (N, d), with optional ``labels`` (N,) for
    :meth:`predict`. See the module docstring for the backends and the storage.

    Args:
        backend: ``"torch"`` (exact), ``"faiss_flat"`` (exact) or ``"faiss_ivf"`` (approximate).
        dtype: storage of the codes, ``torch.float16`` or ``torch.float32``.
        chunk, block: the torch backend's queries per GEMM and references per block (see the module docstring).
        nlist, nprobe: the IVF's number of cells (default ``round(sqrt(N))``) and cells scanned per query.
        num_classes: for :meth:`predict` (default: the largest label + 1).
    """

    def __init__(
        self,
        reference: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        backend: Backend = "torch",
        dtype: torch.dtype = torch.float16,
        chunk: int = 128,
        block: int = 64,
        nlist: int | None = None,
        nprobe: int = 8,
        num_classes: int | None = None,
    ):
        if reference.dim() != 2 or len(reference) == 0:
            raise ValueError(f"KNNIndex: reference must be (N, d) with N >= 1, got {tuple(reference.shape)}")
        if backend not in ("torch", "faiss_flat", "faiss_ivf"):
            raise ValueError(f"KNNIndex: backend must be 'torch', 'faiss_flat' or 'faiss_ivf', got {backend!r}")
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"KNNIndex: dtype must be torch.float16 or torch.float32, got {dtype}")
        if labels is not None and labels.shape != reference.shape[:1]:
            raise ValueError(f"KNNIndex: labels must be ({len(reference)},), got {tuple(labels.shape)}")
        if chunk < 1 or block < 1 or nprobe < 1:
            raise ValueError(f"KNNIndex: chunk, block and nprobe must be >= 1, got {chunk}, {block}, {nprobe}")
        self.backend, self.dtype, self.chunk, self.block, self.nprobe = backend, dtype, chunk, block, nprobe
        self.num_items, self.dim = reference.shape
        self.labels = labels
        self.num_classes = num_classes
        ref = reference.detach().float()
        self.mean = ref.mean(dim=0)
        centred = ref - self.mean
        if dtype == torch.float16 and centred.abs().max() > _FP16_MAX:
            raise ValueError("KNNIndex: the centred codes exceed float16's range (65504); use dtype=torch.float32")
        if backend == "torch":
            # Padded to whole blocks: the padding's norm is +inf, so its distance is +inf and it is never picked.
            padded = -(-self.num_items // block) * block
            self.codes = torch.zeros(padded, self.dim, dtype=dtype, device=ref.device)
            self.codes[: self.num_items] = centred.to(dtype)
            stored = self.codes[: self.num_items].float()
            self.norms = torch.full((padded,), float("inf"), device=ref.device)
            self.norms[: self.num_items] = stored.pow(2).sum(dim=1)  # of the stored (rounded) codes: consistent
            self._index = None
        else:
            self.codes = self.norms = None
            self._index = self._faiss_index(centred, nlist)

    # ---- building ------------------------------------------------------------------------------------------

    def _faiss_index(self, centred: torch.Tensor, nlist: int | None):
        faiss = _faiss()
        x = centred.cpu().contiguous().numpy()
        fp16 = self.dtype == torch.float16
        if self.backend == "faiss_flat":
            index = (
                faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
                if fp16
                else faiss.IndexFlatL2(self.dim)
            )
        else:
            self.nlist = nlist or max(1, round(self.num_items**0.5))
            if not 1 <= self.nlist <= self.num_items:
                raise ValueError(f"KNNIndex: nlist must be in 1..{self.num_items} (the reference size), got {nlist}")
            self._quantizer = faiss.IndexFlatL2(self.dim)  # kept alive: the IVF index only points at it
            if fp16:
                index = faiss.IndexIVFScalarQuantizer(
                    self._quantizer, self.dim, self.nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2
                )
            else:
                index = faiss.IndexIVFFlat(self._quantizer, self.dim, self.nlist, faiss.METRIC_L2)
            index.cp.seed = 1234  # k-means is seeded: the same cells on every build
            index.train(x)
            index.nprobe = self.nprobe
        index.add(x)
        return index

    @property
    def nbytes(self) -> int:
        """Bytes of everything the index stores: codes, norms and mean (torch), or faiss's serialised index plus
        the mean."""
        mean = self.mean.numel() * self.mean.element_size()
        if self._index is None:
            return self.codes.numel() * self.codes.element_size() + self.norms.numel() * 4 + mean
        return int(_faiss().serialize_index(self._index).size) + mean

    def reference(self) -> torch.Tensor:
        """The stored reference codes (N, d) in float32, as the search sees them (fp16 rounding included)."""
        if self._index is None:
            return self.codes[: self.num_items].float() + self.mean
        x = self._index.reconstruct_n(0, self.num_items) if self.backend == "faiss_flat" else None
        if x is None:  # an IVF's items are stored by cell: reconstruct each by its id
            self._index.make_direct_map()
            x = self._index.reconstruct_n(0, self.num_items)
        return torch.from_numpy(x).to(self.mean.device) + self.mean

    # ---- search --------------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared distances (Q, k) float32, indices (Q, k) int64) of the ``k`` nearest references of each query
        (Q, d), nearest first."""
        if not 1 <= k <= self.num_items:
            raise ValueError(f"KNNIndex: k must be in 1..{self.num_items} (the reference size), got {k}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"KNNIndex: queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        q = queries.detach().float().to(self.mean.device) - self.mean
        if self._index is None:
            dist, idx = self._search_torch(q, k)
        else:
            dist, idx = self._search_faiss(q, k)
        # Both backends give nearest first; equal distances go in index order (sort by index, then stably by
        # distance), only in the rows that have any: two sorts of every row would cost as much as an IVF search.
        tied = (dist[:, 1:] == dist[:, :-1]).any(dim=1)
        if tied.any():
            d, i = dist[tied], idx[tied]
            by_index = i.sort(dim=1)
            d, i = d.gather(1, by_index.indices), by_index.values
            order = d.sort(dim=1, stable=True).indices
            dist[tied], idx[tied] = d.gather(1, order), i.gather(1, order)
        return dist, idx

    def _search_torch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [q, 1] . [-2 r, ||r||^2] = ||r||^2 - 2 q.r in one plain GEMM: addmm's bias would first be copied into the
        # whole (c, N') output and read back, which costs as much as the GEMM itself at d = 32.
        ref_t = torch.cat([-2.0 * self.codes.float(), self.norms[:, None]], dim=1).T.contiguous()  # (d + 1, N')
        q_aug = torch.cat([q, torch.ones(len(q), 1, device=q.device)], dim=1)
        n_blocks, block = len(self.codes) // self.block, self.block
        dists, indices = [], []
        for start in range(0, len(q), self.chunk):
            qc = q_aug[start : start + self.chunk]
            d = qc @ ref_t  # (c, N')
            if k < n_blocks:
                blocks = d.view(len(qc), n_blocks, block)
                best = blocks.amin(dim=2).topk(k, dim=1, largest=False).indices  # (c, k): the blocks that hold them
                cand = blocks.gather(1, best[:, :, None].expand(-1, -1, block)).flatten(1)  # (c, k * block)
                val, pos = cand.topk(k, dim=1, largest=False)
                idx = best.gather(1, pos // block) * block + pos % block
            else:
                val, idx = d.topk(k, dim=1, largest=False)
            dists.append((val + qc[:, :-1].pow(2).sum(dim=1, keepdim=True)).clamp_min_(0.0))
            indices.append(idx)
        return torch.cat(dists), torch.cat(indices)

    def _search_faiss(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _faiss()
        faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads as the torch backend
        if self.backend == "faiss_ivf":
            self._index.nprobe = self.nprobe
        dist, idx = self._index.search(q.cpu().contiguous().numpy(), k)
        dist, idx = torch.from_numpy(dist), torch.from_numpy(idx)
        missing = (idx < 0).any(dim=1)  # an IVF query whose probed cells hold fewer than k items: scan all cells
        if missing.any():
            self._index.nprobe = self.nlist
            d2, i2 = self._index.search(q[missing].cpu().contiguous().numpy(), k)
            self._index.nprobe = self.nprobe
            dist[missing], idx[missing] = torch.from_numpy(d2), torch.from_numpy(i2)
        return dist.to(self.mean.device), idx.to(self.mean.device)

    def predict(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Majority vote (:func:`vote`) of the ``k`` nearest references' labels for each query -> (Q,) labels."""
        if self.labels is None:
            raise ValueError("KNNIndex: predict needs the reference labels (KNNIndex(reference, labels, ...))")
        num_classes = self.num_classes or int(self.labels.max()) + 1
        _, idx = self.search(queries, k)
        return vote(self.labels.to(idx.device)[idx], num_classes)
