"""The evaluation data the project ships for decoders, and how prompts become token ids.

`prose.txt` is held-out English prose written for this project (no model saw it in training)
for perplexity; `prompts.jsonl` is a fixed chat prompt set, three of them grounded in a given
~300-token passage (extract, rewrite, answer), for greedy agreement. Prompts are rendered with
the model's own chat template in a jinja2 sandbox, as the server renders them, and tokenised
with the exported tokenizer.json, so the evaluation sees exactly the ids the server will.

Never imports torch or transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ExportError

PROSE_FILE = "prose.txt"
PROMPTS_FILE = "prompts.jsonl"


@dataclass(frozen=True)
class ChatPrompt:
    """One line of prompts.jsonl."""

    id: str
    kind: str
    messages: list[dict[str, str]]


def load_prose(data_dir: Path) -> str:
    return (data_dir / PROSE_FILE).read_text(encoding="utf-8")


def load_prompts(data_dir: Path) -> list[ChatPrompt]:
    prompts: list[ChatPrompt] = []
    for line in (data_dir / PROMPTS_FILE).read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            prompts.append(ChatPrompt(id=entry["id"], kind=entry.get("kind", "chat"), messages=entry["messages"]))
    return prompts


def render_chat(template: str | None, messages: list[dict[str, str]], special: dict[str, Any]) -> str:
    """The prompt text for `messages` with the generation prompt appended.

    Without a template (a base model), the messages' contents are joined with blank lines.
    """
    if template is None:
        return "\n\n".join(message["content"] for message in messages)
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as exc:
        raise ExportError(f"chat_template: cannot render the prompt set: {exc}", field="chat_template") from None


class TokenizerFile:
    """The exported tokenizer.json, tokenising as the server will."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def adds_bos(self, bos_token_id: int | None) -> bool:
        """Whether plain encoding starts with BOS (what TokenizerSpec.add_bos_token records)."""
        ids = self.encode("a")
        return bos_token_id is not None and bool(ids) and ids[0] == bos_token_id

    def adds_eos(self, eos_token_id: int | None) -> bool:
        ids = self.encode("a")
        return eos_token_id is not None and bool(ids) and ids[-1] == eos_token_id

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; the post-processor adds BOS exactly when add_bos_token says so.

        Chat-rendered text is encoded with add_special_tokens=False (as transformers'
        apply_chat_template does): the template writes every special token it wants itself.
        """
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
