"""Per-row sampling parameters of a batch, gathered for the sampling kernels (appliance.kernels).

Shared by the plain decode step (one row per sequence) and speculative verification (one row per
verified position of a lone sequence), so both sample under the same rules. Loops over rows,
never over the vocabulary; never imports onnxruntime. The scheduler's `Sequence` is imported for
type hints only: the scheduler imports speculative.py, which imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from appliance.kernels.sampling import SamplingArrays

if TYPE_CHECKING:
    from appliance.generation.scheduler import Sequence


def sampling_arrays(seqs: Seq[Sequence]) -> SamplingArrays:
    """One row per entry of `seqs`; a sequence listed twice draws its uniform twice."""
    params = [seq.params for seq in seqs]
    return SamplingArrays(
        temperature=np.asarray([p.temperature for p in params], np.float64),
        top_k=np.asarray([p.top_k for p in params], np.int64),
        top_p=np.asarray([p.top_p for p in params], np.float64),
        min_p=np.asarray([p.min_p for p in params], np.float64),
        repetition_penalty=np.asarray([p.repetition_penalty for p in params], np.float32),
        presence_penalty=np.asarray([p.presence_penalty for p in params], np.float32),
        frequency_penalty=np.asarray([p.frequency_penalty for p in params], np.float32),
        uniform=np.asarray([seq.rng.random() if not seq.params.greedy else 0.0 for seq in seqs], np.float64),
    )
