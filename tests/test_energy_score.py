import math

import numpy as np
import pytest
import torch

from reprozoo.methods.engression import _energy_terms, energy_score


def _energy_score_numpy(y, samples, beta):
    """Independent loop implementation of the formula in the docs."""
    total = 0.0
    for yi, si in zip(y, samples):
        m = len(si)
        fit = np.mean([np.linalg.norm(s - yi) ** beta for s in si])
        pair = sum(np.linalg.norm(si[j] - si[k]) ** beta for j in range(m) for k in range(m) if j != k)
        total += fit - pair / (2 * m * (m - 1))
    return total / len(y)


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("d", [1, 3])
def test_matches_independent_computation(beta, d):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(7, d, generator=gen, dtype=torch.float64)
    samples = torch.randn(7, 5, d, generator=gen, dtype=torch.float64) * 2 + 0.5
    expected = _energy_score_numpy(y.numpy(), samples.numpy(), beta)
    assert energy_score(y, samples, beta).item() == pytest.approx(expected, rel=1e-10)


def _gaussian_crps(mu, sigma, y):
    z = (y - mu) / sigma
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def test_agrees_with_closed_form_gaussian_crps():
    """For Gaussian samples and a 1-d observation, the (unbiased) energy score with beta=1 estimates the CRPS."""
    gen = torch.Generator().manual_seed(1)
    b, m = 400, 400
    mu = torch.randn(b, generator=gen, dtype=torch.float64)
    sigma = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5
    y = mu + 1.5 * torch.randn(b, generator=gen, dtype=torch.float64)
    samples = mu[:, None] + sigma[:, None] * torch.randn(b, m, generator=gen, dtype=torch.float64)
    fit, spread = _energy_terms(y[:, None], samples[..., None], 1.0)
    per_row = fit - spread / 2
    exact = _gaussian_crps(mu, sigma, y)
    # Monte-Carlo standard error of the mean difference, estimated from the rows themselves
    se = (per_row - exact).std() / math.sqrt(b)
    assert abs(per_row.mean() - exact.mean()) < 4 * se
    assert energy_score(y[:, None], samples[..., None]).item() == pytest.approx(per_row.mean().item())
    assert se < 0.01  # the check above has teeth: the error is small compared with the CRPS (~1)


def test_minimised_by_the_true_distribution():
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(2000, 1, generator=gen)
    scores = {}
    for scale in (0.5, 1.0, 2.0):
        samples = scale * torch.randn(2000, 50, 1, generator=gen)
        scores[scale] = energy_score(y, samples).item()
    assert scores[1.0] < scores[0.5] and scores[1.0] < scores[2.0]


def test_gradients_finite_for_small_beta_and_tied_samples():
    samples = torch.zeros(3, 4, 2, requires_grad=True)  # all samples identical: zero pairwise distances
    y = torch.ones(3, 2)
    energy_score(y, samples, beta=0.5).backward()
    assert torch.isfinite(samples.grad).all()


def test_bad_shapes_and_beta():
    with pytest.raises(ValueError, match="samples"):
        energy_score(torch.zeros(3, 1), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="beta"):
        energy_score(torch.zeros(3, 1), torch.zeros(3, 4, 1), beta=2.5)
