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
        write_sentence_transformers_files(folder, pooling=pooling, normalize=normalize, dimension=TINY_HIDDEN_SIZE)
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


# -- one tiny model per encoder family -------------------------------------------------------
#: The encoder families the embedding export claims, as the tests build them: model type -> the
#: pooling and normalisation their sentence-transformers files declare in the family tests
#: (chosen so every pooling mode is exercised by some family).
FAMILY_POOLING: dict[str, tuple[str, bool]] = {
    "bert": ("mean", True),  # all-MiniLM / bge-small-en style
    "xlm-roberta": ("cls", True),  # bge-m3 style (multilingual e5 uses mean)
    "distilbert": ("last", False),
    "mpnet": ("mean", True),  # all-mpnet-base-v2 style
    "modernbert": ("max", True),
    "roberta": ("mean", True),  # all-distilroberta-v1 style
    "camembert": ("mean", True),
    "electra": ("cls", False),
    "albert": ("mean", True),  # paraphrase-albert-small-v2 style
}
#: Weight init std of the family models (see _family_model).
FAMILY_INIT_RANGE = 0.2
#: Corpus the BPE and Unigram tokenizers are trained on (words of the shipped sentences too,
#: so the export's evaluation text is not all unknown tokens).
_CORPUS_EXTRA = (
    "The train to the airport leaves every twenty minutes from platform four. "
    "She forgot her umbrella and got soaked walking home from the office. "
    "Preheat the oven before you put the bread in. A man is playing a guitar. "
    "Der Zug fährt um acht Uhr. Le chat dort sur le canapé. El perro come carne."
)
#: Special tokens (in id order) and the single / pair templates of each tokenizer kind.
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_ROBERTA_TEMPLATE = ("<s> $A </s>", "<s> $A </s> </s> $B </s>")
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BERT_TEMPLATE = ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1")


def write_sentence_transformers_files(folder: Path, *, pooling: str, normalize: bool, dimension: int, max_seq_length: int = 64) -> None:
    """modules.json, 1_Pooling/config.json and sentence_bert_config.json as sentence-transformers
    writes them (Transformer -> Pooling [-> Normalize]), without depending on it."""
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
                "word_embedding_dimension": dimension,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": pooling == "last",
                "include_prompt": True,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))


def _corpus() -> list[str]:
    return [" ".join(_WORDS), _CORPUS_EXTRA, string.ascii_letters + string.digits + string.punctuation]


def _trained_tokenizer(kind: str, specials: list[str], template: tuple[str, str]) -> "tokenizers.Tokenizer":  # noqa: F821
    """A `tokenizers` model trained on the tiny corpus: "unigram" (sentencepiece-style, as
    XLM-RoBERTa, CamemBERT, ALBERT) or "bpe" (byte-level, as RoBERTa, ModernBERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    unk = next(token for token in specials if "unk" in token.lower())
    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token=unk, show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=unk))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
    tokenizer.train_from_iterator(_corpus(), trainer)
    used = {piece.split(":")[0] for piece in " ".join(template).split() if not piece.startswith("$")}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template[0], pair=template[1], special_tokens=[(token, tokenizer.token_to_id(token)) for token in sorted(used)]
    )
    return tokenizer


def _family_tokenizer(folder: Path, family: str, max_length: int) -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """The family's own kind of fast tokenizer over a tiny vocabulary."""
    import transformers

    if family in ("bert", "distilbert", "mpnet", "electra"):  # WordPiece over a vocab.txt
        vocab = _vocab()
        if family == "mpnet":  # MPNet's specials are <s> </s> <pad> <mask>, [UNK] stays
            vocab = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"] + [token for token in vocab if token not in _BERT_SPECIALS]
        vocab_file = folder / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        cls = {
            "bert": transformers.BertTokenizerFast,
            "distilbert": transformers.DistilBertTokenizerFast,
            "mpnet": transformers.MPNetTokenizerFast,
            "electra": transformers.ElectraTokenizerFast,
        }[family]
        return cls(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=max_length)
    if family in ("xlm-roberta", "camembert"):
        cls = transformers.XLMRobertaTokenizerFast if family == "xlm-roberta" else transformers.CamembertTokenizerFast
        return cls(tokenizer_object=_trained_tokenizer("unigram", _ROBERTA_SPECIALS, _ROBERTA_TEMPLATE), model_max_length=max_length)
    if family == "roberta":
        return transformers.RobertaTokenizerFast(
            tokenizer_object=_trained_tokenizer("bpe", _ROBERTA_SPECIALS, _ROBERTA_TEMPLATE), model_max_length=max_length
        )
    if family == "albert":
        return transformers.AlbertTokenizerFast(
            tokenizer_object=_trained_tokenizer("unigram", ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], _BERT_TEMPLATE),
            model_max_length=max_length,
        )
    if family == "modernbert":
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=_trained_tokenizer("bpe", ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], _BERT_TEMPLATE),
            model_max_length=max_length, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
            mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],
        )
    raise ValueError(f"no tiny tokenizer for encoder family {family!r}")


