"""Quality of an exported decoder against the unquantised PyTorch model.

Keys written to report.json (INTERFACES.md plus extras):

* `perplexity`: the candidate on the shipped prose (independent 512-token windows);
  `reference_perplexity`: the fp32 ONNX export on the same windows; `torch_perplexity`: the
  PyTorch model on the same windows.
* `greedy_agreement` (0..1): mean over the prompt set of (matching prefix length / 32) for the
  first 32 greedy tokens against PyTorch `generate` with EOS off; `greedy_agreement_64`: the
  same over 64 tokens; `greedy_identical_64`: prompts whose 64 tokens all match.
* `logits_max_abs_diff`: max |ONNX - PyTorch| over every position of the longest prompt.
* `perplexity_basis`: whose perplexity the loss divides by ("PyTorch", or the fp32 export
  standing in for a large model: below).

The budget's loss is `perplexity / torch_perplexity - 1` (>= 0): every variant is judged
against PyTorch, not only against the fp32 ONNX graph. Above GREEDY_FULL_SET_MAX_BYTES of fp32
weights the PyTorch perplexity pass (the slowest part of the evaluation: 272 of 884 s for a
1.5 B model on the 2-core box) is skipped when the fp32 graph's logits are within
STAND_IN_LOGITS_DIFF of PyTorch's: its perplexity then stands in (`perplexity_basis` says which
was used); otherwise PyTorch's is computed as for small models. Before any budget, the conversion
itself must be faithful (`conversion_failure`): the fp32 graph's logits within
LOGITS_TOLERANCE of PyTorch's on the longest prompt, and its 64 greedy tokens identical to
PyTorch's on every shipped prompt, except where they part at a near tie (PyTorch's top two
logits within TIE_MARGIN). A wrong conversion is rejected whatever the budget (an OLMo export
with logits 10.8 off and no prompt right was once accepted because its int4 matched its own
fp32 graph). The PyTorch outputs are computed once per export and the model is freed
afterwards. Imports torch only through torch_reference.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.export.llm.eval_data import TokenizerFile, load_prompts, load_prose, render_chat
from appliance.export.llm.onnx_decoder import OnnxDecoder
from appliance.export.tasks.base import ProgressReporter
from appliance.repository import GenerationSpec

GREEDY_AGREEMENT_TOKENS = 32
GREEDY_CHECK_TOKENS = 64
#: Largest |ONNX - PyTorch| logit of a faithful fp32 conversion. Measured: 5e-6 to 1.5e-4
#: (tiny Llama and GPT-2, SmolLM2-135M); a wrong one (OLMo through the builder): 10.8.
LOGITS_TOLERANCE = 0.05
#: PyTorch's top two logits this close are a near tie: a faithful graph may pick either.
TIE_MARGIN = 0.01
#: Up to this fp32 size (about 0.6 B parameters) every shipped prompt is decoded greedily;
#: above it, proportionally fewer (never under MIN_GREEDY_PROMPTS), spread over the set.
GREEDY_FULL_SET_MAX_BYTES = 2_500_000_000
MIN_GREEDY_PROMPTS = 3
#: Largest |fp32 graph - PyTorch| logit (on the longest prompt) with which the fp32 graph's
#: perplexity stands in for PyTorch's: no token's log-probability moves by more than twice
#: this, so the perplexity by at most exp(2 x 5e-4) - 1 = 0.1%, a tenth of the strictest
#: budget (1%). Measured on faithful conversions: 5e-6 to 1.5e-4 (1.5 B Qwen2.5 shape: 1.9e-5).
STAND_IN_LOGITS_DIFF = 5e-4


def greedy_prompt_count(reference_bytes: int, available: int) -> int:
    """How many prompts the greedy checks decode for a model whose fp32 export has
    `reference_bytes`. Why fewer for large models: the greedy runs (PyTorch, the fp32 graph, the
    candidate; 64 tokens each) are most of an export's time and grow with the model (0.5 B: 320
    of 783 s on the 2-core box), while the rule each prompt must pass stays the same, so the
    gate is as strict per prompt and perplexity still covers all of the prose."""
    if reference_bytes <= GREEDY_FULL_SET_MAX_BYTES:
        return available
    scaled = int(available * GREEDY_FULL_SET_MAX_BYTES / reference_bytes)
    return max(min(MIN_GREEDY_PROMPTS, available), min(available, scaled))


def needs_torch_perplexity(reference_bytes: int) -> bool:
    """Whether the PyTorch perplexity is always computed (small models), or only when the fp32
    graph is not close enough to PyTorch for its perplexity to stand in (see the module doc)."""
    return reference_bytes <= GREEDY_FULL_SET_MAX_BYTES


def spread(items: list[list[int]], count: int) -> list[list[int]]:
    """`count` of `items`, evenly spaced from the first to the last (the prompt set mixes
    kinds in order, so a prefix would test fewer kinds)."""
    if count >= len(items):
        return list(items)
    return [items[int(index)] for index in np.linspace(0, len(items) - 1, count).round()]


def evaluation_threads(configured: int | None) -> int:
    """Threads for the evaluation's PyTorch and ONNX Runtime runs: the configured count, else
    half the cores. Quality runs do not need every core, and on a shared 2-core box both
    PyTorch's and ONNX Runtime's spinning thread pools collapse under oversubscription
    (measured: a tiny model's 64-token torch `generate` took 7.2 s with 2 threads and 1.4 s
    with 1 while other jobs held the cores)."""
    return configured or max(1, (os.cpu_count() or 2) // 2)


@dataclass
class ReferenceOutputs:
    """What the PyTorch model produced on the evaluation data."""

    #: None until needed, for a large model (needs_torch_perplexity).
    torch_perplexity: float | None
    greedy: list[list[int]]
    #: For each prompt, each greedy step's margin between PyTorch's top two logits.
    greedy_gaps: list[list[float]]
    check_logits: np.ndarray


@dataclass
class AgreementRun:
    """One ONNX graph's greedy runs and logits against PyTorch."""

    figures: dict[str, Any]
    #: For each prompt, the first step where the graph left PyTorch's tokens (None: never).
    divergences: list[int | None]
    logits_max_abs_diff: float


