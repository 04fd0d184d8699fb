"""Accuracy on late ground truth: the labelled inferences of a device (or a fleet) against the holdout.

Devices report, per window, the labels that reached them joined to their predictions (a confusion
count matrix, ``labels.confusion``, see edge_runtime/labels.py). Over the recent windows the
accuracy is ``trace / sum`` of the summed matrices. The bundle's conversion measured the artifact's
accuracy on its holdout split (``artifacts[].parity.artifact_metric``, ``metric`` = ``accuracy``).

The detector fires on a *drop*: the labelled accuracy is more than ``max_drop`` (absolute) below the
holdout's **and** a one-sided exact binomial test rejects "the accuracy is at least holdout -
max_drop" at ``alpha``, once ``min_labelled`` labelled inferences were seen. The test keeps a small
labelled sample from alarming on noise (30 labels of a 95% model miss 3 or more about 19% of the
time); being one-sided, a device that does better than its holdout is no alarm. It calls the drop
gone (``clear``) only when the accuracy is back within ``close_ratio`` x ``max_drop`` of the
holdout's (or too few labels remain to say), so an accuracy hovering at the threshold keeps one
alert open.

Parameters: ``max_drop`` (0.05), ``min_labelled`` (100), ``alpha`` (0.01), ``close_ratio`` (0.5).

Reference: performance monitoring with delayed labels; the drop test is a one-sided exact binomial
test (Clopper and Pearson, 1934, "The use of confidence or fiducial limits illustrated in the case
of the binomial", Biometrika 26), as in the error-rate warning of DDM (Gama et al., 2004,
"Learning with Drift Detection", SBIA).

>>> d = AccuracyDropDetector()
>>> d.update(holdout=0.96, correct=680, labelled=1000).drift_detected, d.accuracy
(True, 0.68)
>>> d.update(holdout=0.96, correct=955, labelled=1000).drift_detected       # within noise of the holdout
False
>>> d.update(holdout=0.96, correct=50, labelled=60).drift_detected          # too few labels to judge
False
>>> d.update(holdout=0.96, correct=88, labelled=100).drift_detected         # 8 points down, not yet sure
False
>>> d.update(holdout=0.96, correct=920, labelled=1000).clear                # 4 points down: not yet back
False
>>> d.update(holdout=0.96, correct=990, labelled=1000).drift_detected      # better than the holdout
False
"""

from __future__ import annotations

import math

from scipy.stats import binom


class AccuracyDropDetector:
    def __init__(self, max_drop: float = 0.05, min_labelled: int = 100, alpha: float = 0.01,
                 close_ratio: float = 0.5):
        self.max_drop = max_drop
        self.min_labelled = min_labelled
        self.alpha = alpha
        self.close_ratio = close_ratio
        self.holdout = 1.0
        self.labelled = self.correct = 0
        self.accuracy = 1.0
        self.p_value = 1.0

    def update(self, holdout: float, correct: int, labelled: int) -> "AccuracyDropDetector":
        """``holdout``: the artifact's accuracy at conversion; ``correct`` of ``labelled`` joined labels
        matched their prediction (the confusion matrices' trace and sum)."""
        self.holdout = min(1.0, max(0.0, float(holdout)))
        self.labelled, self.correct = int(labelled), min(int(correct), int(labelled))
        self.accuracy = self.correct / self.labelled if self.labelled > 0 else 1.0
        target = self.holdout - self.max_drop
        # P(at most `correct` right | accuracy = holdout - max_drop): small when the accuracy is surely lower
        self.p_value = float(binom.cdf(self.correct, self.labelled, target)) if self.labelled and target > 0 else 1.0
        if math.isnan(self.p_value):
            self.p_value = 1.0
        return self

    @property
    def drop(self) -> float:
        """Holdout accuracy minus the labelled accuracy (negative when the device does better)."""
        return self.holdout - self.accuracy

    @property
    def drift_detected(self) -> bool:
        return self.labelled >= self.min_labelled and self.drop > self.max_drop and self.p_value < self.alpha

    @property
    def clear(self) -> bool:
        """The drop is gone: too few labels to say otherwise, or within close_ratio x max_drop of the holdout."""
        return self.labelled < self.min_labelled or self.drop < self.close_ratio * self.max_drop


def holdout_accuracy(manifest: dict | None, artifact: str | None = None) -> tuple[float, str | None] | None:
    """The accuracy the conversion measured on the holdout for ``artifact`` (a file name of the bundle; by
    default the first artifact with one), and the artifact it belongs to; None without one."""
    arts = [a for a in (manifest or {}).get("artifacts") or [] if isinstance(a, dict)]
    chosen = [a for a in arts if artifact and a.get("file") == artifact] or arts
    for a in chosen:
        par = a.get("parity") or {}
        acc = par.get("artifact_metric")
        if par.get("metric") == "accuracy" and isinstance(acc, (int, float)) and 0.0 <= acc <= 1.0:
            return float(acc), a.get("file")
    return None