def _family_model(family: str, tokenizer: "transformers.PreTrainedTokenizerFast") -> "transformers.PreTrainedModel":  # noqa: F821
    """A random 2-layer base model of `family` sized to the tokenizer, special ids aligned."""
    import transformers

    pad = tokenizer.pad_token_id
    common: dict[str, object] = {
        "vocab_size": len(tokenizer), "pad_token_id": pad, "max_position_embeddings": TINY_MAX_POSITIONS,
        # Far above the usual 0.02: attention then mixes the tokens, so pooled vectors (CLS too)
        # depend on the whole text and a wrong token, mask or position shows.
        "initializer_range": FAMILY_INIT_RANGE,
    }
    sizes = {
        "hidden_size": TINY_HIDDEN_SIZE, "num_hidden_layers": TINY_LAYERS, "num_attention_heads": TINY_HEADS,
        "intermediate_size": TINY_INTERMEDIATE,
    }
    specials = {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    if family in ("xlm-roberta", "roberta", "camembert"):
        # RoBERTa positions start after the padding index: the table needs pad + 1 extra rows.
        common["max_position_embeddings"] = TINY_MAX_POSITIONS + pad + 1
    if family == "distilbert":
        config = transformers.DistilBertConfig(
            dim=TINY_HIDDEN_SIZE, n_layers=TINY_LAYERS, n_heads=TINY_HEADS, hidden_dim=TINY_INTERMEDIATE, **common
        )
        return transformers.DistilBertModel(config)
    if family == "modernbert":
        config = transformers.ModernBertConfig(
            **sizes, cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, **specials,
            # A short sliding window so the local-attention layer's mask matters on these sentences.
            global_attn_every_n_layers=2, local_attention=8, **common,
        )
        return transformers.ModernBertModel(config)
    if family == "albert":
        config = transformers.AlbertConfig(**sizes, embedding_size=16, **specials, **common)
        return transformers.AlbertModel(config)
    if family == "electra":
        return transformers.ElectraModel(transformers.ElectraConfig(**sizes, embedding_size=16, **common))
    model_class, config_class = {
        "bert": (transformers.BertModel, transformers.BertConfig),
        "mpnet": (transformers.MPNetModel, transformers.MPNetConfig),
        "xlm-roberta": (transformers.XLMRobertaModel, transformers.XLMRobertaConfig),
        "roberta": (transformers.RobertaModel, transformers.RobertaConfig),
        "camembert": (transformers.CamembertModel, transformers.CamembertConfig),
    }[family]
    extra = {} if family == "bert" else specials
    return model_class(config_class(**sizes, **extra, **common))


def build_tiny_family_encoder(
    folder: Path, family: str, *, pooling: str | None = None, normalize: bool | None = None, seed: int = 0
) -> Path:
    """A random base model of `family` (a FAMILY_POOLING key) with its own kind of
    tokenizer.json and sentence-transformers files declaring `pooling` and `normalize`
    (FAMILY_POOLING's choice for the family when not given)."""
    import torch

    default_pooling, default_normalize = FAMILY_POOLING[family]
    pooling = default_pooling if pooling is None else pooling
    normalize = default_normalize if normalize is None else normalize
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _family_tokenizer(folder, family, TINY_MAX_POSITIONS)
    model = _family_model(family, tokenizer)
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    write_sentence_transformers_files(folder, pooling=pooling, normalize=normalize, dimension=TINY_HIDDEN_SIZE)
    return folder
