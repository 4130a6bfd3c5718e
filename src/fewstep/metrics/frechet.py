"""Frechet distance between Gaussians fitted to two feature sets (the FID recipe on any features).

Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017;
Dowson & Landau, "The Frechet distance between multivariate normal distributions", J. Multivariate Anal. 1982.
FD = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), computed with symmetric eigendecompositions
(no complex sqrtm output, no singular-matrix failure): the trace term equals the sum of the square roots of the
eigenvalues of the symmetric PSD matrix C_a^1/2 C_b C_a^1/2.
"""

from __future__ import annotations

import numpy as np

from ._checks import Points, as_pair, as_points


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix [d, d] (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b); mu [d], cov [d, d]."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    d = mu_a.shape[0]
    for name, m in (("mu_a", mu_a), ("mu_b", mu_b)):
        if m.shape != (d,):
            raise ValueError(f"{name} must have shape [{d}], got {m.shape}")
    for name, c in (("cov_a", cov_a), ("cov_b", cov_b)):
        if c.shape != (d, d):
            raise ValueError(f"{name} must have shape [{d}, {d}], got {c.shape}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(fd, 0.0)


def mean_cov(x: Points) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean [d] and unbiased covariance [d, d] of features x [n, d] (float64)."""
    x = as_points(x, "x").numpy()
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(a: Points, b: Points) -> float:
    """Frechet distance between Gaussian fits of feature sets a [n, d] and b [m, d]."""
    a, b = as_pair(a, b)
    return gaussian_frechet_distance(*mean_cov(a), *mean_cov(b))
