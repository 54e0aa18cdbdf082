"""Where a decoder runs: on the GPU when the box has CUDA and the graph is laid out for it,
otherwise on the CPU; and the KV store that goes with that choice.

A graph is laid out for CUDA when it is a model-builder ("genai") graph with a half-precision KV
cache (`appliance export --quant fp16`). The CPU layouts (fp32 activations and KV cache, the
int4 / int8 CPU graphs) would run on CUDA only with ONNX Runtime moving GroupQueryAttention
back to the CPU, copying every layer's whole KV buffer across each step, so they stay on the CPU
even on a GPU box, and the engine says why (the dashboard's provider column shows "cpu").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from appliance.config import ProviderChoice
from appliance.errors import ModelRejected
from appliance.generation.device_kv import CudaMemory, DeviceKvStore, HostMemory, fit_context
from appliance.generation.model_runner import DecoderRunner, KvBuffers, KvGeometry, KvStore, make_runner, open_decoder_session
from appliance.repository.manifest import GenerationSpec

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
#: Share of the GPU's free memory (after the weights are loaded) the KV reservation may take.
DEVICE_KV_SHARE = 0.6
#: Prefill vs step-by-step decode of the same tokens at load: largest logit difference allowed,
#: as a share of the largest logit (fp16 kernels differ between the two paths by far less).
LOAD_CHECK_TOLERANCE = 0.05
#: A context shorter than this after fitting the reservation is not worth serving.
MIN_DEVICE_CONTEXT = 256


@dataclass(frozen=True)
class Placement:
    """`device`: where the decoder's session runs. `device_store`: keep the KV cache in ONNX
    Runtime device buffers even on the CPU (tests run the GPU store's logic that way, with
    `HostMemory` standing in for the CUDA runtime). `note`: why the GPU is not used, when the
    box has one."""

    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = 0
    device_store: bool = False
    note: str | None = None


def cpu_layout_reason(spec: GenerationSpec) -> str | None:
    """Why this graph cannot decode on CUDA, or None when it is in the CUDA layout."""
    if spec.graph != "genai" or spec.kv_datatype != "FP16":
        return "the graph is laid out for the CPU (fp32 KV cache); export it with --quant fp16 to decode on CUDA"
    return None


def open_placed_decoder(
    model_path: Path,
    spec: GenerationSpec,
    *,
    choice: ProviderChoice,
    device_id: int,
    threads: int | None,
    takes_turns: bool,
    forced: Placement | None = None,
) -> tuple[ort.InferenceSession, Placement]:
    """The decoder's session and where it ended up (`forced` skips the decision)."""
    if forced is not None:
        providers: list[str | tuple[str, dict[str, object]]] = (
            [(CUDA, {"device_id": forced.device_id}), "CPUExecutionProvider"] if forced.device == "cuda" else ["CPUExecutionProvider"]
        )
        return open_decoder_session(model_path, threads=threads, providers=providers, takes_turns=takes_turns), forced
    if choice == "cpu" or CUDA not in ort.get_available_providers():
        return open_decoder_session(model_path, threads=threads, takes_turns=takes_turns), Placement()
    note = cpu_layout_reason(spec)
    if note is not None:
        log.info("%s: %s", _label(model_path), note)
        return open_decoder_session(model_path, threads=threads, takes_turns=takes_turns), Placement(note=note)
    session = open_decoder_session(
        model_path, threads=threads, providers=[(CUDA, {"device_id": device_id}), "CPUExecutionProvider"], takes_turns=takes_turns
    )
    if session.get_providers()[0] != CUDA:
        note = "the CUDA provider did not load (driver, CUDA or cuDNN libraries missing)"
        log.warning("%s: %s", _label(model_path), note)
        return session, Placement(note=note)
    return session, Placement("cuda", device_id, device_store=True)


def _label(model_path: Path) -> str:
    """"name vN" from a repository path (<models>/<name>/<N>/model.onnx)."""
    return f"{model_path.parent.parent.name} v{model_path.parent.name}"


def device_context(geometry: KvGeometry, max_slots: int, context: int, placement: Placement) -> int:
    """The context the KV reservation allows: all of it on the host (pages follow use), what
    fits `DEVICE_KV_SHARE` of free memory on a GPU (reserved up front)."""
    if placement.device != "cuda":
        return context
    fitted = fit_context(geometry, max_slots, context, CudaMemory(placement.device_id).free_bytes(), DEVICE_KV_SHARE)
    if fitted < min(context, MIN_DEVICE_CONTEXT):
        raise ModelRejected(
            f"the GPU has room for only {fitted} tokens of context per sequence at {max_slots} sequences; "
            "lower generation.max_running_sequences",
            field="generation.max_running_sequences",
        )
    if fitted < context:
        log.info("KV cache on the GPU: context %d -> %d tokens to fit %d sequences", context, fitted, max_slots)
    return fitted


@dataclass
class PlacedDecoder:
    """A decoder ready to run: its runner, KV store, where it runs and the context it got."""

    runner: DecoderRunner
    store: KvBuffers
    placement: Placement
    context: int


