"""Forward passes of a decoder graph over a KV cache that lives in preallocated buffers.

Two graph kinds (manifest `generation.graph`):

* "genai" (onnxruntime-genai's model builder, GroupQueryAttention): one KV buffer per layer of
  shape [max_slots, kv_heads, max_len, head_dim] is bound as BOTH the past input and the present
  output, so the attention kernel writes each new K/V in place at the row's own position
  (`attention_mask` row sums tell it the lengths). Nothing is copied per step. A batch is any
  contiguous range of slots, which a numpy view of the buffer backs without a copy; the caller
  (KvCacheManager) keeps running sequences compacted so the decode batch is slots [0, n).
* "optimum" (past_key_values.N.key inputs, present.N.key outputs, no buffer sharing): the same
  buffers, but the runner feeds the row's past as input and copies the new positions of the
  present output back. Simpler and slower; it lets GPT-2-family exports serve.

What the kernel allows decides the call shapes (GroupQueryAttention): a batch of more than one
row is either a first prompt (no past in any row, right-padded to the longest) or a decode step
(one new token per row); a prompt chunk that continues a past (chunked prefill, speculative
verification) runs alone.

Never imports torch or transformers; never allocates KV memory per step.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from appliance.errors import ModelRejected
from appliance.repository.manifest import GenerationSpec

#: The cache buffers' numpy type per manifest datatype (an int8 cache's scales live in the graph).
_NUMPY_KV_DTYPES: dict[str, type[np.generic]] = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8}


@dataclass(frozen=True)
class KvGeometry:
    """Shape facts of one model's KV cache, from its manifest."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of every layer for one token position."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def from_spec(cls, spec: GenerationSpec) -> KvGeometry:
        dtype = _NUMPY_KV_DTYPES.get(spec.kv_datatype)
        if dtype is None:
            raise ModelRejected(f"generation.kv_datatype {spec.kv_datatype} is not supported", field="generation.kv_datatype")
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, np.dtype(dtype))


