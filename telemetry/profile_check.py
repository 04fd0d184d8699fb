"""Checks of telemetry against the bundle it claims to come from.

The wire format itself (topics, decoding, bounds of every field) is defined
once, in :mod:`edge_runtime.wire`; this module adds what only the monitor
knows: the registered bundle's reference profile.
"""

from __future__ import annotations

from edge_runtime.wire import MAX_PAYLOAD, REASONS, SCHEMA_VERSION, Message, Rejected, parse, parse_topic

__all__ = ["MAX_PAYLOAD", "REASONS", "SCHEMA_VERSION", "Message", "Rejected", "check_against_profile", "parse",
           "parse_topic"]


def _check_features(f: dict, feats: list[dict]) -> None:
    """As many features as the profile, each histogram with the profile's bins (one more than its edges)."""
    if len(f["count"]) != len(feats):
        raise Rejected("feature_count_mismatch", f"{len(f['count'])} features, the bundle's profile has {len(feats)}")
    for i, (h, ref) in enumerate(zip(f["hist"], feats, strict=True)):
        if len(h) != len(ref["bin_edges"]) + 1:
            raise Rejected("histogram_mismatch", f"features.hist[{i}] has {len(h)} bins, the profile's "
                                                 f"{ref['name']!r} has {len(ref['bin_edges']) + 1}")


def check_against_profile(doc: dict, profile: dict | None, labels: list | None) -> None:
    """Feature count and histogram lengths must match the bundle the window claims to come from."""
    if not profile:
        return
    _check_features(doc["features"], profile.get("features") or [])
    counts = doc["predictions"].get("counts")
    if labels and counts is not None and len(counts) != len(labels):
        raise Rejected("histogram_mismatch", f"predictions.counts has {len(counts)} classes, the bundle {len(labels)}")
