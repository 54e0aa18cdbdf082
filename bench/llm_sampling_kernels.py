"""Benchmark: the greedy/logprobs sampling kernel in numpy vs as an ONNX graph, per provider.

Decides which form the engine runs where: on CPU the logits are already in host memory, so the
question is only which computes faster; on CUDA the ONNX form avoids copying [rows, vocab]
logits to the host every step (run this on a GPU box to see those columns: "CUDA onnx" copies
host logits in, "CUDA resident" starts from logits already in GPU memory). Median of 200 calls.

    .venv/bin/python bench/llm_sampling_kernels.py [--vocab 49152] [--rows 1 8 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort

from appliance.kernels.sampling import SamplingArrays, sample
from appliance.kernels.sampling_onnx import GreedyLogprobsKernel

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
    # A provider counts only if a created session really gets it (a CUDA build without a GPU lists CUDA).
    listed = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    providers = [p for p in listed if GreedyLogprobsKernel(5, [p]).session.get_providers()[0] == p]
    on_device = "CUDAExecutionProvider" in providers
    columns = [p.replace("ExecutionProvider", "") + " onnx us" for p in providers] + (["CUDA resident us"] if on_device else [])
    print(f"{'rows':>5}{'numpy argmax us':>17}{'numpy +logprobs us':>20}" + "".join(f"{c:>18}" for c in columns))
    for rows in args.rows:
        logits = np.random.default_rng(0).standard_normal((rows, args.vocab)).astype(np.float32)
        greedy = SamplingArrays.greedy(rows)
        plain = timed(lambda: logits.argmax(axis=1))
        with_logprobs = timed(lambda: sample(logits, greedy, [[]] * rows, [[]] * rows, top_logprobs=5))
        onnx_times = [timed(GreedyLogprobsKernel(5, [provider]), logits, logits.argmax(axis=1)) for provider in providers]
        if on_device:
            onnx_times.append(timed(_resident_run(GreedyLogprobsKernel(5, ["CUDAExecutionProvider"]), logits)))
        print(f"{rows:>5}{plain:>17.1f}{with_logprobs:>20.1f}" + "".join(f"{t:>18.1f}" for t in onnx_times))


def _resident_run(kernel: GreedyLogprobsKernel, logits: np.ndarray):  # noqa: ANN202
    """The kernel on logits already in GPU memory, as a decoder on CUDA leaves them: only the
    few numbers per row come back to the host."""
    binding = kernel.session.io_binding()
    binding.bind_ortvalue_input("logits", ort.OrtValue.ortvalue_from_numpy(logits, "cuda", 0))
    binding.bind_ortvalue_input("chosen", ort.OrtValue.ortvalue_from_numpy(logits.argmax(axis=1), "cuda", 0))
    for name in ("token", "logprob", "top_ids", "top_logprobs"):
        binding.bind_output(name, "cpu")

    def run() -> None:
        kernel.session.run_with_iobinding(binding)

    return run


if __name__ == "__main__":
    main()
