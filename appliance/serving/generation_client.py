"""The GenerationClient of one loaded generation engine (see protocols.py for the contract).

Prompt work leaves the event loop when it is large: rendering and tokenising a multi-megabyte
prompt took seconds of the loop before (every other client, health probes included, waited).
Small prompts stay inline, where a thread hop would cost more than the work. A prompt whose
UTF-8 length alone proves it exceeds the context (more bytes than `context x the longest
token's bytes`) is refused before any of it is tokenised. Never imports the API layer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.errors import InvalidInput
from appliance.generation.engine import GenerationEngine
from appliance.generation.grammar import CompiledGrammar, Constraint
from appliance.generation.tool_calls import FunctionSpec, ToolCallFormat, detect_format, function_specs, special_token_ids, tool_format
from appliance.serving.protocols import GenerationModelInfo, GenerationRequest, SequenceStream

#: Prompt text up to this many characters is rendered and tokenised on the event loop.
INLINE_PROMPT_CHARS = 16_384


class LocalGenerationClient:
    """A GenerationClient over a GenerationEngine in this process."""

    def __init__(self, engine: GenerationEngine, *, provider: str | None, tool_parser: str | None = None) -> None:
        """`tool_parser`: the format the settings name; None recognises it from the template."""
        self.engine = engine
        self._tool_format = tool_format(tool_parser or detect_format(engine.manifest.chat_template))
        #: The tokenizer's special tokens, which tool-call markers must be named by (read on first use).
        self._special_tokens: dict[str, int] | None = None
        self._info = GenerationModelInfo(
            name=engine.name,
            version=engine.manifest.version,
            context_length=engine.context_length,
            vocab_size=engine.spec.vocab_size,
            max_tokens_limit=engine.settings.max_tokens_limit,
            has_chat_template=engine.chat_template is not None,
            tool_parser=self._tool_format.name,
            provider=provider,
        )
        self._byte_limit = engine.context_length * engine.tokenizer.max_bytes_per_token

    def describe(self) -> GenerationModelInfo:
        return self._info

    async def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]:
        template = self.engine.chat_template
        if template is None:
            raise InvalidInput(f"model: {self._info.name!r} has no chat template; use /v1/completions", field="model")
        if tools and not template.mentions_tools:
            messages = self._with_tools_described(messages, tools)
            tools = None
        size = sum(len(str(message.get("content") or "").encode("utf-8")) + len(str(message.get("tool_calls") or "")) for message in messages)
        size += len(str(tools or ""))
        self._refuse_unfittable(size, "messages")

        def render_and_encode() -> list[int]:
            return self.engine.tokenizer.encode_many([template.render(messages, tools=tools)])[0]

        if size <= INLINE_PROMPT_CHARS:
            return self.engine.tokenizer.encode(template.render(messages, tools=tools), special_text=True)
        return await asyncio.to_thread(render_and_encode)

    def _with_tools_described(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A template without a tools section learns the tools from a system message in the
        model's tool-call format (joined to the conversation's own system message, if any)."""
        description = self._tool_format.describe_tools(function_specs(tools))
        if messages and messages[0].get("role") == "system":
            first = dict(messages[0])
            first["content"] = f"{first.get('content') or ''}\n\n{description}".strip()
            return [first, *messages[1:]]
        return [{"role": "system", "content": description}, *messages]

    async def compile(self, constraint: Constraint) -> CompiledGrammar:
        return await self.engine.compile(constraint)

    def tool_format(self) -> ToolCallFormat:
        return self._tool_format

    def tool_grammar(self, functions: list[FunctionSpec], *, parallel: bool, auto: bool = False) -> str | None:
        if self._special_tokens is None:
            self._special_tokens = special_token_ids(self.engine.tokenizer.json_text())
        if auto:
            return self._tool_format.auto_grammar(functions, parallel=parallel, special_tokens=self._special_tokens)
        return self._tool_format.grammar(functions, parallel=parallel, special_tokens=self._special_tokens)

    async def text_prompts(self, texts: list[str]) -> list[list[int]]:
        for position, text in enumerate(texts):
            self._refuse_unfittable(len(text.encode("utf-8")), "prompt", f"prompt[{position}]" if len(texts) > 1 else "prompt")
        if sum(len(text) for text in texts) <= INLINE_PROMPT_CHARS:
            return [self.engine.tokenizer.encode(text, special_text=False) for text in texts]
        return await asyncio.to_thread(self.engine.tokenizer.encode_many, texts)

    def _refuse_unfittable(self, size_bytes: int, field: str, label: str | None = None) -> None:
        if size_bytes > self._byte_limit:
            raise InvalidInput(
                f"{label or field}: {size_bytes} bytes of text cannot fit this model's context of "
                f"{self._info.context_length} tokens",
                field=field,
            )

    def submit(
        self, prompt_ids: list[int], request: GenerationRequest, *, timeout_s: float, queue_limit: bool = True
    ) -> SequenceStream:
        return self.engine.generate(prompt_ids, request, timeout_s=timeout_s, queue_limit=queue_limit)

    def abort(self, seq_id: str) -> None:
        self.engine.abort(seq_id)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        return self.engine.tokenizer.token_text(token_id)

