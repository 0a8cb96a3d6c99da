"""KNNIndex (the k-NN search for NCA codes): neighbours and predictions against an independent brute force
(torch.cdist + a stable sort, float64), the fp16 storage's error bound, ties, and the faiss backends."""

from __future__ import annotations

import pytest
import torch

from reprozoo.methods._knn import KNNIndex, vote
from reprozoo.methods.nca import knn_predict


def _brute(q: torch.Tensor, ref: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances and indices of the k nearest, in float64, ties by index (stable sort)."""
    d = torch.cdist(q.double(), ref.double()).pow(2)
    order = d.sort(dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), order


def _data(n=700, d=32, q=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(6, d, generator=g)
    labels = torch.randint(0, 6, (n,), generator=g)
    ref = centres[labels] + torch.randn(n, d, generator=g) + 5.0  # off-centre: the index centres the codes
    queries = centres[torch.randint(0, 6, (q,), generator=g)] + torch.randn(q, d, generator=g) + 5.0
    return ref, labels, queries


def _gap_ok(true_sorted: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Queries whose k-th and (k+1)-th true distances differ by more than tol: their neighbour set is well defined."""
    return (true_sorted[:, k] - true_sorted[:, k - 1]) > tol


@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("block,chunk", [(64, 128), (7, 5), (1000, 64)])  # blocks, odd blocks/chunks, one block
def test_torch_float32_equals_brute_force(k, block, chunk):
    ref, labels, q = _data()
    index = KNNIndex(ref, labels, dtype=torch.float32, block=block, chunk=chunk)
    dist, idx = index.search(q, k)
    full = torch.cdist(q.double(), ref.double()).pow(2).sort(dim=1).values
    true_d, true_i = _brute(q, ref, k)
    ok = _gap_ok(full, k, 1e-3)
    assert ok.float().mean() > 0.95  # the check below is not vacuous
    assert torch.equal(idx[ok], true_i[ok])  # same neighbours in the same order (distinct distances)
    torch.testing.assert_close(dist.double(), true_d, rtol=1e-5, atol=1e-3)
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    # the predictions: the same vote over the brute force's neighbours, and knn_predict's
    expected = vote(labels[true_i], 6)
    assert torch.equal(index.predict(q, k)[ok], expected[ok])
    assert torch.equal(knn_predict(q, ref, labels, k, 6)[ok], expected[ok])


def test_fp16_storage_error_is_bounded_and_the_search_exact_on_what_is_stored():
    ref, labels, q = _data(seed=1)
    index = KNNIndex(ref, labels)  # float16, the default
    stored = index.reference()
    centred = ref - ref.mean(dim=0)
    # round to nearest fp16: relative 2^-11 of the centred value (+ 2^-25 absolute in fp16's subnormal range)
    assert ((stored - ref).abs() <= centred.abs() * 2**-11 + 2**-25 + 1e-5).all()  # + fp32 rounding of + mean
    assert (stored != ref).any()  # it is rounded
    assert index.nbytes == 704 * 32 * 2 + 704 * 4 + 32 * 4  # fp16 codes padded to 11 blocks of 64, norms, mean
    # exact on the stored codes: the brute force over `stored` gives the same neighbours
    dist, idx = index.search(q, 5)
    full = torch.cdist(q.double(), stored.double()).pow(2).sort(dim=1).values
    true_d, true_i = _brute(q, stored, 5)
    ok = _gap_ok(full, 5, 1e-3)
    assert torch.equal(idx[ok], true_i[ok])
    torch.testing.assert_close(dist.double(), true_d, rtol=1e-5, atol=1e-3)
    # against the fp32 codes: each distance within the stored error, ||r - r~|| <= 2^-11 ||r - mean|| (+ slack)
    err = (centred.norm(dim=1) * 2**-11 + 1e-5)[idx]
    exact = torch.cdist(q.double(), ref.double()).gather(1, idx)
    assert ((dist.double().sqrt() - exact).abs() <= err + 1e-3).all()


def test_ties_come_back_in_index_order_and_runs_repeat():
    g = torch.Generator().manual_seed(2)
    base = torch.randint(-3, 4, (40, 4), generator=g).float()  # small integers: exact distances, many ties
    ref = torch.cat([base, -base, base, -base])  # mean exactly 0 (centring is exact); item i and i + 80 always tie
    q = torch.randint(-3, 4, (30, 4), generator=g).float()
    index = KNNIndex(ref, dtype=torch.float32, block=8, chunk=7)
    dist, idx = index.search(q, 6)
    true = (q.double()[:, None] - ref.double()[None]).pow(2).sum(dim=2)  # exact integers
    torch.testing.assert_close(dist.double(), true.sort(dim=1).values[:, :6])  # the right distances
    assert torch.equal(true.gather(1, idx), dist.double())  # integers: every distance exact
    same = dist[:, 1:] == dist[:, :-1]
    assert same.any() and (idx[:, 1:][same] > idx[:, :-1][same]).all()  # equal distances: lower index first
    again = index.search(q, 6)
    assert torch.equal(again[1], idx) and torch.equal(again[0], dist)


def test_errors():
    ref, labels, q = _data(n=50, q=5)
    with pytest.raises(ValueError, match="backend"):
        KNNIndex(ref, backend="annoy")
    with pytest.raises(ValueError, match="k must be"):
        KNNIndex(ref).search(q, 51)
    with pytest.raises(ValueError, match="queries must be"):
        KNNIndex(ref).search(q[:, :3], 1)
    with pytest.raises(ValueError, match="labels"):
        KNNIndex(ref).predict(q, 1)
    with pytest.raises(ValueError, match="float16's range"):
        KNNIndex(ref * 1e5)
    assert torch.equal(KNNIndex(ref, labels).search(q, 50)[1].sort(dim=1).values, torch.arange(50).expand(5, -1))


def test_faiss_backends_agree_with_the_torch_one():
    pytest.importorskip("faiss", reason="the faiss backends need faiss-cpu (pip install 'reprozoo[faiss]')")
    ref, labels, q = _data(n=2000, q=200, seed=3)
    full = torch.cdist(q.double(), ref.double()).pow(2).sort(dim=1).values
    ok = _gap_ok(full, 5, 1e-2)
    assert ok.float().mean() > 0.9
    for dtype in (torch.float32, torch.float16):
        exact = KNNIndex(ref, labels, dtype=dtype)
        d_t, i_t = exact.search(q, 5)
        flat = KNNIndex(ref, labels, backend="faiss_flat", dtype=dtype)
        ivf = KNNIndex(ref, labels, backend="faiss_ivf", dtype=dtype, nlist=20, nprobe=20)  # every cell: exact
        # the same stored codes, up to one fp16 step (faiss rounds a few halfway values the other way)
        step = (ref - ref.mean(dim=0)).abs() * 2**-10 + 1e-5
        assert ((flat.reference() - exact.reference()).abs() <= step).all()
        # the IVF stores each code's residual to its cell's centroid (faiss's default): rounded, but not alike
        centred_norm = (ref - ref.mean(dim=0)).norm(dim=1)
        assert ((ivf.reference() - ref).norm(dim=1) <= centred_norm * 2**-10 + 1e-4).all()
        for other in (flat, ivf):
            d_o, i_o = other.search(q, 5)
            torch.testing.assert_close(d_o, d_t, rtol=1e-4, atol=1e-2 if dtype == torch.float32 else 0.1)
            if dtype == torch.float32:  # identical codes: the same neighbours wherever they are well defined
                assert torch.equal(i_o[ok], i_t[ok])
            else:
                assert (i_o[:, :, None] == i_t[:, None, :]).any(dim=2).float().mean() > 0.97
        # with one cell probed the IVF may miss neighbours, but the distances it gives are true and never nearer
        ivf.nprobe = 1
        d_1, i_1 = ivf.search(q, 5)
        true_of_returned = torch.cdist(q.double(), ivf.reference().double()).pow(2).gather(1, i_1)
        torch.testing.assert_close(d_1.double(), true_of_returned, rtol=1e-4, atol=1e-2)
        assert (d_1 >= d_t - 0.1).all()
        assert (i_1[:, :, None] == i_t[:, None, :]).any(dim=2).float().mean() > 0.5
        assert ivf.predict(q, 5).shape == (200,)