def prefix_match(a: list[int], b: list[int], length: int) -> int:
    """How many leading tokens of a[:length] and b[:length] are equal."""
    matched = 0
    for left, right in zip(a[:length], b[:length], strict=False):
        if left != right:
            break
        matched += 1
    return matched


class DecoderEvaluator:
    """Evaluation data as token ids, the PyTorch reference outputs, and ONNX scoring."""

    def __init__(
        self,
        *,
        hf_dir: Path,
        tokenizer_path: Path,
        chat_template: str | None,
        special_tokens: dict[str, Any],
        context_length: int,
        data_dir: Path,
        threads: int | None,
        progress: ProgressReporter,
        greedy_prompts: int | None = None,
        torch_perplexity: bool = True,
    ) -> None:
        """`greedy_prompts`: how many of the shipped prompts the greedy checks decode (None:
        all; see greedy_prompt_count). Calibration and the logits check use every prompt.
        `torch_perplexity`: False lets a faithful fp32 graph's perplexity stand in for
        PyTorch's (needs_torch_perplexity)."""
        self.hf_dir = hf_dir
        self.always_torch_perplexity = torch_perplexity
        self.threads = evaluation_threads(threads)
        self.progress = progress
        self.context_length = context_length
        tokenizer = TokenizerFile(tokenizer_path)
        self.prose_ids = tokenizer.encode(load_prose(data_dir))
        self.prompts = load_prompts(data_dir)
        self.prompt_ids = [
            tokenizer.encode(render_chat(chat_template, prompt.messages, special_tokens), add_special_tokens=False)
            for prompt in self.prompts
        ]
        limit = context_length - GREEDY_CHECK_TOKENS
        self.prompt_ids = [ids[-limit:] for ids in self.prompt_ids]
        self.check_ids = max(self.prompt_ids, key=len)
        self.greedy_ids = spread(self.prompt_ids, greedy_prompts or len(self.prompt_ids))
        self._reference: ReferenceOutputs | None = None
        self._perplexity_cache: dict[Path, float] = {}
        self._agreement_cache: dict[Path, AgreementRun] = {}

    def reference(self) -> ReferenceOutputs:
        """PyTorch outputs, computed on first use and kept (the model itself is freed)."""
        if self._reference is None:
            from appliance.export.llm.torch_reference import TorchReference

            model = TorchReference(self.hf_dir, self.context_length, threads=self.threads)
            perplexity = None
            if self.always_torch_perplexity:
                self.progress.step("PyTorch reference: perplexity")
                perplexity = model.perplexity(self.prose_ids)
            greedy: list[list[int]] = []
            gaps: list[list[float]] = []
            for index, ids in enumerate(self.greedy_ids):
                self.progress.step(f"PyTorch reference: greedy {index + 1}/{len(self.greedy_ids)}")
                greedy.append(model.greedy(ids, GREEDY_CHECK_TOKENS))
                gaps.append(model.top_two_gaps(ids, greedy[-1]))
            check_logits = model.logits(self.check_ids)
            self._reference = ReferenceOutputs(perplexity, greedy, gaps, check_logits)
            del model
            gc.collect()
        return self._reference

    def _torch_perplexity(self) -> float:
        """PyTorch's perplexity, loading the model again when reference() skipped it."""
        outputs = self.reference()
        if outputs.torch_perplexity is None:
            from appliance.export.llm.torch_reference import TorchReference

            self.progress.step("PyTorch reference: perplexity (the fp32 graph is not close enough to stand in)")
            model = TorchReference(self.hf_dir, self.context_length, threads=self.threads)
            outputs.torch_perplexity = model.perplexity(self.prose_ids)
            del model
            gc.collect()
        return outputs.torch_perplexity

    def record_perplexity(self, model_path: Path, perplexity: float) -> None:
        """A perplexity computed elsewhere on the same windows (the KV cache comparison), so
        the evaluation does not score the same graph twice."""
        self._perplexity_cache[model_path] = perplexity

    def evaluate(
        self, candidate: Path, reference: Path, spec: GenerationSpec, reference_spec: GenerationSpec
    ) -> tuple[dict[str, Any], float, str | None]:
        """(quality dict, loss, why the conversion is wrong or None) of the candidate graph;
        `reference` is the fp32 export (its own spec: an fp16 candidate has a half-precision KV
        cache, the reference does not)."""
        torch_outputs = self.reference()
        perplexity, run = self.score(candidate, spec, "candidate")
        reference_perplexity, reference_run = self.score(reference, reference_spec, "fp32 export")
        failure = self.conversion_failure(reference_run)
        if torch_outputs.torch_perplexity is None and failure is None and reference_run.logits_max_abs_diff <= STAND_IN_LOGITS_DIFF:
            basis, base = f"fp32 export (logits within {STAND_IN_LOGITS_DIFF:g} of PyTorch's)", reference_perplexity
        else:
            basis, base = "PyTorch", self._torch_perplexity()
        loss = max(0.0, perplexity / base - 1.0)
        quality: dict[str, Any] = {
            "perplexity": round(perplexity, 4),
            "reference_perplexity": round(reference_perplexity, 4),
            "torch_perplexity": None if torch_outputs.torch_perplexity is None else round(torch_outputs.torch_perplexity, 4),
            "perplexity_basis": basis,
            "perplexity_increase": round(loss, 5),
            **run.figures,
            "prose_tokens": len(self.prose_ids),
            "prompts": len(self.greedy_ids),
            "prompts_available": len(self.prompt_ids),
        }
        if candidate != reference:
            # The fp32 export's own faithfulness to PyTorch, so one report shows both.
            for key, value in reference_run.figures.items():
                quality[f"reference_{key}"] = value
        quality["conversion"] = "faithful to PyTorch" if failure is None else f"wrong: {failure}"
        return quality, loss, failure

    def conversion_failure(self, run: AgreementRun) -> str | None:
        """Why the fp32 graph does not compute what the PyTorch model computes, or None."""
        if run.logits_max_abs_diff > LOGITS_TOLERANCE:
            return f"its logits differ from PyTorch's by up to {run.logits_max_abs_diff:.3g} (tolerance {LOGITS_TOLERANCE})"
        gaps = self.reference().greedy_gaps
        wrong = [
            index for index, step in enumerate(run.divergences)
            if step is not None and gaps[index][step] >= TIE_MARGIN
        ]
        if wrong:
            return (
                f"its greedy continuation leaves PyTorch's on {len(wrong)} of {len(run.divergences)} prompts "
                f"where PyTorch's choice was clear (top two logits {TIE_MARGIN} or more apart)"
            )
        return None

    def score(self, model_path: Path, spec: GenerationSpec, label: str) -> tuple[float, AgreementRun]:
        """(perplexity, agreement with PyTorch) of one graph, computed once per graph and from
        one session: building a large graph's session takes tens of seconds, so perplexity
        and the greedy runs share it (and only one graph's session is alive at a time)."""
        perplexity, run = self._perplexity_cache.get(model_path), self._agreement_cache.get(model_path)
        if perplexity is None or run is None:
            decoder = OnnxDecoder(model_path, spec, self.threads)
            if perplexity is None:
                self.progress.step(f"ONNX {label}: perplexity")
                perplexity = self._perplexity_cache[model_path] = decoder.perplexity(self.prose_ids)
            if run is None:
                run = self._agreement_cache[model_path] = self._agreement(decoder, label)
        return perplexity, run

    def _agreement(self, decoder: OnnxDecoder, label: str) -> AgreementRun:
        """Greedy agreement (32 and 64 tokens) and logits max|diff| against PyTorch."""
        torch_outputs = self.reference()
        matches_32: list[float] = []
        matches_64: list[float] = []
        divergences: list[int | None] = []
        identical = 0
        for index, ids in enumerate(self.greedy_ids):
            self.progress.step(f"ONNX {label}: greedy {index + 1}/{len(self.greedy_ids)}")
            tokens = decoder.greedy(ids, GREEDY_CHECK_TOKENS)
            expected = torch_outputs.greedy[index]
            matches_32.append(prefix_match(tokens, expected, GREEDY_AGREEMENT_TOKENS) / GREEDY_AGREEMENT_TOKENS)
            full = prefix_match(tokens, expected, GREEDY_CHECK_TOKENS)
            matches_64.append(full / GREEDY_CHECK_TOKENS)
            identical += int(full == GREEDY_CHECK_TOKENS)
            divergences.append(None if full == GREEDY_CHECK_TOKENS else full)
        logits_diff = float(np.abs(decoder.logits(self.check_ids) - torch_outputs.check_logits).max())
        figures = {
            "greedy_agreement": round(float(np.mean(matches_32)), 4),
            "greedy_agreement_64": round(float(np.mean(matches_64)), 4),
            "greedy_identical_64": f"{identical}/{len(self.greedy_ids)}",
            "logits_max_abs_diff": float(f"{logits_diff:.3g}"),
        }
        return AgreementRun(figures, divergences, logits_diff)
