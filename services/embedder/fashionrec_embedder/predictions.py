"""A trained model's head outputs → `Predicted` (category and attributes with confidences)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fashionrec_shared.tasks import LabelScore, Predicted

from fashionrec_embedder.network import HeadSpec

# Attribute labels kept per attribute type (best first), so a message stays small.
MAX_ATTRIBUTES_PER_TYPE = 5


def decode_predictions(
    heads: Sequence[HeadSpec], probs: np.ndarray, threshold: float
) -> list[Predicted]:
    """One `Predicted` per row of `probs` (every head's probabilities side by side, head order).

    The single-label head gives the category (its most probable class); each multi-label head
    gives the labels whose probability reaches `threshold`.
    """
    widths = [len(h.classes) for h in heads]
    if probs.ndim != 2 or probs.shape[1] != sum(widths):
        raise ValueError(f"probabilities of shape {probs.shape} do not fit heads of {widths}")
    bounds = np.cumsum([0, *widths])
    out: list[Predicted] = []
    for row in np.clip(probs.astype(np.float64), 0.0, 1.0):
        predicted = Predicted()
        for head, lo, hi in zip(heads, bounds[:-1], bounds[1:], strict=True):
            block = row[lo:hi]
            if head.kind == "single_label":
                best = int(block.argmax())
                predicted.category = LabelScore(
                    label=head.classes[best], confidence=round(float(block[best]), 4)
                )
                continue
            order = [i for i in np.argsort(-block) if block[i] >= threshold]
            labels = [
                LabelScore(label=head.classes[i], confidence=round(float(block[i]), 4))
                for i in order[:MAX_ATTRIBUTES_PER_TYPE]
            ]
            if labels:
                predicted.attributes[head.name] = labels
        out.append(predicted)
    return out