def cpu_session_options(threads: int | None, *, stop_spinning_after_run: bool = False) -> ort.SessionOptions:
    """Options the measurements favour on CPU: intra-op threads = cores, spinning on, sequential.

    Spinning off cost 35% of decode speed on the 2-core box; one thread instead of two cost 24%.
    `stop_spinning_after_run`: the pool still spins between the operators of a run, but parks
    as soon as the run returns. Two sessions that take turns on the same cores (a draft model
    and its target) need it, or each one's idle workers spin on the cores the other is using.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    return options


def open_decoder_session(
    model_path: Path, *, threads: int | None, providers: list[str | tuple[str, dict[str, object]]] | None = None, takes_turns: bool = False
) -> ort.InferenceSession:
    """One InferenceSession for a decoder graph; ModelRejected when ONNX Runtime refuses it.
    `takes_turns`: it alternates with another session on the same cores (see cpu_session_options)."""
    try:
        return ort.InferenceSession(
            str(model_path),
            sess_options=cpu_session_options(threads, stop_spinning_after_run=takes_turns),
            providers=providers or ["CPUExecutionProvider"],
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise ModelRejected(f"{model_path.name}: ONNX Runtime cannot load the decoder: {exc}", field="model_file") from None


#: Linux only; elsewhere the mapping simply gets what the platform gives.
_NO_HUGE_PAGES: int | None = getattr(mmap, "MADV_NOHUGEPAGE", None)
_FREE_PAGES: int | None = getattr(mmap, "MADV_DONTNEED", None)


def _page_backed_zeros(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, mmap.mmap]:
    """A zero array in its own anonymous mapping, on small pages only.

    A slot is [kv_heads, context, head_dim]: each head's rows start a fresh 2 MiB stretch at
    SmolLM2's 8192-token context. numpy asks the kernel for transparent huge pages on large
    arrays, so the first position written into a head made all 2 MiB resident: every slot ever
    used cost its full context (measured: 16 slots -> 6 GB resident for 64-token chats, past any
    KV budget). On small pages memory follows the positions actually written.
    """
    nbytes = int(np.prod(shape)) * dtype.itemsize
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if _NO_HUGE_PAGES is not None:
        mapping.madvise(_NO_HUGE_PAGES)
    return np.frombuffer(mapping, dtype=dtype, count=int(np.prod(shape))).reshape(shape), mapping


#: (past input, present output) graph names of one layer's K or V.
NamePair = tuple[str, str]


class KvBuffers(Protocol):
    """Where the KV cache lives: host memory (`KvStore`) or a GPU (`device_kv.DeviceKvStore`).

    Every layer's K and V are one buffer [max_slots, kv_heads, max_len, head_dim]; a batch is
    a contiguous range of slots. Callers see only these operations, so the cache manager, the
    prefix cache and the runner do not care where the memory is.
    """

    geometry: KvGeometry
    max_slots: int
    max_len: int

    @property
    def nbytes(self) -> int: ...

    def bind(self, binding: ort.IOBinding, keys: list[NamePair], values: list[NamePair], first: int, rows: int) -> list[object]:
        """Bind slots [first, first+rows) of every layer as both past input and present output;
        returns what must stay alive as long as the binding."""
        ...

    def move_slot(self, source: int, target: int, length: int) -> None: ...

    def forget(self, slot: int) -> None: ...

    def read(self, slot: int, length: int) -> list[np.ndarray]: ...

    def write(self, slot: int, saved: list[np.ndarray], length: int) -> None: ...


class KvStore:
    """The preallocated K and V buffers of every layer, one row (slot) per sequence.

    Address space for every slot's whole context is reserved up front (so nothing is allocated
    per step and a batch is one view), but memory becomes resident only where positions are
    written, and a slot's pages go back to the system when its sequence leaves (`forget`): what
    the cache holds follows the tokens admitted under the KV budget, not slots x context.
    """

    def __init__(self, geometry: KvGeometry, max_slots: int, max_len: int) -> None:
        shape = (max_slots, geometry.num_kv_heads, max_len, geometry.head_dim)
        self.geometry = geometry
        self.max_slots = max_slots
        self.max_len = max_len
        keys = [_page_backed_zeros(shape, geometry.dtype) for _ in range(geometry.num_layers)]
        values = [_page_backed_zeros(shape, geometry.dtype) for _ in range(geometry.num_layers)]
        self.keys = [array for array, _ in keys]
        self.values = [array for array, _ in values]
        self._mappings = [mapping for _, mapping in (*keys, *values)]
        self._slot_bytes = geometry.num_kv_heads * max_len * geometry.head_dim * geometry.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.keys) + sum(buffer.nbytes for buffer in self.values)

    def bind(self, binding: ort.IOBinding, keys: list[NamePair], values: list[NamePair], first: int, rows: int) -> list[object]:
        kept: list[object] = []
        for names, buffers in ((keys, self.keys), (values, self.values)):
            for (name_in, name_out), buffer in zip(names, buffers, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buffer[first : first + rows])
                binding.bind_ortvalue_input(name_in, value)
                binding.bind_ortvalue_output(name_out, value)
                kept.append(value)
        return kept

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy one sequence's first `length` positions to another slot (compaction on retire)."""
        for buffer in (*self.keys, *self.values):
            buffer[target, :, :length] = buffer[source, :, :length]

    def forget(self, slot: int) -> None:
        """Give a vacated slot's memory back; it reads as zeros until written again."""
        if _FREE_PAGES is None:
            return
        # Whole pages inside the slot only: a page shared with a neighbouring slot stays.
        start = -(-slot * self._slot_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (slot + 1) * self._slot_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        if end <= start:
            return
        for mapping in self._mappings:
            mapping.madvise(_FREE_PAGES, start, end - start)

    def write_runs(self, first: int, parts: list[np.ndarray], past_lens: np.ndarray, new_lens: np.ndarray) -> None:
        """Put a run's new positions (K then V per layer, each [rows, kv heads, width, head dim])
        into slots [first, first + rows) after each row's past; right padding is not written."""
        for buffer, part in zip((*self.keys, *self.values), parts, strict=True):
            for row, (start, count) in enumerate(zip(past_lens.tolist(), new_lens.tolist(), strict=True)):
                buffer[first + row, :, start : start + count] = part[row, :, :count]

    def read(self, slot: int, length: int) -> list[np.ndarray]:
        """A copy of one slot's first `length` positions, K then V per layer (prefix cache)."""
        return [buffer[slot, :, :length].copy() for buffer in (*self.keys, *self.values)]

    def write(self, slot: int, saved: list[np.ndarray], length: int) -> None:
        """Put back what `read` returned, truncated to `length` positions."""
        for buffer, part in zip((*self.keys, *self.values), saved, strict=True):
            buffer[slot, :, :length] = part[:, :length]


class StepPreempted(Exception):
    """The run was stopped through its RunOptions' terminate flag before it finished.

    Nothing of it may be used; running the same inputs again is safe: a decode run writes each
    row's new key and value at the same cache position whether or not it ran to the end, and
    no sequence advanced."""


class DecoderRunner(Protocol):
    """One forward pass over a contiguous range of KV slots."""

    kv: KvBuffers
    vocab_size: int

    def forward(
        self,
        first_slot: int,
        input_ids: np.ndarray,
        past_lens: np.ndarray,
        new_lens: np.ndarray,
        *,
        all_logits: bool,
        run_options: ort.RunOptions | None = None,
        prompt: bool = False,
    ) -> np.ndarray:
        """Run `input_ids` [rows, width] for slots [first_slot, first_slot + rows).

        `past_lens[i]` tokens of row i are already in the cache; `new_lens[i]` <= width of its
        input tokens are real (the rest is right padding). Returns logits [rows, width, vocab]
        when `all_logits`, else the logits of each row's last real token [rows, vocab]. The
        returned array is a view of a reused buffer: valid until the next call. StepPreempted
        when another thread set `run_options.terminate` while it ran. `prompt`: the call is a
        chunk of prompt (not a decode step or a speculative verification), which an int8-cache
        graph may attend in fp32 (export/llm/kv_prefill.py).
        """
        ...


def _run_preemptible(run: Callable[[], Any], run_options: ort.RunOptions | None) -> Any:  # noqa: ANN401 - ORT's own result
    """`run()`, with a run stopped by its terminate flag reported as StepPreempted."""
    try:
        return run()
    except Exception:
        if run_options is not None and run_options.terminate:
            raise StepPreempted from None
        raise


def _check_inputs(session: ort.InferenceSession, names: list[str]) -> None:
    have = {node.name for node in session.get_inputs()} | {node.name for node in session.get_outputs()}
    missing = [name for name in names if name not in have]
    if missing:
        raise ModelRejected(f"decoder graph lacks {', '.join(missing[:4])}", field="generation")


class SharedBufferRunner:
    """The "genai" graph kind: past and present bound to the same preallocated buffers.

    An int8-cache graph with an fp32-attention input (manifest `fp32_attention_input`) runs
    prompt chunks in fp32: their present outputs are only the new positions, bound to a scratch
    area and copied into the cache after the run; every other call runs the int8 kernel in place.
    """

    def __init__(self, session: ort.InferenceSession, spec: GenerationSpec, kv: KvBuffers, *, max_rows_x_width: int) -> None:
        self.session = session
        self.kv = kv
        self.vocab_size = spec.vocab_size
        self._host_kv: KvStore | None = None
        self._scratch = np.empty(0, np.int8)
        self._fp32_attention = spec.fp32_attention_input
        if self._fp32_attention is not None:
            if not isinstance(kv, KvStore):
                raise ModelRejected(
                    "a graph with an fp32-attention input keeps its KV cache in host memory",
                    field="generation.fp32_attention_input",
                )
            self._host_kv = kv
            run_positions = max(max_rows_x_width, kv.max_slots) * spec.num_kv_heads * spec.head_dim
            self._scratch = np.empty(2 * spec.num_layers * run_positions, kv.geometry.dtype)
        layers = range(spec.num_layers)
        self._keys = [(spec.past_key_name.format(layer=i), spec.present_key_name.format(layer=i)) for i in layers]
        self._values = [(spec.past_value_name.format(layer=i), spec.present_value_name.format(layer=i)) for i in layers]
        _check_inputs(
            session,
            ["input_ids", "attention_mask", "logits", *(name for pair in self._keys + self._values for name in pair)]
            + ([self._fp32_attention] if self._fp32_attention else []),
        )
        # A half-precision graph (the CUDA layout) gives fp16 logits; sampling reads float32.
        logits_type = next(node.type for node in session.get_outputs() if node.name == "logits")
        self._logits_dtype = np.dtype(np.float16 if logits_type == "tensor(float16)" else np.float32)
        self._logits = np.zeros(max(max_rows_x_width, kv.max_slots) * spec.vocab_size, self._logits_dtype)
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, list[object]]] = {}
        self._positions = np.arange(kv.max_len, dtype=np.int64)
        self._logits_start = spec.logits_start_input

    def _binding(self, first: int, rows: int, in_fp32: bool) -> ort.IOBinding:
        """An IOBinding with the KV views of slots [first, first+rows) bound both ways and the
        fp32-attention input set, kept (one per kind of call: a call `in_fp32` rebinds its
        present outputs every time)."""
        key = (first, rows, in_fp32)
        cached = self._bindings.get(key)
        if cached is not None:
            return cached[0]
        binding = self.session.io_binding()
        kept = self.kv.bind(binding, self._keys, self._values, first, rows)
        if self._fp32_attention is not None:
            binding.bind_cpu_input(self._fp32_attention, np.asarray([in_fp32]))
        if len(self._bindings) > 256:
            self._bindings.clear()
        self._bindings[key] = (binding, kept)
        return binding

    def forward(
        self,
        first_slot: int,
        input_ids: np.ndarray,
        past_lens: np.ndarray,
        new_lens: np.ndarray,
        *,
        all_logits: bool,
        run_options: ort.RunOptions | None = None,
        prompt: bool = False,
    ) -> np.ndarray:
        rows, width = input_ids.shape
        totals = past_lens + new_lens
        first_prompt = not past_lens.any()
        # GroupQueryAttention reads each row's length from the mask's row sum and the total
        # length from its width; a first prompt needs width == input width.
        mask_width = width if first_prompt else int(totals.max())
        if not first_prompt and mask_width == width:
            mask_width += 1  # only possible with padding rows; the extra zero column is harmless
        mask = (self._positions[:mask_width] < totals[:, None]).astype(np.int64)
        # fp32 attention: prompt chunks only (one row continuing its past, or a first prompt).
        in_fp32 = self._host_kv is not None and prompt and width > 1 and (rows == 1 or first_prompt)
        binding = self._binding(first_slot, rows, in_fp32)
        new_positions = self._bind_new_positions(binding, rows, width) if in_fp32 else None
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        # One row that needs only its last position: skip the LM head for the others (a
        # fifth of a prefill). Several rows may end at different positions: keep them all.
        start = int(new_lens[0]) - 1 if self._logits_start and rows == 1 and not all_logits else 0
        if self._logits_start:
            binding.bind_cpu_input(self._logits_start, np.asarray([start], np.int64))
        positions = width - start
        logits = self._logits[: rows * positions * self.vocab_size].reshape(rows, positions, self.vocab_size)
        binding.bind_output("logits", "cpu", 0, self._logits_dtype, logits.shape, logits.ctypes.data)
        _run_preemptible(lambda: self.session.run_with_iobinding(binding, run_options), run_options)
        if new_positions is not None and self._host_kv is not None:
            self._host_kv.write_runs(first_slot, new_positions, past_lens, new_lens)
        if all_logits:
            chosen = logits
        elif start:
            chosen = logits[:, 0]
        else:
            chosen = logits[np.arange(rows), new_lens - 1]
        return chosen if self._logits_dtype == np.float32 else chosen.astype(np.float32)

    def _bind_new_positions(self, binding: ort.IOBinding, rows: int, width: int) -> list[np.ndarray]:
        """Bind every present output to its own part of the scratch area, K then V per layer
        (the order KvStore.write_runs takes); the graph fills them with the run's positions."""
        geometry = self.kv.geometry
        shape = (rows, geometry.num_kv_heads, width, geometry.head_dim)
        size = int(np.prod(shape))
        parts = []
        for index, (_, name_out) in enumerate((*self._keys, *self._values)):
            part = self._scratch[index * size : (index + 1) * size].reshape(shape)
            binding.bind_output(name_out, "cpu", 0, geometry.dtype, shape, part.ctypes.data)
            parts.append(part)
        return parts


