"""Fréchet distance: compared with independent float64 numpy/scipy computations written here."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from hf_normalign.diagnostics.maths.frechet import (
    NS_TOL,
    GaussianMoments,
    frechet_distance,
    frechet_from_moments,
    trace_sqrt_product,
)


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook route: np.cov (N-1) and scipy's sqrtm of the non-symmetric product."""
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sx @ sy).real
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(sx) + np.trace(sy) - 2 * np.trace(covmean))


def eigh_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Symmetric route on the full covariances, numpy only: S_x = U L U^T, A = U sqrt(L)."""
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    lam, u = np.linalg.eigh(sx)
    a = u * np.sqrt(np.clip(lam, 0, None))
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ sy @ a), 0, None)).sum()
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + np.trace(sx) + np.trace(sy) - 2 * tr_sqrt)


# --- error bounds --------------------------------------------------------------------------------------------
# Each route factors or diagonalises a PSD matrix M (d x d, or n x m on the low-rank route) with backward-stable
# float64 kernels (Cholesky, eigh, SVD, matmuls): they return the exact result for M + E with
# ||E||_2 <= C * d * eps * ||M||_2. C = 30 is the threshold LAPACK's own test suite accepts for these residuals
# (||A - Z L Z^T|| / (n ||A|| eps) < 30), so any BLAS/LAPACK build, kernel or thread count that passes LAPACK's
# tests stays inside it. By Weyl each eigenvalue moves by at most delta = C d eps ||M||, and its square root
# by at most min(sqrt(delta), delta / sqrt(lambda)): null eigenvalues (rank-deficient covariances) give the
# sqrt(eps) floor, tiny ones are amplified by 1 / sqrt(lambda), i.e. by sqrt(cond).
EPS64 = float(np.finfo(np.float64).eps)
BACKWARD_ERROR_C = 30.0


def trace_sqrt_error_bound(eigenvalues: np.ndarray, d: int) -> float:
    """Bound on |computed - true| of sum_i sqrt(lambda_i) for a PSD matrix with these eigenvalues (see above)."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    delta = BACKWARD_ERROR_C * d * EPS64 * lam.max()
    return float(np.where(lam > delta, delta / np.sqrt(np.maximum(lam, delta)), np.sqrt(delta)).sum())


