"""OpenAI-compatible text generation: `POST /v1/chat/completions` and `POST /v1/completions`.

A route leases the model from the ModelService (loading it if needed), has its
GenerationClient render the chat template (with the tools, tool_calling.py) and tokenise and
compile the output constraint (structured.py), turns OpenAI's fields into one
GenerationRequest per choice (checked once, by the engine, with errors naming the field as
the client sent it), submits every choice before answering (so a full queue or an impossible
length is a 4xx, not a broken stream), then either collects the events or streams them as
server-sent events ending with `data: [DONE]`; a stream holds the lease until it ends, so its
model is never evicted under it. A client that goes away cancels the waiting task; closing the
streams aborts the sequences, freeing their KV at the engine's next step. Never imports the
engines.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from appliance.api.deps import CtxDep, InferKeyDep, ModelsDep, key_priority
from appliance.api.errors import error_body
from appliance.api.inference import until_disconnect
from appliance.api.openai_chat_schemas import (
    MAX_PROMPTS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    dump,
)
from appliance.api.openai_schemas import OpenAIError
from appliance.api.structured import requested_constraint
from appliance.api.tool_calling import ToolPlan, ToolStream, calls_message, plan_tools
from appliance.errors import ApplianceError, DeadlineExceeded, InvalidInput
from appliance.serving.tasks import Route
from appliance.serving.keep_alive import parse_keep_alive
from appliance.serving.protocols import (
    ClientFields,
    CompiledGrammar,
    Constraint,
    GenerationClient,
    GenerationRequest,
    SequenceStream,
    TokenEvent,
    TokenLogprob,
)

router = APIRouter(tags=["openai"])
ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 403, 404, 413, 429, 503, 504)}
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream is true"}}


@dataclass
class _Choice:
    """What one choice has produced so far."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _request(
    body: ChatCompletionRequest | CompletionRequest,
    fields: ClientFields,
    *,
    max_tokens: int | None,
    logprobs: int,
    choice: int,
    grammar: CompiledGrammar | None,
    priority: int,
    keep_special_text: bool = False,
) -> GenerationRequest:
    """OpenAI's fields as one choice's GenerationRequest (checked by the engine, once)."""
    seed = body.seed
    if seed is not None:
        seed = (seed + choice) % (2**64)
    return GenerationRequest(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=seed,
        stop=_stop_list(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
        grammar=grammar,
        skip_special_tokens=not keep_special_text,
        priority=priority,
        fields=fields,
    )


def _submit_all(
    client: GenerationClient, prompts: list[list[int]], requests: list[GenerationRequest], timeout_s: float
) -> list[SequenceStream]:
    """Submit every choice; if one is refused, abort those already queued and re-raise.

    Only the first choice is subject to the queue-wait limit: the others queue right behind it
    and wait for their siblings' slots, which a request with more choices than the engine has
    slots must do however idle the engine is."""
    streams: list[SequenceStream] = []
    try:
        for index, (prompt, choice_request) in enumerate(zip(prompts, requests, strict=True)):
            streams.append(client.submit(prompt, choice_request, timeout_s=timeout_s, queue_limit=index == 0))
    except ApplianceError:
        for stream in streams:
            stream.close()
        raise
    return streams


async def _until_started(request: Request, streams: list[SequenceStream]) -> None:
    """Hold a streaming answer's 200 until its first choice has a slot: a request refused while
    it waited (capacity) then still gets its 429 with Retry-After, which clients retry, instead
    of a 200 whose stream ends in an error. (The other choices queue behind the first.)"""
    try:
        await until_disconnect(request, streams[0].started())
    except BaseException:
        for stream in streams:
            stream.close()
        raise


async def _merged(streams: list[SequenceStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of all choices as they come, tagged with the choice index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: SequenceStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((index, exc))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def _check_finish(event: TokenEvent) -> str | None:
    if event.finish_reason == "timeout":
        raise DeadlineExceeded("the request ran past its deadline; its sequence was stopped")
    if event.finish_reason in ("abort", "error"):
        raise ApplianceError(f"generation ended: {event.finish_reason}")
    return event.finish_reason


async def _collect(streams: list[SequenceStream]) -> list[_Choice]:
    choices = [_Choice(index) for index in range(len(streams))]
    try:
        async for index, event in _merged(streams):
            choice = choices[index]
            choice.text.append(event.text)
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
            if event.finish_reason is not None:
                choice.finish_reason = _check_finish(event)
                choice.prompt_tokens = event.prompt_tokens
                choice.completion_tokens = event.completion_tokens
                choice.cached_tokens = event.cached_prompt_tokens
    finally:
        for stream in streams:
            stream.close()
    return choices


def _usage(choices: list[_Choice], prompt_tokens: int) -> Usage:
    completion = sum(choice.completion_tokens for choice in choices)
    cached = max((choice.cached_tokens for choice in choices), default=0)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details={"cached_tokens": cached},
    )


def _chat_logprobs(client: GenerationClient, entries: list[TokenLogprob]) -> ChoiceLogprobs:
    text = client.token_text
    content: list[TokenLogprobEntry] = []
    for entry in entries:
        token, raw = text(entry.token_id)
        top = [TopLogprob(token=text(t)[0], logprob=lp, bytes=text(t)[1]) for t, lp in entry.top]
        content.append(TokenLogprobEntry(token=token, logprob=entry.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


#: Characters that JSON leaves raw but that common clients treat as line breaks: httpx's
#: `iter_lines` (and anything built on `str.splitlines`) splits an event at them, so a token that
#: decodes to one of them would cut its frame in two. Escaped, the JSON means the same.
_LINE_BREAKING = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse_frame(payload: dict[str, object]) -> bytes:
    """One `data:` frame: compact UTF-8 JSON on one line, whatever line splitting the client uses."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    for raw, escaped in _LINE_BREAKING.items():
        text = text.replace(raw, escaped)
    return b"data: " + text.encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _stream_error(path: str, exc: ApplianceError) -> bytes:
    return sse_frame(error_body(path, exc.status_code, exc.message, exc.field))


#: Proxies must pass server-sent events through as they are made, not buffer them.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _event_stream(events: Any) -> StreamingResponse:
    """A server-sent-events response over an async iterator of `data: ...` frames."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={**ERRORS, **STREAM_RESPONSE},
    summary="Chat completion (stream with server-sent events)",
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, ctx: CtxDep, models: ModelsDep, key: InferKeyDep
) -> ChatCompletion | StreamingResponse:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidInput("top_logprobs: requires logprobs to be true", field="top_logprobs")
    keep_alive = parse_keep_alive(body.keep_alive)
    constraint = requested_constraint(body)
    async with await models.lease(body.model, Route.CHAT, keep_alive_s=keep_alive) as lease:
        client: GenerationClient = lease.client
        plan = plan_tools(body, client)
        if constraint is not None and plan.parse:
            raise InvalidInput(
                "response_format: cannot be combined with tools unless tool_choice is \"none\"", field="response_format"
            )
        prompt_ids = await client.chat_prompt([m.as_template_dict() for m in body.messages], tools=plan.template_tools)
        grammar = await _compiled(client, constraint or plan.constraint)
        use_completion_name = body.max_completion_tokens is not None
        fields = ClientFields(
            prompt="messages", max_tokens="max_completion_tokens" if use_completion_name else "max_tokens", logprobs="top_logprobs"
        )
        max_tokens = body.max_completion_tokens if use_completion_name else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else -1
        requests = [
            _request(
                body, fields, max_tokens=max_tokens, logprobs=logprobs, choice=i, grammar=grammar,
                priority=key_priority(key), keep_special_text=plan.parse,
            )
            for i in range(body.n)
        ]
        streams = _submit_all(client, [prompt_ids] * body.n, requests, ctx.settings.request_timeout_s)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            await _until_started(request, streams)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _chat_events(
                request.url.path, client, body.model, completion_id, created, streams, len(prompt_ids), include_usage, plan
            )
            return _event_stream(lease.hold_until_done(events))
        choices = await until_disconnect(request, _collect(streams))
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[_chat_choice(client, choice, plan, with_logprobs=body.logprobs) for choice in choices],
        usage=_usage(choices, len(prompt_ids)),
    )


async def _compiled(client: GenerationClient, constraint: Constraint | None) -> CompiledGrammar | None:
    return await client.compile(constraint) if constraint is not None else None


def _chat_choice(client: GenerationClient, choice: _Choice, plan: ToolPlan, *, with_logprobs: bool) -> ChatChoice:
    """One finished choice; with tools, its text split into content and calls."""
    text = "".join(choice.text)
    finish = choice.finish_reason
    message = AssistantMessage(content=text)
    if plan.parse:
        content, calls = calls_message(client.tool_format(), text)
        if calls:
            message = AssistantMessage(content=content, tool_calls=calls)
            finish = "tool_calls" if finish == "stop" else finish
    return ChatChoice(
        index=choice.index,
        message=message,
        logprobs=_chat_logprobs(client, choice.logprobs) if with_logprobs else None,
        finish_reason=finish,  # type: ignore[arg-type]
    )


async def _chat_events(
    path: str,
    client: GenerationClient,
    model: str,
    completion_id: str,
    created: int,
    streams: list[SequenceStream],
    prompt_tokens: int,
    include_usage: bool,
    plan: ToolPlan,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        payload = dump(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, usage=usage))
        if not include_usage:
            payload.pop("usage", None)
        return sse_frame(payload)

    choices = [_Choice(index) for index in range(len(streams))]
    tool_streams = [ToolStream(client.tool_format()) if plan.parse else None for _ in streams]
    try:
        for choice in choices:
            yield chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content=""))])
        async for index, event in _merged(streams):
            choice = choices[index]
            finish = None
            if event.finish_reason is not None:
                finish = _check_finish(event)
                choice.completion_tokens = event.completion_tokens
                choice.cached_tokens = event.cached_prompt_tokens
            logprobs = _chat_logprobs(client, event.logprobs) if event.logprobs else None
            text, calls = event.text, []
            tools = tool_streams[index]
            if tools is not None:
                text, calls = tools.push(event.text)
                if finish is not None:
                    rest, more = tools.finish()
                    text, calls = text + rest, calls + more
                    if tools.made_calls and finish == "stop":
                        finish = "tool_calls"
            if text or calls or logprobs is not None or finish is not None:
                delta = ChatDelta(content=text or None, tool_calls=calls or None)
                yield chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])  # type: ignore[arg-type]
        if include_usage:
            yield chunk([], _usage(choices, prompt_tokens))
    except ApplianceError as exc:
        yield _stream_error(path, exc)
    finally:
        for stream in streams:
            stream.close()
    yield SSE_DONE


