"""GPU check: exercise CUDA and TensorRT for real on a lent GPU box and print the figures.

What it proves, each as one line with a verdict:
1. which providers the onnxruntime build lists, and which a CREATED session really gets
   (the appliance's selection rests on the latter);
2. CUDA: a session runs on CUDAExecutionProvider; batch 32 vs batch 1 throughput (target >= 3x);
3. TensorRT: the engine is built once into an engine cache + timing cache, and a second load
   reuses it (much faster, no new engine files);
4. the appliance's own `create_session` picks the best provider and reports the fallbacks;
5. MatMulNBits with float zero points (the one-node form of the export's int4-exact) against
   integer zero points, on the best provider: on the CPU the float form is ~25x slower, which is
   why int4-exact splits the block minimum off; if CUDA runs both alike, a CUDA int4-exact can
   be one node per weight;
6. 8-bit MatMulNBits in blocks of 32 and of 128 (the export's 8-bit block since 2026-12-04) on
   the best provider with CPU fallback disabled: whether the provider runs that form at all,
   whether it computes the product, and its time at M 1 and 8.

Needs onnxruntime-gpu (or an image's onnxruntime with CUDA/TensorRT), numpy and onnx; runs on
CPU too (then it just reports the GPU providers as unavailable). The synthetic model is an
fp32 transformer-sized stack (hidden 384, MLP 1536, sequence 128) built with onnx.helper.

    python scripts/gpu_check.py [--layers 6] [--seq 128] [--runs 20]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 384
MLP = 1536
#: The TensorRT 10 runtime that onnxruntime-gpu's TensorRT provider loads.
TENSORRT_LIBRARY = "libnvinfer.so.10"


def build_model(path: Path, layers: int) -> None:
    rng = np.random.default_rng(0)
    inits, nodes, previous = [], [], "x"
    for layer in range(layers):
        w1 = (rng.standard_normal((HIDDEN, MLP)) / np.sqrt(HIDDEN)).astype(np.float32)
        w2 = (rng.standard_normal((MLP, HIDDEN)) / np.sqrt(MLP)).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"w1_{layer}"), numpy_helper.from_array(w2, f"w2_{layer}")]
        nodes += [
            helper.make_node("MatMul", [previous, f"w1_{layer}"], [f"h{layer}"]),
            helper.make_node("Relu", [f"h{layer}"], [f"r{layer}"]),
            helper.make_node("MatMul", [f"r{layer}", f"w2_{layer}"], [f"o{layer}"]),
            helper.make_node("Add", [f"o{layer}", previous], [f"s{layer}"]),
        ]
        previous = f"s{layer}"
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "gpu-check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def tensorrt_library() -> str | None:
    """The TensorRT runtime library if the loader finds it: the provider's own library is in
    onnxruntime-gpu, TensorRT itself is a separate install."""
    try:
        ctypes.CDLL(TENSORRT_LIBRARY)
    except OSError:
        return None
    return TENSORRT_LIBRARY


def line(verdict: str, name: str, detail: str) -> None:
    print(f"{verdict:<4} {name}: {detail}", flush=True)


def throughput(session: ort.InferenceSession, batch: int, seq: int, runs: int) -> float:
    x = np.random.default_rng(1).standard_normal((batch, seq, HIDDEN)).astype(np.float32)
    for _ in range(3):
        session.run(["y"], {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(["y"], {"x": x})
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    failures = 0
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_path = work / "model.onnx"
    build_model(model_path, args.layers)
    built = ort.get_available_providers()
    line("OK", "onnxruntime", f"{ort.__version__} ({ort.get_device()}), build lists: {', '.join(built)}")

    # CUDA -----------------------------------------------------------------------------------
    if "CUDAExecutionProvider" in built:
        session = ort.InferenceSession(str(model_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        got = session.get_providers()
        if got[0] != "CUDAExecutionProvider":
            failures += 1
            line("FAIL", "cuda session", f"created session got {got} (CUDA libraries missing?)")
        else:
            line("OK", "cuda session", f"providers {got}")
            one = throughput(session, 1, args.seq, args.runs)
            many = throughput(session, 32, args.seq, args.runs)
            gain = many / one
            line("OK" if gain >= 3 else "WARN", "cuda batching gain", f"batch 1: {one:.0f} items/s, batch 32: {many:.0f} items/s, gain {gain:.1f}x (target >= 3x)")
    else:
        line("WARN", "cuda session", "CUDAExecutionProvider not in this onnxruntime build")

    # TensorRT -------------------------------------------------------------------------------
    nvinfer = tensorrt_library()
    if "TensorrtExecutionProvider" in built and nvinfer is None:
        line("WARN", "tensorrt session", f"the build has the provider but {TENSORRT_LIBRARY} is not on this machine (TensorRT not installed)")
    elif "TensorrtExecutionProvider" in built:
        cache = work / "trt-cache"
        cache.mkdir()
        options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": True,
            "trt_max_workspace_size": 2 << 30,
            "trt_profile_min_shapes": f"x:1x1x{HIDDEN}",
            "trt_profile_opt_shapes": f"x:16x{args.seq}x{HIDDEN}",
            "trt_profile_max_shapes": f"x:32x{args.seq}x{HIDDEN}",
        }
        loads = []
        files_after: list[set[str]] = []
        for attempt in range(2):
            start = time.perf_counter()
            session = ort.InferenceSession(
                str(model_path),
                providers=[("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"],
            )
            session.run(["y"], {"x": np.zeros((1, args.seq, HIDDEN), np.float32)})
            loads.append(time.perf_counter() - start)
            files_after.append({p.name for p in cache.iterdir()})
            if attempt == 0 and session.get_providers()[0] != "TensorrtExecutionProvider":
                failures += 1
                line("FAIL", "tensorrt session", f"created session got {session.get_providers()}")
                break
        else:
            engines = [name for name in files_after[0] if name.endswith(".engine")]
            reused = files_after[0] == files_after[1] and loads[1] < loads[0] / 2
            line("OK" if engines else "FAIL", "tensorrt engine cache", f"{len(engines)} engine file(s), timing cache: {any('timing' in n for n in files_after[0])}")
            line("OK" if reused else "WARN", "tensorrt cache reuse", f"first load+run {loads[0]:.1f} s, second {loads[1]:.2f} s, no new files: {files_after[0] == files_after[1]}")
            one = throughput(session, 1, args.seq, args.runs)
            many = throughput(session, 32, args.seq, args.runs)
            line("OK" if many / one >= 3 else "WARN", "tensorrt batching gain", f"batch 1: {one:.0f}, batch 32: {many:.0f} items/s, gain {many / one:.1f}x")
            failures += 0 if engines else 1
    else:
        line("WARN", "tensorrt session", "TensorrtExecutionProvider not in this onnxruntime build")

    # The appliance's own selection -------------------------------------------------------
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from appliance.repository.manifest import Manifest, SourceInfo, TensorSpec
        from appliance.runtime.providers import ProviderConfig, create_session
    except ImportError as exc:
        line("WARN", "appliance selection", f"skipped: {exc}")
    else:
        manifest = Manifest(
            name="gpu-check", version=1, task="tensor", source=SourceInfo(kind="onnx", uri="gpu-check", sha256="0" * 64),
            created_at="2026-01-01T00:00:00Z", opset=17, quantization="fp32",
            inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1, -1, HIDDEN])],
            outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1, HIDDEN])],
        )
        _, report = create_session(model_path, manifest, ProviderConfig(trt_cache_dir=work / "appliance-trt"))
        line("OK", "appliance selection", report.summary())
    zero_point_forms(built)
    eight_bit_blocks(built)
    return 1 if failures else 0


def eight_bit_blocks(built: list[str]) -> None:
    """8-bit MatMulNBits (K 1536, N 1536) in blocks of 32 and 128 on the best provider alone."""
    provider = next((p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in built), "CPUExecutionProvider")
    k_dim = n_dim = 1536
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((k_dim, n_dim)).astype(np.float32)
    figures = []
    for block in (32, 128):
        blocks = weight.T.reshape(n_dim, k_dim // block, block)
        scales = np.abs(blocks).max(axis=2, keepdims=True) / 127
        codes = (np.rint(blocks / scales) + 128).astype(np.uint8)
        node = helper.make_node(
            "MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft",
            K=k_dim, N=n_dim, bits=8, block_size=block, accuracy_level=4,
        )
        graph = helper.make_graph(
            [node], "q8", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k_dim])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n_dim])],
            [numpy_helper.from_array(codes, "b"), numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "s")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        options = ort.SessionOptions()
        if provider != "CPUExecutionProvider":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=[provider])
        except Exception as exc:  # noqa: BLE001 - a provider without the form is the finding
            line("WARN", f"MatMulNBits 8-bit block {block}", f"{provider} cannot run it: {str(exc).splitlines()[0]}")
            continue
        times = []
        error = 0.0
        for rows in (1, 8):
            a = rng.standard_normal((rows, k_dim)).astype(np.float32)
            (got,) = session.run(None, {"a": a})
            error = max(error, float(np.abs(got - a @ weight).max() / np.abs(a @ weight).max()))
            times.append(median_run_us(session, {"a": a}))
        verdict = "OK" if error < 0.02 else "FAIL"
        figures.append(f"block {block}: {times[0]:.0f}/{times[1]:.0f} us at M 1/8 (error {error:.1e}, {verdict})")
    if figures:
        line("OK" if all("FAIL" not in f for f in figures) else "WARN", "MatMulNBits 8-bit blocks", f"{provider}: " + "; ".join(figures))


def median_run_us(session: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: int = 10, runs: int = 50) -> float:
    """Median microseconds of one run after a warm-up."""
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def zero_point_forms(built: list[str]) -> None:
    """Time MatMulNBits (K 576, N 1536, block 32, M 1 and 8) with uint8 and with float zero points."""
    provider = next((p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in built), "CPUExecutionProvider")
    k_dim, n_dim, block = 576, 1536, 32
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (n_dim, k_dim // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, n_dim * k_dim // block).astype(np.float32)
    forms = {
        "uint8": np.full(n_dim * ((k_dim // block + 1) // 2), 0x88, np.uint8),
        "float": rng.uniform(0, 15, n_dim * k_dim // block).astype(np.float32),
    }
    timings: dict[str, list[float]] = {}
    for form, zero_points in forms.items():
        node = helper.make_node(
            "MatMulNBits", ["a", "b", "s", "z"], ["y"], domain="com.microsoft",
            K=k_dim, N=n_dim, bits=4, block_size=block, accuracy_level=4,
        )
        graph = helper.make_graph(
            [node], "zp", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k_dim])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n_dim])],
            [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s"), numpy_helper.from_array(zero_points, "z")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8  # onnx's newest IR can be past what an older onnxruntime-gpu reads
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=[provider])
        except Exception as exc:  # noqa: BLE001 - a provider without the form is the finding
            line("WARN", f"MatMulNBits {form} zero points", f"{provider} refused it: {str(exc).splitlines()[0]}")
            continue
        provider = session.get_providers()[0]  # a listed provider may still fall back to the CPU
        for rows in (1, 8):
            a = rng.standard_normal((rows, k_dim)).astype(np.float32)
            timings.setdefault(form, []).append(median_run_us(session, {"a": a}))
    if len(timings) == 2:
        ratio = max(f / u for f, u in zip(timings["float"], timings["uint8"], strict=True))
        line(
            "OK", "MatMulNBits zero points",
            f"{provider}: uint8 {timings['uint8'][0]:.0f}/{timings['uint8'][1]:.0f} us, float "
            f"{timings['float'][0]:.0f}/{timings['float'][1]:.0f} us at M 1/8 (float form {ratio:.1f}x the time)",
        )


if __name__ == "__main__":
    raise SystemExit(main())