def product_spectrum(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Eigenvalues of S_x S_y (numpy's symmetric route, independent of the code under test)."""
    lam, u = np.linalg.eigh(sx)
    a = u * np.sqrt(np.clip(lam, 0, None))
    return np.linalg.eigvalsh(a.T @ sy @ a)


def frechet_error_bound(x: np.ndarray, y: np.ndarray) -> float:
    """Bound on |FD_a - FD_b| of two routes: each route's trace term is within the bound above (hence 2 x), and
    FD carries the term twice (2 x again); the mean and trace terms add only O(d eps) relative."""
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return 2 * 2 * trace_sqrt_error_bound(product_spectrum(sx, sy), x.shape[1])


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mix = np.eye(d) + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * rng.uniform(0.5, 2.0, size=d) + shift


def exact_moments_data(rng: np.random.Generator, n: int, variances: np.ndarray) -> np.ndarray:
    """n rows whose sample mean is 0 and sample covariance (N-1) is exactly diag(variances)."""
    nonzero = np.flatnonzero(variances)
    q, _ = np.linalg.qr(np.c_[np.ones(n), rng.normal(size=(n, nonzero.size))])
    out = np.zeros((n, variances.size))
    out[:, nonzero] = q[:, 1:] * np.sqrt(variances[nonzero] * (n - 1))  # orthonormal, orthogonal to 1
    return out


@pytest.mark.parametrize("d", [8, 64, 256, 1024])
def test_matches_scipy_sqrtm_well_conditioned(d: int) -> None:
    rng = np.random.default_rng(d)
    x = correlated(rng, 2 * d + 50, d)
    y = correlated(rng, 2 * d + 31, d, shift=0.2)
    ref = scipy_fid(x, y)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize(("d", "n", "m"), [(64, 32, 40), (64, 20, 500), (256, 50, 300), (128, 30, 30)])
def test_rank_deficient_low_rank_route(d: int, n: int, m: int) -> None:
    rng = np.random.default_rng(n + m)
    x = rng.normal(size=(n, d))
    y = 1.3 * rng.normal(size=(m, d)) + 0.1
    ours = frechet_distance(x, y)
    # Every d x d route carries the sqrt(eps) floor of its d - rank null eigenvalues (scipy's Schur-based sqrtm
    # of the product too); the n x m route does not.
    bound = frechet_error_bound(x, y)
    assert abs(ours - eigh_fid(x, y)) <= bound
    assert abs(ours - scipy_fid(x, y)) <= bound
    via_moments = frechet_from_moments(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert abs(ours - via_moments) <= bound


def test_rank_deficient_closed_form() -> None:
    # Sample covariances exactly diag(a) and diag(b) with zeros: tr sqrt = sum sqrt(a_i b_i).
    rng = np.random.default_rng(7)
    d = 96
    a = np.r_[rng.uniform(0.5, 2.0, 40), np.zeros(d - 40)]
    b = np.r_[np.zeros(20), rng.uniform(0.5, 2.0, 50), np.zeros(d - 70)]
    x = exact_moments_data(rng, 60, a)
    y = exact_moments_data(rng, 80, b) + 0.5
    expected = 0.25 * d + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(x, y, sqrt="newton_schulz") == pytest.approx(expected, rel=1e-10)
    assert trace_sqrt_product(np.diag(a), np.diag(b)) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-7)


@pytest.mark.parametrize(("n", "d"), [(300, 16), (10, 32)])
def test_identical_inputs_give_zero(n: int, d: int) -> None:
    x = correlated(np.random.default_rng(1), n, d, shift=3.0)
    for method in ("exact", "newton_schulz"):
        assert abs(frechet_distance(x, x.copy(), sqrt=method)) < 1e-8
    x32 = torch.tensor(x, dtype=torch.float32)
    assert abs(frechet_distance(x32, x32.clone())) < 1e-8


def exact_psd(d: int, max_exponent: int) -> tuple[np.ndarray, np.ndarray]:
    """A dense d x d PSD matrix computed without rounding, and its eigenvalues: H diag(2^-e) H^T / d with H a
    Hadamard matrix (H / sqrt(d) orthogonal). Every partial sum of +-2^-e over d terms is a multiple of
    2^-max_exponent below 2^8, which float64 holds exactly when max_exponent + log2(d) < 53, so any summation
    order, FMA or BLAS kernel gives the same, exact matrix: the error measured is the algorithm's alone."""
    lam = 2.0 ** -np.round(np.linspace(0, max_exponent, d))
    h = scipy.linalg.hadamard(d).astype(np.float64)
    return (h * lam) @ h.T / d, lam


# cond(S) = 2^e: about 1e2, 1e8, 1e12.
@pytest.mark.parametrize("max_exponent", [7, 27, 40])
def test_newton_schulz_documented_error_full_rank(max_exponent: int) -> None:
    d = 128
    sx, lam = exact_psd(d, max_exponent)
    expected = np.sqrt(lam).sum()  # S_x S_y = S_x with S_y = I: the closed form
    # Both routes factor S_x (backward error bound above); Newton-Schulz also stops once the trace changes by
    # less than ns_tol relative, and converges quadratically by then, so its truncation adds at most that.
    bound = trace_sqrt_error_bound(lam, d)
    assert abs(trace_sqrt_product(sx, np.eye(d)) - expected) <= bound
    ns = trace_sqrt_product(sx, np.eye(d), method="newton_schulz")
    assert abs(ns - expected) <= bound + NS_TOL * expected
    if max_exponent == 40:  # the bound is tight enough to catch an iteration stopped early
        assert abs(trace_sqrt_product(sx, np.eye(d), method="newton_schulz", ns_iters=30) - expected) > bound
    rng = np.random.default_rng(3)
    g = rng.normal(size=(d, d))
    sy = g @ g.T / d + 0.1 * np.eye(d)  # not commuting with S_x: compare the two routes on the same product
    exact = trace_sqrt_product(sx, sy)
    bound = 2 * trace_sqrt_error_bound(product_spectrum(sx, sy), d) + NS_TOL * exact
    assert abs(trace_sqrt_product(sx, sy, method="newton_schulz") - exact) <= bound


def test_newton_schulz_documented_error_rank_deficient() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(32, 64)), rng.normal(size=(40, 64)) + 0.2
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    exact = trace_sqrt_product(sx, sy)
    bound = 2 * trace_sqrt_error_bound(product_spectrum(sx, sy), 64) + NS_TOL * exact  # the sqrt(eps) floor
    assert abs(trace_sqrt_product(sx, sy, method="newton_schulz") - exact) <= bound
    # The n x m route: the SVD of C (32 x 40, full rank) against Newton-Schulz on C C^T.
    c = (x - x.mean(0)) @ (y - y.mean(0)).T / np.sqrt(31 * 39)
    fd = frechet_distance(x, y)
    tr_sqrt = np.linalg.svd(c, compute_uv=False).sum()
    bound = 2 * 2 * trace_sqrt_error_bound(np.linalg.eigvalsh(c @ c.T), 32) + 2 * NS_TOL * tr_sqrt
    assert abs(frechet_distance(x, y, sqrt="newton_schulz") - fd) <= bound


@pytest.mark.parametrize(("n", "m", "d"), [(400, 300, 24), (20, 30, 64)])
def test_reference_fast_is_trace_of_product(n: int, m: int, d: int) -> None:
    rng = np.random.default_rng(5)
    x, y = correlated(rng, n, d), correlated(rng, m, d, shift=0.3)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    expected = diff @ diff + np.trace(sx) + np.trace(sy) - 2 * np.trace(sx @ sy)
    assert frechet_distance(x, y, sqrt="reference_fast") == pytest.approx(expected, rel=1e-10)
    from_moments = frechet_from_moments(x.mean(0), sx, y.mean(0), sy, sqrt="reference_fast")
    assert from_moments == pytest.approx(expected, rel=1e-10)


def test_reference_fast_can_be_negative_and_is_not_clamped() -> None:
    rng = np.random.default_rng(6)
    x, y = 3 * rng.normal(size=(200, 8)), 3 * rng.normal(size=(200, 8))
    assert frechet_distance(x, y, sqrt="reference_fast") < 0 < frechet_distance(x, y)


def test_low_precision_inputs_are_upcast() -> None:
    rng = np.random.default_rng(8)
    x = torch.tensor(rng.normal(size=(100, 12)), dtype=torch.bfloat16)
    y = torch.tensor(rng.normal(size=(90, 12)) + 1, dtype=torch.float16)
    expected = scipy_fid(x.double().numpy(), y.double().numpy())
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros(5), np.zeros((5, 5)), "2-D"),
        (np.zeros((5, 4)), np.zeros((5, 3)), "dims differ"),
        (np.zeros((1, 4)), np.zeros((5, 4)), "at least 2 rows"),
        (np.r_[np.zeros((4, 4)), [[np.nan] * 4]], np.zeros((5, 4)), "non-finite"),
    ],
)
def test_input_validation_names_the_problem(x: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=f"layer 12: .*{match}"):
        frechet_distance(x, y, name="layer 12")