def place_decoder(
    model_path: Path,
    spec: GenerationSpec,
    *,
    max_slots: int,
    context: int,
    width: int,
    choice: ProviderChoice,
    device_id: int,
    threads: int | None,
    takes_turns: bool,
    forced: Placement | None = None,
) -> PlacedDecoder:
    """Open the decoder where `open_placed_decoder` says. On the device path the KV reservation
    must fit and pass `verify_device_path`, or the decoder is reopened on the CPU with the reason
    in the note: the model serves either way, slower, rather than failing at load or, worse, on
    its first requests."""
    session, placement = open_placed_decoder(
        model_path, spec, choice=choice, device_id=device_id, threads=threads, takes_turns=takes_turns, forced=forced
    )
    geometry = KvGeometry.from_spec(spec)
    if not (placement.device == "cuda" or placement.device_store):
        store = KvStore(geometry, max_slots, context)
        return PlacedDecoder(make_runner(session, spec, store, max_rows_x_width=width), store, placement, context)
    try:
        fitted = device_context(geometry, max_slots, context, placement)
        memory = CudaMemory(placement.device_id) if placement.device == "cuda" else HostMemory()
        device_store = DeviceKvStore(geometry, max_slots, fitted, device=placement.device, device_id=placement.device_id, memory=memory)
        runner = make_runner(session, spec, device_store, max_rows_x_width=width)
        verify_device_path(runner, device_store)
        return PlacedDecoder(runner, device_store, placement, fitted)
    except Exception as exc:  # noqa: BLE001 - whatever broke (no room, a bad copy), the CPU path still serves
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        note = f"the GPU path failed its load check ({message}); decoding on the CPU"
        log.warning("%s: %s", _label(model_path), note)
    session = open_decoder_session(model_path, threads=threads, takes_turns=takes_turns)
    store = KvStore(geometry, max_slots, context)
    return PlacedDecoder(make_runner(session, spec, store, max_rows_x_width=width), store, Placement(note=note), context)


def verify_device_path(runner: DecoderRunner, store: DeviceKvStore) -> None:
    """Prove the device path at load, before any request, against itself:

    - a known pattern written to slot 0, moved to the last slot and read back is unchanged;
    - four tokens prefilled at once give the next-token logits of two prefilled and two decoded
      one by one in another slot, while slot 0 held other tokens (each slot range's KV is
      written in place and read back where it belongs);
    - a batch of two rows of different lengths (a right-padded prefill, then one decode step
      with different past lengths, the engine's everyday shapes) gives each row's logits alone.
    """
    geometry = store.geometry
    pattern = [
        np.full((geometry.num_kv_heads, 2, geometry.head_dim), index + 1, geometry.dtype) for index in range(2 * geometry.num_layers)
    ]
    last = store.max_slots - 1
    store.write(0, pattern, 2)
    if last:
        store.move_slot(0, last, 2)
    if not all(np.array_equal(got, want) for got, want in zip(store.read(last, 2), pattern, strict=True)):
        raise RuntimeError("KV copies through device memory came back changed")

    def run(slot: int, ids: list[list[int]], past: list[int], new: list[int]) -> np.ndarray:
        tokens = np.asarray(ids, np.int64) % runner.vocab_size
        return runner.forward(slot, tokens, np.asarray(past, np.int64), np.asarray(new, np.int64), all_logits=False).copy()

    long, short, extra = [1, 2, 3, 4], [5, 6], 7
    run(last, [long[:2]], [0], [2])
    if last:  # other tokens in slot 0 meanwhile: a binding that missed the slot offset would clobber them
        run(0, [[7, 8, 9, 10]], [0], [4])
    run(last, [long[2:3]], [2], [1])
    stepwise = run(last, [long[3:]], [3], [1])
    alone_long = run(0, [long], [0], [4])
    _agree(alone_long, stepwise, "a decode step over the cached KV disagrees with prefilling the same tokens")
    if store.max_slots < 3:
        return
    next_long = run(0, [[extra]], [4], [1])
    alone_short = run(0, [short], [0], [2])
    next_short = run(0, [[extra]], [2], [1])
    batched = run(1, [long, short + [0, 0]], [0, 0], [4, 2])
    _agree(np.stack([alone_long[0], alone_short[0]]), batched, "a padded batch prefill disagrees with its rows alone")
    stepped = run(1, [[extra], [extra]], [4, 2], [1, 1])
    _agree(np.stack([next_long[0], next_short[0]]), stepped, "a batched decode step disagrees with its rows alone")


def _agree(expected: np.ndarray, got: np.ndarray, failure: str) -> None:
    """Logits within `LOAD_CHECK_TOLERANCE` of the largest one. Not the argmax: two nearly tied
    tokens may swap between fp16 kernels, while a wrong binding moves every logit."""
    if not (np.isfinite(expected).all() and np.isfinite(got).all()):
        raise RuntimeError("the first forward passes gave non-finite logits")
    if float(np.abs(expected - got).max()) > LOAD_CHECK_TOLERANCE * float(np.abs(expected).max()) + 1e-3:
        raise RuntimeError(failure)
