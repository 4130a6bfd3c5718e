"""Inference-time control: Feynman-Kac steering, noise search with a verifier, rewards, and exact inversion.

- `fk`: `FK(reward, lam, particles, ...)`, used as `fewstep.sample(..., steering=FK(...))`, and `steered_sample`
- `search`: `best_of_n` (random search) and `zero_order_search` over initial noises (Ma et al., 2025)
- `gradient`: `RewardGuided`, reward-gradient guidance as a model wrapper (exact for a Gaussian and a linear reward)
- `rewards`: the reward contract (`reward(x0) -> [batch]`, checked), `linear`, `class_log_prob`, and the twist
  `noisy_class_log_prob` (a noise-conditional classifier's log p(k | x_t))
- `resampling`: log-space weights, effective sample size, systematic / multinomial resampling
- `tilt`: the exact tilted Gaussian mixture (the test bed's answer for a linear reward) and its exact twist
- `inversion`: `invert` (a solver run backwards, or exact BDIA) and `regenerate`
"""

from .fk import FK, steered_sample
from .gradient import RewardGuided
from .inversion import invert, regenerate
from .rewards import class_log_prob, linear, noisy_class_log_prob
from .search import best_of_n, zero_order_search
from .tilt import exact_twist, log_normalizer, tilted_mixture

__all__ = [
    "FK",
    "RewardGuided",
    "best_of_n",
    "class_log_prob",
    "exact_twist",
    "invert",
    "linear",
    "log_normalizer",
    "noisy_class_log_prob",
    "regenerate",
    "steered_sample",
    "tilted_mixture",
    "zero_order_search",
]
