"""The reference profile: what the training data looked like, for drift detection.

Per monitored feature: quantile bin edges (interior cut points), the reference
histogram on them, mean, std, min, max and NaN rate; per class: the prior of
the source model's predictions. A device counts its inputs on the same edges,
so the monitor compares like with like (see docs/bundle.md).
"""

from __future__ import annotations

import numpy as np


def bin_edges(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Interior quantile cut points of ``values`` (NaN ignored), strictly increasing.

    Features with few distinct values (counts, pixels) get fewer edges: equal
    quantiles collapse into one cut point.

    >>> bin_edges(np.arange(100.0), bins=4).tolist()
    [24.75, 49.5, 74.25]
    >>> bin_edges(np.array([0.0, 0.0, 0.0, 1.0]), bins=4).tolist()
    [0.0, 0.25]
    """
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.array([], dtype=np.float64)
    qs = np.quantile(v.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(qs)
    # A cut point at the maximum would leave the last bin empty by construction.
    if edges.size and edges[-1] >= v.max() and edges.size > 1:
        edges = edges[:-1]
    return edges


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins of ``edges``: bin i holds edges[i-1] < x <= edges[i].

    >>> histogram(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0])).tolist()
    [2, 1, 1]
    """
    v = values[np.isfinite(values)]
    idx = np.searchsorted(edges, v, side="left")
    return np.bincount(idx, minlength=len(edges) + 1)


def feature_profile(name: str, values: np.ndarray, bins: int = 10) -> dict:
    """The profile entry of one feature."""
    values = np.asarray(values, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    edges = bin_edges(values, bins)
    return {
        "name": name,
        "bin_edges": [float(e) for e in edges],
        "hist": [int(c) for c in histogram(values, edges)],
        **_moments(finite),
        "nan_rate": float(1.0 - finite.size / values.size) if values.size else 0.0,
    }


def _moments(finite: np.ndarray) -> dict:
    """Mean, std, min and max of the finite values (all 0.0 when there are none)."""
    if not finite.size:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": float(finite.mean()), "std": float(finite.std()),
            "min": float(finite.min()), "max": float(finite.max())}


def reference_profile(
    X: np.ndarray,
    feature_names: list[str] | None = None,
    monitored: str = "features",
    predictions: np.ndarray | None = None,
    labels: list[str] | None = None,
    regression_outputs: np.ndarray | None = None,
    bins: int = 10,
    max_pixels: int = 200_000,
) -> dict:
    """Build the manifest's ``reference_profile`` from reference data.

    Args:
        X: reference inputs in the caller's space: (n, features) for tabular
            data, (n, H, W, C) for images (NHWC).
        feature_names: names of the tabular columns.
        monitored: ``features`` (one entry per column) or ``channels`` (one per image channel).
        predictions: predicted class indices of the source model on X (classification).
        labels: class labels (classification).
        regression_outputs: predicted values on X (regression).
        bins: quantile bins per feature.
        max_pixels: per channel, at most this many pixel values are profiled (strided).
    """
    X = np.asarray(X)
    n = int(X.shape[0])
    if monitored == "channels":
        features = _channel_profiles(X, bins, max_pixels)
    else:
        features = _column_profiles(X, feature_names, bins)
    profile: dict = {"n_samples": n, "monitored": monitored, "features": features, "class_priors": None}
    if predictions is not None and labels is not None:
        profile["class_priors"] = _class_priors(predictions, labels)
    if regression_outputs is not None:
        out = feature_profile("prediction", np.asarray(regression_outputs).ravel(), bins)
        profile["output_stats"] = out
    return profile


def _channel_profiles(X: np.ndarray, bins: int, max_pixels: int) -> list[dict]:
    """One entry per image channel, from at most ``max_pixels`` strided pixel values each."""
    channels = X.shape[-1]
    flat = X.reshape(int(X.shape[0]), -1, channels)
    features = []
    for c in range(channels):
        values = flat[:, :, c].ravel()
        stride = max(1, values.size // max_pixels)
        features.append(feature_profile(f"channel_{c}", values[::stride], bins))
    return features


def _column_profiles(X: np.ndarray, feature_names: list[str] | None, bins: int) -> list[dict]:
    """One entry per tabular column (named x0, x1... when no names are given)."""
    flat = X.reshape(int(X.shape[0]), -1)
    names = feature_names or [f"x{i}" for i in range(flat.shape[1])]
    return [feature_profile(name, flat[:, i], bins) for i, name in enumerate(names)]


def _class_priors(predictions: np.ndarray, labels: list[str]) -> dict:
    """The share of each predicted class."""
    counts = np.bincount(np.asarray(predictions, dtype=np.int64), minlength=len(labels))[: len(labels)]
    priors = counts / max(1, counts.sum())
    return {"labels": list(labels), "priors": [float(p) for p in priors]}


def confidence_profile(outputs: np.ndarray) -> dict | None:
    """The reference histogram of a classifier's top-class probability on holdout data (None when its
    outputs are not probabilities); windows carry the same on the same fixed edges.

    >>> confidence_profile(np.array([[0.97, 0.03], [0.6, 0.4], [0.2, 0.8]]))["hist"]
    [0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0]
    """
    from edge_runtime.window import CONFIDENCE_EDGES, confidence_histogram

    hist = confidence_histogram(outputs)
    if hist is None:
        return None
    return {"bin_edges": list(CONFIDENCE_EDGES), "hist": hist, "n_samples": int(sum(hist))}