class ConcatRunner:
    """The "optimum" graph kind: past fed as inputs, present outputs copied back into the store."""

    def __init__(self, session: ort.InferenceSession, spec: GenerationSpec, kv: KvStore) -> None:
        self.session = session
        self.kv = kv
        self.vocab_size = spec.vocab_size
        layers = range(spec.num_layers)
        self._past_names = [spec.past_key_name.format(layer=i) for i in layers] + [
            spec.past_value_name.format(layer=i) for i in layers
        ]
        self._present_names = [spec.present_key_name.format(layer=i) for i in layers] + [
            spec.present_value_name.format(layer=i) for i in layers
        ]
        _check_inputs(session, ["input_ids", "attention_mask", "logits", *self._past_names, *self._present_names])
        self._input_names = {node.name for node in session.get_inputs()}

    def forward(
        self,
        first_slot: int,
        input_ids: np.ndarray,
        past_lens: np.ndarray,
        new_lens: np.ndarray,
        *,
        all_logits: bool,
        run_options: ort.RunOptions | None = None,
        prompt: bool = False,
    ) -> np.ndarray:
        del prompt  # an Optimum graph has one attention path
        rows, width = input_ids.shape
        buffers = (*self.kv.keys, *self.kv.values)
        past_width = int(past_lens.max())
        # Left-align each row's past and right-pad; padded positions are masked out.
        total_width = past_width + width
        mask = np.zeros((rows, total_width), np.int64)
        positions = np.zeros((rows, width), np.int64)
        for row in range(rows):
            mask[row, : past_lens[row]] = 1
            mask[row, past_width : past_width + new_lens[row]] = 1
            positions[row] = past_lens[row] + np.arange(width)
        feeds: dict[str, np.ndarray] = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), "attention_mask": mask}
        if "position_ids" in self._input_names:
            feeds["position_ids"] = positions
        for name, buffer in zip(self._past_names, buffers, strict=True):
            feeds[name] = buffer[first_slot : first_slot + rows, :, :past_width]
        outputs = _run_preemptible(lambda: self.session.run(["logits", *self._present_names], feeds, run_options), run_options)
        logits = outputs[0]
        for buffer, present in zip(buffers, outputs[1:], strict=True):
            for row in range(rows):
                start = int(past_lens[row])
                count = int(new_lens[row])
                buffer[first_slot + row, :, start : start + count] = present[row, :, past_width : past_width + count]
        if all_logits:
            return logits
        return logits[np.arange(rows), new_lens - 1]


def make_runner(
    session: ort.InferenceSession, spec: GenerationSpec, kv: KvBuffers, *, max_rows_x_width: int
) -> SharedBufferRunner | ConcatRunner:
    """The runner for the manifest's graph kind (an "optimum" graph needs its KV in host memory)."""
    if spec.graph == "genai":
        return SharedBufferRunner(session, spec, kv, max_rows_x_width=max_rows_x_width)
    if not isinstance(kv, KvStore):
        raise ModelRejected("an optimum-kind decoder graph keeps its KV cache in host memory", field="generation.graph")
    return ConcatRunner(session, spec, kv)
