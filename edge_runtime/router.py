"""A/B split and shadow mode: which model serves an input, which recorder records it.

A device may run a second bundle next to its primary one (A):

- ``ab``: each input is served by one of them, B with probability ``split``; each model records its own
  windows (variants "A" and "B");
- ``shadow``: every input is served by A (the prediction the device acts on) and also by the shadow,
  whose windows (variant "shadow") carry how often the two agreed.

:class:`VariantRouter` makes those choices; the agent predicts with the models it names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from edge_runtime import compact
from edge_runtime.errors import EdgeOpsError
from edge_runtime.outputs import VARIANTS

if TYPE_CHECKING:
    from edge_runtime.model import EdgeModel

MODES = ("ab", "shadow")
MODEL_KEYS = ("name", "version", "artifact", "sha256")


@dataclass(frozen=True)
class Variants:
    """The second bundle a device runs next to its primary one (none: ``second`` None).

    Args:
        second: the loaded second model.
        mode: "ab" (an input goes to one of the two) or "shadow" (to both; the primary one answers).
        split: in ab mode, the share of inputs B serves.
        seed: seeds the A/B draw (None: random).
        output_variants: "primary" (the prediction the device acts on: A's, or B's for the inputs the A/B
            split sends to B) or "all" (the shadow's too).
    """

    second: EdgeModel | None = None
    mode: str = "ab"
    split: float = 0.5
    seed: int | None = None
    output_variants: str = "primary"


def agree(a, b) -> tuple[bool, float]:
    """Whether two predictions agree (the same class, or values within 1% of A's scale) and their largest
    absolute difference (inf when their shapes differ)."""
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    if a.shape != b.shape:
        return False, float("inf")
    diff = float(np.max(np.abs(a - b)))
    if a.size > 1:
        return int(np.argmax(a)) == int(np.argmax(b)), diff
    return diff <= 0.01 * max(1.0, float(np.max(np.abs(a)))), diff


class Agreement:
    """How often the shadow agreed with the primary model since the last shadow window."""

    def __init__(self) -> None:
        self.compared = 0
        self.agreed = 0
        self.max_abs_diff = 0.0

    def add(self, same: bool, diff: float) -> None:
        self.compared += 1
        self.agreed += int(same)
        self.max_abs_diff = max(self.max_abs_diff, diff if np.isfinite(diff) else 0.0)

    def as_dict(self) -> dict:
        return {"compared": self.compared, "agreed": self.agreed,
                "rate": round(self.agreed / self.compared, 6) if self.compared else None,
                "max_abs_diff": round(self.max_abs_diff, 6)}


class VariantRouter:
    """Routes each input to the model(s) that serve it and labels the recorders' windows by variant.

    Args:
        variants: the second bundle and how it is used (:class:`Variants`).
    """

    def __init__(self, variants: Variants = Variants()):
        if variants.second is not None and variants.mode not in MODES:
            raise ValueError(f"mode {variants.mode!r}: ab or shadow")
        if variants.output_variants not in VARIANTS:
            raise ValueError(f"output_variants {variants.output_variants!r}: one of {VARIANTS}")
        self.second = variants.second
        self.mode, self.split = variants.mode, variants.split
        self.output_variants = variants.output_variants
        self.second_recorder = None
        self._rng = random.Random(variants.seed)
        self.agreement = Agreement()

    @property
    def primary_variant(self) -> str | None:
        """The variant of the primary model's windows: "A" next to a second bundle, else none."""
        return None if self.second is None else "A"

    @property
    def second_variant(self) -> str:
        return "B" if self.mode == "ab" else "shadow"

    def start_recording(self, window_seconds: float | None, window_size: int | None):
        """Start the second model's recorder (None without a second model)."""
        if self.second is not None:
            if self.second.manifest:       # its reference profile codes the moments of cbor-ref windows
                compact.register_bundle(self.second.manifest)
            self.second_recorder = self.second.start_recording(window_seconds=window_seconds,
                                                               window_size=window_size, variant=self.second_variant)
        return self.second_recorder

    def pick(self, primary):
        """ab mode: the model that serves the next input (B with probability ``split``)."""
        return self.second if self._rng.random() < self.split else primary

    def serve(self, primary, answer: Callable[..., object]) -> None:
        """Predict one input: ``answer(model, emit=...)`` predicts with ``model`` (and offers the prediction to
        the outputs when ``emit``)."""
        if self.second is None:
            answer(primary)
        elif self.mode == "ab":
            answer(self.pick(primary))
        else:
            self._shadow(primary, answer)

    def _shadow(self, primary, answer: Callable[..., object]) -> None:
        a = answer(primary)
        try:
            b = answer(self.second, emit=self.output_variants == "all")
        except EdgeOpsError:
            return   # counted as an error in the shadow's window
        self.agreement.add(*agree(a, b))

    def annotate(self, w: dict) -> None:
        """A closed window of the second model: a shadow's carries the agreement since its last window."""
        if self.mode == "shadow":
            w["agreement"] = self.agreement.as_dict()
            self.agreement = Agreement()

    def status(self) -> dict | None:
        """The second model in the device's status (None without one)."""
        if self.second is None:
            return None
        info = self.second_recorder.model_info
        return {**{k: info.get(k) for k in MODEL_KEYS}, "mode": self.mode,
                "split": self.split if self.mode == "ab" else None}
