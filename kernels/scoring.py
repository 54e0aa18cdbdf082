"""A classifier's logits as one relevance score per row: what a cross-encoder's configured
activation does (sigmoid for one label; softmax, then one label's probability, for several;
or the raw logit). A handful of numbers per document, so plain numpy rather than a graph
piece: fusing it into the model would cost a graph change per activation for microseconds.
Never imports torch or onnxruntime.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Activation = Literal["sigmoid", "softmax", "identity"]


def relevance_scores(logits: np.ndarray, activation: Activation, label: int) -> np.ndarray:
    """One float64 score per row of `logits` ([rows] or [rows, labels])."""
    values = logits.astype(np.float64).reshape(logits.shape[0], -1)
    if activation == "softmax":
        shifted = np.exp(values - values.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True))[:, label]
    chosen = values[:, label]
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-chosen))
    return chosen