def test_unknown_sqrt_lists_valid_methods() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="exact, newton_schulz, reference_fast"):
        frechet_distance(x, x, sqrt="sqrtm")  # type: ignore[arg-type]


def test_trace_sqrt_singular_covariance_uses_eigh_fallback() -> None:
    a = np.diag([4.0, 0.0, 9.0])  # Cholesky fails: eigh route
    b = np.diag([1.0, 5.0, 4.0])
    assert trace_sqrt_product(a, b) == pytest.approx(2.0 + 6.0, rel=1e-12)
    assert trace_sqrt_product(a, b, method="newton_schulz") == pytest.approx(8.0, rel=1e-10)


def test_gaussian_moments_streaming_and_merge() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(1000, 10)) * 2 + 1e4  # huge mean: raw sums of outer products would lose digits
    parts = [GaussianMoments().update(c) for c in np.array_split(x, [1, 7, 300, 650])]
    acc = parts[0]
    for p in parts[1:]:
        acc.merge(p)
    acc.update(np.zeros((0, 10)))
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2 rows"):
        _ = GaussianMoments().update(x[:1]).cov
    with pytest.raises(ValueError, match="dim changed"):
        acc.update(np.zeros((3, 4)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 256, generator=g), torch.randn(500, 256, generator=g) + 0.1
    for method in ("exact", "newton_schulz", "reference_fast"):
        cpu = frechet_distance(x, y, sqrt=method)
        assert frechet_distance(x.cuda(), y.cuda(), sqrt=method) == pytest.approx(cpu, rel=1e-9)
    xs, ys = torch.randn(50, 256, generator=g), torch.randn(60, 256, generator=g)
    assert frechet_distance(xs.cuda(), ys.cuda()) == pytest.approx(frechet_distance(xs, ys), rel=1e-9)
