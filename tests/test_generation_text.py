"""Chat templates in a sandbox, streaming detokenisation and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import InvalidInput, ModelRejected
from appliance.generation.chat_template import ChatTemplate
from appliance.generation.params import ClientFields, GenerationRequest, ModelLimits, resolve
from appliance.generation.text import PromptTokenizer, StopStringFilter
from tests.helpers.decoders import CHAT_TEMPLATE, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PromptTokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().save(str(path))
    return PromptTokenizer(path)


def test_chat_template_renders_messages_with_the_generation_prompt() -> None:
    template = ChatTemplate(CHAT_TEMPLATE, bos_token=None, eos_token="<|im_end|>")
    text = template.render([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_cannot_reach_python_internals() -> None:
    hostile = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", bos_token=None, eos_token=None)
    with pytest.raises(InvalidInput) as caught:
        hostile.render([{"role": "user", "content": "hi"}])
    assert caught.value.field == "messages"


def test_template_raise_exception_becomes_a_400_naming_messages() -> None:
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}", bos_token=None, eos_token=None)
    with pytest.raises(InvalidInput, match="first must be user"):
        strict.render([{"role": "assistant", "content": "x"}])


def test_broken_template_is_refused_when_the_model_loads() -> None:
    with pytest.raises(ModelRejected):
        ChatTemplate("{% for %}", bos_token=None, eos_token=None)


def test_empty_messages_and_unknown_roles_are_refused() -> None:
    template = ChatTemplate(CHAT_TEMPLATE, bos_token=None, eos_token=None)
    with pytest.raises(InvalidInput) as empty:
        template.render([])
    assert empty.value.field == "messages"
    with pytest.raises(InvalidInput) as role:
        template.render([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    assert role.value.field == "messages[1].role"


def test_special_token_text_in_a_rendered_prompt_becomes_special_ids(tokenizer: PromptTokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhello<|im_end|>", special_text=True)
    assert ids[0] == 1 and ids[-1] == 2


def test_streaming_detokeniser_emits_whole_characters_only(tokenizer: PromptTokenizer) -> None:
    text = "naïve café – 日本"
    ids = tokenizer.encode(text, special_text=False)
    stream = tokenizer.stream()
    pieces = [stream.step(token) for token in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_token_bytes_join_to_the_text(tokenizer: PromptTokenizer) -> None:
    text = "café 日本 ok"
    ids = tokenizer.encode(text, special_text=False)
    assert b"".join(bytes(tokenizer.token_text(token)[1]) for token in ids) == text.encode("utf-8")


def test_stop_filter_holds_back_a_possible_stop_and_drops_it() -> None:
    stops = StopStringFilter(["</end>"])
    assert stops.push("Hello </") == ("Hello ", False)
    assert stops.push("en") == ("", False)
    assert stops.push("d> more") == ("", True)
    released = StopStringFilter(["</end>"])
    assert released.push("a </e") == ("a ", False)
    assert released.push("x") == ("</ex", False)
    assert released.flush() == ""


def test_stop_filter_flushes_held_text_at_the_end() -> None:
    stops = StopStringFilter(["STOP"])
    assert stops.push("abc ST") == ("abc ", False)
    assert stops.flush() == "ST"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 21}, "top_logprobs"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (400,)}, "stop_token_ids"),
    ],
)
def test_sampling_params_out_of_range_name_the_field(change: dict[str, object], field: str) -> None:
    request = GenerationRequest(**{"max_tokens": 10, **change})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as caught:
        resolve(request, [1, 2, 3], LIMITS)
    assert caught.value.field == field


LIMITS = ModelLimits(context_length=256, vocab_size=320, max_tokens_limit=4096, kv_limit_tokens=200, kv_detail="(KV budget 200 tokens)")


def test_errors_name_the_fields_the_client_sent() -> None:
    fields = ClientFields(prompt="messages", max_tokens="max_completion_tokens")
    with pytest.raises(InvalidInput) as too_long:
        resolve(GenerationRequest(max_tokens=250, fields=fields), [1, 2, 3], LIMITS)
    assert too_long.value.field == "max_completion_tokens" and "max_completion_tokens:" in too_long.value.message
    with pytest.raises(InvalidInput) as kv:
        resolve(GenerationRequest(max_tokens=199, fields=fields), [1, 2, 3], LIMITS)
    assert kv.value.field == "max_completion_tokens" and "KV budget 200 tokens" in kv.value.message
    with pytest.raises(InvalidInput) as prompt:
        resolve(GenerationRequest(fields=fields), [1] * 256, LIMITS)
    assert prompt.value.field == "messages"
    with pytest.raises(InvalidInput) as ids:
        resolve(GenerationRequest(fields=ClientFields(prompt="prompt", prompt_label="prompt[2]")), [1, 999], LIMITS)
    assert ids.value.field == "prompt" and ids.value.message.startswith("prompt[2]:")


def test_defaults_come_from_the_model_and_max_tokens_fits_what_the_kv_budget_holds() -> None:
    limits = ModelLimits(context_length=256, vocab_size=320, max_tokens_limit=4096, kv_limit_tokens=100, defaults={"temperature": 0.3})
    params = resolve(GenerationRequest(), [1] * 40, limits)
    assert params.temperature == 0.3 and params.top_p == 1.0
    assert params.max_tokens == 60, "no max_tokens asked: as many as the KV budget holds beside the prompt"


def test_missing_tokenizer_file_is_a_model_rejection(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected):
        PromptTokenizer(tmp_path / "tokenizer.json")
