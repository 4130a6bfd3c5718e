"""The exact target of steering on the test bed: a Gaussian mixture tilted by exp(lam * w . x).

For p(x) = sum_k pi_k N(mu_k, S_k), p(x) exp(lam w . x) / Z is again a mixture: component k moves to
mu_k + lam S_k w and is reweighted by exp(lam w . mu_k + lam^2 w' S_k w / 2); Z = E_p[exp(lam w . x)] is the sum of
those weights. (Completing the square in each component.) Diagonal S_k as in `fewstep.gmm`; w [D]. The exact twist
(the value function of the tilt on the noisy states) follows from the two mixtures' noisy marginals.
"""

from __future__ import annotations

import torch

from ..gmm import GaussianMixture
from ..processes import Process
from .rewards import Twist


def _log_weights(mixture: GaussianMixture, w: torch.Tensor, lam: float) -> torch.Tensor:
    """log pi_k + lam w . mu_k + lam^2 w' S_k w / 2, [K]."""
    var = mixture.stds**2
    return torch.log(mixture.weights) + lam * mixture.means @ w + 0.5 * lam**2 * (var * w * w).sum(1)


def tilted_mixture(mixture: GaussianMixture, w: torch.Tensor, lam: float) -> GaussianMixture:
    """The mixture proportional to p(x) exp(lam w . x) (same stds, shifted means, reweighted components)."""
    w = torch.as_tensor(w, dtype=torch.float64).flatten()
    log_w = _log_weights(mixture, w, lam)
    means = mixture.means + lam * mixture.stds**2 * w
    return GaussianMixture(torch.softmax(log_w, 0), means, mixture.stds)


def log_normalizer(mixture: GaussianMixture, w: torch.Tensor, lam: float) -> float:
    """log E_p[exp(lam w . x)], exact."""
    w = torch.as_tensor(w, dtype=torch.float64).flatten()
    return float(torch.logsumexp(_log_weights(mixture, w, lam), 0))


def exact_twist(mixture: GaussianMixture, w: torch.Tensor, lam: float, process: Process) -> Twist:
    """The exact twist of the linear tilt, twist(x_t, t) = log E[exp(lam w . x0) | x_t] / lam = (log p~_t(x_t) -
    log p_t(x_t) + log Z) / lam, where p~ is the tilted mixture: with `FK(linear(w), lam=lam, twist=...)` every
    particle's weight stays uniform up to the time discretisation, and with guidance lam the guided model is the
    tilted mixture's own (Wu et al., NeurIPS 2023: the optimal twisting function). x_t [n, D], t [n] -> [n]."""
    tilted, log_z = tilted_mixture(mixture, w, lam), log_normalizer(mixture, w, lam)

    def twist(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = process.alpha(t), process.sigma(t)
        log_h = tilted.log_prob(x, alpha, sigma).double() - mixture.log_prob(x, alpha, sigma).double() + log_z
        return log_h / lam

    return twist
