"""GGUF file -> Hugging Face folder (fp32 safetensors + fixed tokenizer files).

transformers' GGUF loader dequantises the weights into float32 with the `gguf` package's own
`gguf.quants.dequantize` (every type the GGUF source accepts: sources/gguf.py's
SUPPORTED_GGML_TYPES, checked before this runs) and maps the llama.cpp tensor names back; its
loads share one parse of the file (one_parse_per_file). The result is saved as an ordinary
folder that the model builder and the PyTorch reference both read. The tokenizer is then
rewritten from the GGUF header (gguf_tokenizer.py) because the converter gets BOS/EOS and the pre-tokenizer wrong, and
generation_config.json and config.json get the header's special token ids. The converter also
drops Llama 3's rope scaling (llama.cpp stores it as the `rope_freqs.weight` tensor, which
transformers ignores): gguf_rope.py recovers `rope_scaling` from that tensor, and the saved
config's rope is checked to reproduce it.

Must only be called after `read_gguf_header` accepted the file (bounds are checked there, so
the loader never meets a lying header). Imports torch/transformers lazily.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.errors import ExportError
from appliance.export.llm.gguf_header import GgufHeader
from appliance.export.llm.gguf_rope import ROPE_FREQS_TENSOR, check_saved_rope, llama3_rope_scaling, read_rope_freqs
from appliance.export.llm.gguf_tokenizer import GgufTokenizerFacts, fix_tokenizer_files, pre_tokenizer_rules, tokenizer_facts
from appliance.offline import enforce_offline

#: Held while `gguf.GGUFReader` is replaced (one_parse_per_file): two loads in one process
#: must not restore each other's replacement.
_READER_SWAP = threading.Lock()


def gguf_to_hf_folder(header: GgufHeader, out_dir: Path) -> GgufTokenizerFacts:
    """Write `header.path` as a Hugging Face folder into `out_dir`; returns the tokenizer facts."""
    enforce_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # The converter logs a legacy-tokenizer notice on every load; the export prints its own.
    transformers_logging.set_verbosity_error()
    facts = tokenizer_facts(header)
    folder, name = str(header.path.parent), header.path.name
    pre_tokenizer_rules(facts, name)  # refuses an unknown pre-tokenizer before the weights load
    rope_factors = read_rope_freqs(header)
    if rope_factors is not None and header.architecture != "llama":
        raise ExportError(
            f"source: {name} ({header.architecture}) carries {ROPE_FREQS_TENSOR}, which the export reads only for llama",
            field="source",
        )
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), one_parse_per_file(header.path):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the GGUF loader raises many unrelated types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"source: transformers cannot load {name}: {detail}", field="source") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.bos_token_id = facts.bos_token_id
    model.config.eos_token_id = facts.eos_token_id
    model.config.pad_token_id = facts.pad_token_id
    generation = model.generation_config
    generation.bos_token_id = facts.bos_token_id
    generation.eos_token_id = facts.eos_token_id
    generation.pad_token_id = facts.pad_token_id
    if rope_factors is not None:
        config = model.config
        rotary_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scaling = llama3_rope_scaling(rope_factors, config.rope_theta, rotary_dim, name)
        if scaling is not None:
            config.rope_scaling = scaling
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    fix_tokenizer_files(out_dir, facts)
    _record_float32(out_dir / "config.json")
    del model
    if rope_factors is not None:
        check_saved_rope(out_dir, rope_factors, name)
    return facts


@contextlib.contextmanager
def one_parse_per_file(path: Path) -> Iterator[None]:
    """Let transformers' four loads of one GGUF (the config twice, the weights, the tokenizer)
    share one parsed `gguf.GGUFReader`.

    Why: each load parses the file's metadata afresh, and the gguf package reads a vocabulary
    one memory-mapped slice per string: at Qwen2.5's 151,936 tokens and 151,387 merges one parse
    took 16 s on the 2-core box (the dequantisation itself: 22 s). Sharing it took the whole
    1.5 B conversion from 90-93 s to 58-72 s. transformers imports the reader class inside its loader on
    every call, so the name is swapped for the duration of the load; the loader only reads
    fields and tensor views, so sharing one reader changes nothing it sees. Other files and
    writable modes get a reader of their own.
    """
    import gguf

    target = path.resolve()
    original = gguf.GGUFReader
    parse_once = functools.cache(lambda: original(target))

    def shared_reader(file: Any, mode: str = "r") -> Any:
        if mode != "r" or Path(file).resolve() != target:
            return original(file, mode)
        return parse_once()

    with _READER_SWAP:
        gguf.GGUFReader = shared_reader
        try:
            yield
        finally:
            gguf.GGUFReader = original


def _record_float32(config_path: Path) -> None:
    """Say in config.json that the weights are float32: they were dequantised from the GGUF
    blocks, and the builder and the PyTorch reference read the dtype from here."""
    config: dict[str, Any] = json.loads(config_path.read_text())
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    config_path.write_text(json.dumps(config, indent=2))
