"""Plain NumPy float64 references of the papers' recursions, and the test problems.

Each reference is written from the papers' equations (as in docs/), independently of optax_accel.
"""
from __future__ import annotations

import numpy as np


def noisy_quadratic(steps: int, shapes=((3, 4), (5,)), seed: int = 0, noise_scale: float = 0.3):
  """A fixed two-tensor quadratic f(w) = sum_i 0.5 * h_i * w_i^2 - c_i w_i with additive noise.

  Returns (w0, grad_fn): grad_fn(t, w) is the stochastic gradient at 1-based step t, a
  deterministic function of (t, w) so every implementation sees the same noise.
  """
  rng = np.random.default_rng(seed)
  curv = [rng.uniform(0.1, 3.0, size=s) for s in shapes]
  centre = [rng.normal(size=s) for s in shapes]
  noise = rng.normal(scale=noise_scale, size=(steps + 1, sum(int(np.prod(s)) for s in shapes)))
  w0 = [rng.normal(size=s) for s in shapes]

  def grad_fn(t, w):
    out, start = [], 0
    for h, c, x in zip(curv, centre, w):
      n = x.size
      out.append(h * (x - c) + noise[t, start:start + n].reshape(x.shape))
      start += n
    return out

  return w0, grad_fn


def half_life_beta(beta_start, beta_end, a):
  """docs/ademamix.md §1 closed form of the half-life-linear scheduler at fraction a in [0, 1]."""
  ls, le = np.log(beta_start), np.log(beta_end)
  return np.exp(ls * le / ((1 - a) * le + a * ls))