async def _completion_prompts(client: GenerationClient, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Token ids of each prompt (texts tokenised by the model; ids are checked by the engine)."""
    if isinstance(prompt, str):
        return await client.text_prompts([prompt])
    if not prompt:
        raise InvalidInput("prompt: must not be empty", field="prompt")
    if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
        raise InvalidInput(f"prompt: at most {MAX_PROMPTS} prompts per request", field="prompt")
    if isinstance(prompt[0], str):
        return await client.text_prompts(list(prompt))  # type: ignore[arg-type]
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    return [list(item) for item in prompt]  # type: ignore[union-attr]


def _completion_logprobs(client: GenerationClient, entries: list[TokenLogprob], start_offset: int = 0) -> CompletionLogprobs:
    tokens: list[str] = []
    offsets: list[int] = []
    offset = start_offset
    for entry in entries:
        token = client.token_text(entry.token_id)[0]
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[{client.token_text(t)[0]: lp for t, lp in entry.top} for entry in entries],
        text_offset=offsets,
    )


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={**ERRORS, **STREAM_RESPONSE},
    summary="Text completion (stream with server-sent events)",
)
async def completions(
    body: CompletionRequest, request: Request, ctx: CtxDep, models: ModelsDep, key: InferKeyDep
) -> Completion | StreamingResponse:
    if body.echo:
        raise InvalidInput("echo: is not supported", field="echo")
    if body.suffix:
        raise InvalidInput("suffix: is not supported", field="suffix")
    keep_alive = parse_keep_alive(body.keep_alive)
    constraint = requested_constraint(body)
    async with await models.lease(body.model, Route.COMPLETIONS, keep_alive_s=keep_alive) as lease:
        client: GenerationClient = lease.client
        prompts = await _completion_prompts(client, body.prompt)
        grammar = await _compiled(client, constraint)
        logprobs = body.logprobs if body.logprobs is not None else -1
        all_prompts: list[list[int]] = []
        requests: list[GenerationRequest] = []
        for position, prompt_ids in enumerate(prompts):
            fields = ClientFields(
                prompt="prompt", prompt_label=f"prompt[{position}]" if len(prompts) > 1 else None, logprobs="logprobs"
            )
            for choice in range(body.n):
                all_prompts.append(prompt_ids)
                requests.append(
                    _request(
                        body, fields, max_tokens=body.max_tokens, logprobs=logprobs, choice=choice, grammar=grammar,
                        priority=key_priority(key),
                    )
                )
        streams = _submit_all(client, all_prompts, requests, ctx.settings.request_timeout_s)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            await _until_started(request, streams)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _completion_events(
                request.url.path, client, body.model, completion_id, created, streams, prompt_tokens, include_usage, logprobs >= 0
            )
            return _event_stream(lease.hold_until_done(events))
        choices = await until_disconnect(request, _collect(streams))
    return Completion(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                index=choice.index,
                text="".join(choice.text),
                logprobs=_completion_logprobs(client, choice.logprobs) if logprobs >= 0 else None,
                finish_reason=choice.finish_reason,  # type: ignore[arg-type]
            )
            for choice in choices
        ],
        usage=_usage(choices, prompt_tokens),
    )


async def _completion_events(
    path: str,
    client: GenerationClient,
    model: str,
    completion_id: str,
    created: int,
    streams: list[SequenceStream],
    prompt_tokens: int,
    include_usage: bool,
    with_logprobs: bool,
) -> AsyncIterator[bytes]:
    choices = [_Choice(index) for index in range(len(streams))]
    try:
        async for index, event in _merged(streams):
            choice = choices[index]
            finish = None
            if event.finish_reason is not None:
                finish = _check_finish(event)
                choice.completion_tokens = event.completion_tokens
            if event.text or finish is not None or (with_logprobs and event.logprobs):
                logprobs = _completion_logprobs(client, event.logprobs or []) if with_logprobs else None
                payload = dump(
                    Completion(
                        id=completion_id,
                        created=created,
                        model=model,
                        choices=[CompletionChoice(index=index, text=event.text, logprobs=logprobs, finish_reason=finish)],  # type: ignore[arg-type]
                    )
                )
                payload.pop("usage", None)
                yield sse_frame(payload)
        if include_usage:
            payload = dump(Completion(id=completion_id, created=created, model=model, choices=[], usage=_usage(choices, prompt_tokens)))
            yield sse_frame(payload)
    except ApplianceError as exc:
        yield _stream_error(path, exc)
    finally:
        for stream in streams:
            stream.close()
    yield SSE_DONE
