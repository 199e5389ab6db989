"""k-means with greedy k-means++ seeding: the partition EM's default start is built on.

The same initialisation scikit-learn's ``GaussianMixture`` uses by default (k-means++
seeds, then Lloyd's iterations), on features the caller has standardised, so the
partition does not depend on the units or the origin of any feature.
"""

from __future__ import annotations

import numpy as np

# Lloyd's iterations stop when no label changes, or after this many.
MAX_ITER = 100


def _sq_dist(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """N x C squared distances, by ``|x|^2 - 2 x.c + |c|^2`` (floored at 0)."""
    xx = np.einsum("nd,nd->n", features, features)[:, None]
    cc = np.einsum("cd,cd->c", centres, centres)[None, :]
    return np.maximum(xx - 2.0 * features @ centres.T + cc, 0.0)


def kmeans_pp(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k seeds by greedy k-means++ (Arthur & Vassilvitskii 2007; scikit-learn's choice of
    ``2 + log k`` candidates per seed, the one that lowers the potential most kept)."""
    n = features.shape[0]
    trials = 2 + int(np.log(k))
    centres = [features[rng.integers(n)]]
    closest = _sq_dist(features, centres[0][None])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if not total > 0:
            centres.append(features[rng.integers(n)])
            continue
        candidates = rng.choice(n, size=trials, p=closest / total)
        dists = np.minimum(closest[:, None], _sq_dist(features, features[candidates]))
        best = int(np.argmin(dists.sum(axis=0)))
        centres.append(features[candidates[best]])
        closest = dists[:, best]
    return np.array(centres)


def kmeans(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Hard labels from k-means++ seeds and Lloyd's iterations; an emptied cluster is
    re-seeded at the point farthest from its centre."""
    centres = kmeans_pp(features, k, rng)
    labels = None
    for _ in range(MAX_ITER):
        dist = _sq_dist(features, centres)
        new = np.argmin(dist, axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        for j in range(k):
            if counts[j]:
                centres[j] = features[labels == j].mean(axis=0)
            else:
                centres[j] = features[int(np.argmax(dist[np.arange(len(labels)), labels]))]
    return labels
