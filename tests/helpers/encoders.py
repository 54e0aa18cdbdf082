"""Tiny random BERT-like Hugging Face folders for export tests, built with transformers.

Real folders (config.json, model.safetensors, tokenizer files, sentence-transformers module
files) that go through the same code path as a downloaded model, only small enough to export
in a second or two. Only tests import this (it imports torch and transformers).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

#: Small enough to export in about a second, big enough to have every BERT operator.
TINY_HIDDEN_SIZE = 32
TINY_LAYERS = 2
TINY_HEADS = 2
TINY_INTERMEDIATE = 64
TINY_MAX_POSITIONS = 128

_WORDS = (
    "the a an and of to in is it that was for on are with as be at by this have from or "
    "had not but what all were when we there can your which their said if do will each about "
    "how up out them then she many some so these would other into has more her two like him "
    "see time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know"
).split()


def _vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits] + list(_WORDS)
    return list(dict.fromkeys(tokens))


def _save_tokenizer(folder: Path, max_length: int) -> None:
    from transformers import BertTokenizerFast

    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))


def _config(**extra: object) -> "transformers.BertConfig":  # noqa: F821
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=TINY_HIDDEN_SIZE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        intermediate_size=TINY_INTERMEDIATE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        **extra,
    )


def build_tiny_encoder(folder: Path, *, pooling: str = "mean", normalize: bool = True, sentence_transformers: bool = True, seed: int = 0) -> Path:
    """A random BertModel folder; with sentence_transformers=True it also declares pooling
    (1_Pooling/config.json) and, when `normalize`, a Normalize module (modules.json)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = BertModel(_config())
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    _save_tokenizer(folder, TINY_MAX_POSITIONS)
    if sentence_transformers:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": TINY_HIDDEN_SIZE,
                    "pooling_mode_cls_token": pooling == "cls",
                    "pooling_mode_mean_tokens": pooling == "mean",
                    "pooling_mode_max_tokens": pooling == "max",
                    "pooling_mode_mean_sqrt_len_tokens": False,
                    "pooling_mode_lasttoken": pooling == "last",
                }
            )
        )
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return folder


def build_tiny_classifier(folder: Path, *, labels: tuple[str, ...] = ("negative", "positive"), seed: int = 0) -> Path:
    """A random BertForSequenceClassification folder with named labels."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    _save_tokenizer(folder, TINY_MAX_POSITIONS)
    return folder
