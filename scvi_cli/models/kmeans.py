"""Seeded k-means (k-means++ start, Lloyd iterations, best of several starts) for the VampPrior.

A few dozen lines of numpy keep scikit-learn out of the dependencies; results are deterministic
for a given seed.
"""

from __future__ import annotations

import numpy as np


def _plus_plus_start(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [points[rng.integers(len(points))]]
    closest = ((points - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = closest.sum()
        index = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=closest / total)
        centers.append(points[index])
        closest = np.minimum(closest, ((points - points[index]) ** 2).sum(axis=1))
    return np.array(centers)


def kmeans(points: np.ndarray, k: int, n_init: int = 10, max_iter: int = 300, seed: int = 0) -> np.ndarray:
    """Cluster labels (n,) in 0..k-1 minimising the within-cluster sum of squares."""
    points = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        centers = _plus_plus_start(points, k, rng)
        for _ in range(max_iter):
            distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
            labels = distances.argmin(axis=1)
            new_centers = np.array(
                [points[labels == j].mean(axis=0) if np.any(labels == j) else centers[j] for j in range(k)]
            )
            if np.allclose(new_centers, centers):
                break
            centers = new_centers
        inertia = ((points - centers[labels]) ** 2).sum()
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels
