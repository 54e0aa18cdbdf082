"""The unquantised PyTorch model: what every exported decoder variant is measured against.

Loaded once per export from the Hugging Face folder the graph was built from (for GGUF: the
dequantised folder), in float32, eval mode, no gradients. It scores the same windows of the
same token ids as the ONNX loop (onnx_decoder.window_spans) and produces fixed-length greedy
continuations with EOS switched off, so lengths never differ for reasons other than the model.

Imports torch and transformers (lazily); used by the export stage only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.errors import ExportError
from appliance.export.llm.onnx_decoder import PERPLEXITY_WINDOW_TOKENS, negative_log_likelihood, window_spans
from appliance.offline import enforce_offline


def attention_implementation(config: object) -> str | None:
    """The attention implementation with which transformers computes what the model defines
    (None: its default).

    The default, PyTorch's scaled_dot_product_attention, silently drops Gemma 2's
    `attn_logit_softcapping` (the tanh cap on attention scores); transformers' eager attention
    applies it, as Google's reference does. Measured on a tiny Gemma 2 with the cap at 5: sdpa's
    logits 2.3 away from eager's, the builder's graph (which caps) within 4e-6 of eager's.
    """
    return "eager" if getattr(config, "attn_logit_softcapping", None) else None


class TorchReference:
    """A float32 transformers causal LM for reference outputs."""

    def __init__(self, hf_dir: Path, context_length: int, threads: int | None = None) -> None:
        enforce_offline()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        try:
            config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(
                str(hf_dir), dtype=torch.float32, local_files_only=True, attn_implementation=attention_implementation(config)
            ).eval()
        except Exception as exc:  # noqa: BLE001 - transformers raises many unrelated types
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"source: cannot load the PyTorch reference: {detail}", field="source") from None
        # Fixed-length greedy continuations: transformers otherwise restores EOS from the
        # model's defaults ("generation_config default values have been modified").
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = self.model.config.pad_token_id or 0
        for key in ("temperature", "top_p", "top_k", "min_p"):
            setattr(self.model.generation_config, key, None)
        self.model.generation_config.do_sample = False
        self.context_length = context_length
        self._torch = torch

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits of one forward pass."""
        with self._torch.no_grad():
            out = self.model(self._torch.tensor([ids], dtype=self._torch.long))
        return out.logits[0].float().numpy()

    def perplexity(self, ids: list[int], window_tokens: int = PERPLEXITY_WINDOW_TOKENS) -> float:
        total_nll = 0.0
        count = 0
        for start, end in window_spans(len(ids), min(window_tokens, self.context_length)):
            nll, scored = negative_log_likelihood(self.logits(ids[start:end]).astype(np.float64), ids[start:end])
            total_nll += nll
            count += scored
        return float(np.exp(total_nll / max(count, 1)))

    def top_two_gaps(self, prompt_ids: list[int], tokens: list[int]) -> list[float]:
        """For each generated token, how far the winning logit was above the runner-up: where
        it is tiny, another faithful implementation may pick the other token (a near tie)."""
        logits = self.logits(prompt_ids + tokens)[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
        top_two = np.sort(logits, axis=1)[:, -2:]
        return [float(gap) for gap in top_two[:, 1] - top_two[:, 0]]

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        """Exactly `new_tokens` greedy tokens after the prompt (EOS does not stop it)."""
        torch = self._torch
        with torch.no_grad():
            output = self.model.generate(
                torch.tensor([prompt_ids], dtype=torch.long),
                attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
            )
        return [int(token) for token in output[0, len(prompt_ids) :]]
