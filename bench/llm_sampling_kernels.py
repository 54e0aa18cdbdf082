"""Benchmark: the greedy/logprobs sampling kernel in numpy vs as an ONNX graph, per provider.

Decides which form the engine runs where: on CPU the logits are already in host memory, so the
question is only which computes faster; on CUDA the ONNX form avoids copying [rows, vocab]
logits to the host every step (run this on a GPU box to see that column). Median of 200 calls.

    .venv/bin/python bench/llm_sampling_kernels.py [--vocab 49152] [--rows 1 8 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.kernels.sampling import SamplingArrays, sample  # noqa: E402
from appliance.kernels.sampling_onnx import GreedyLogprobsKernel  # noqa: E402

CALLS = 200


def timed(function, *args) -> float:  # noqa: ANN001
    samples = []
    for _ in range(CALLS):
        start = time.perf_counter()
        function(*args)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    args = parser.parse_args()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    print(f"{'rows':>5}{'numpy argmax us':>17}{'numpy +logprobs us':>20}" + "".join(f"{p.replace('ExecutionProvider', '') + ' onnx us':>16}" for p in providers))
    for rows in args.rows:
        logits = np.random.default_rng(0).standard_normal((rows, args.vocab)).astype(np.float32)
        greedy = SamplingArrays.greedy(rows)
        plain = timed(lambda: logits.argmax(axis=1))
        with_logprobs = timed(lambda: sample(logits, greedy, [[]] * rows, [[]] * rows, top_logprobs=5))
        onnx_times = [timed(GreedyLogprobsKernel(5, [provider]), logits, logits.argmax(axis=1)) for provider in providers]
        print(f"{rows:>5}{plain:>17.1f}{with_logprobs:>20.1f}" + "".join(f"{t:>16.1f}" for t in onnx_times))


if __name__ == "__main__":
    main()
