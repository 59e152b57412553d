"""A real tokenizer for a made model: the vocabulary, merges, special tokens and chat template
of a model the project fetches (scripts/fetch_model.py), fitted to the shape's vocabulary size.

Larger than the source: padded with unused tokens ([PAD<id>], as converters pad a model's
vocabulary to its embedding rows). Smaller: cut, keeping every special, byte and user-defined
token (renumbered, in their order) and the first ordinary tokens, and only the merges whose two
parts and result are kept, so that tokenizing still works. What was done is recorded in the
file's metadata (flashcli.maker.vocab_*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL_IDS = ("bos", "eos", "unknown", "padding", "seperator")  # gguf's spelling of "separator"
_FLAGS = ("add_bos_token", "add_eos_token", "add_space_prefix", "add_sep_token")
_UNUSED_CONTROL = re.compile(r"<unused\d+>")  # gemma's thousands of placeholder control tokens


@dataclass(frozen=True)
class SourceVocab:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (sentencepiece)
    pre: str | None
    tokens: list
    types: list
    scores: list | None
    merges: list | None
    special_ids: dict  # "bos" -> id, ...
    flags: dict  # "add_bos_token" -> bool, ...
    chat_template: str | None


@lru_cache(maxsize=4)
def read_vocab(path: str) -> SourceVocab:
    from flashcli.engine.gguf_file import GGUFFile

    fields = GGUFFile(path).metadata

    def value(key):
        v = fields.get(key)
        return list(v) if v is not None and not isinstance(v, (str, int, float, bool)) else v

    return SourceVocab(
        model=value("tokenizer.ggml.model"),
        pre=value("tokenizer.ggml.pre"),
        tokens=value("tokenizer.ggml.tokens"),
        types=value("tokenizer.ggml.token_type"),
        scores=value("tokenizer.ggml.scores"),
        merges=value("tokenizer.ggml.merges"),
        special_ids={
            k: value(f"tokenizer.ggml.{k}_token_id") for k in _SPECIAL_IDS if f"tokenizer.ggml.{k}_token_id" in fields
        },
        flags={k: value(f"tokenizer.ggml.{k}") for k in _FLAGS if f"tokenizer.ggml.{k}" in fields},
        chat_template=value("tokenizer.chat_template"),
    )


def _byte_level_alphabet() -> set:
    """The 256 one-character tokens a byte-level BPE spells every byte with (GPT-2's mapping
    of bytes to printable characters): a cut vocabulary must keep them all."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return set(chars)


def _sentencepiece_alphabet() -> set:
    """The one-character pieces a cut sentencepiece vocabulary keeps: ASCII and the word
    boundary. Gemma's vocabulary lists single characters last, and a text whose space or digit
    falls back to byte tokens decodes as those bytes (a raw "▁"), not as a space."""
    return {chr(c) for c in range(128)} | {"▁"}


def _kept_ids(src: SourceVocab, n_vocab: int) -> list:
    """The source ids a cut vocabulary of n_vocab keeps, in source order."""
    alphabet = _byte_level_alphabet() if src.model == "gpt2" else _sentencepiece_alphabet()
    must, ordinary, placeholders = set(src.special_ids.values()), [], []
    for i, (text, kind) in enumerate(zip(src.tokens, src.types)):
        if kind == UNUSED or (kind == CONTROL and _UNUSED_CONTROL.fullmatch(text)):
            placeholders.append(i)
        elif kind in (CONTROL, USER_DEFINED, BYTE, UNKNOWN) or text in alphabet:
            must.add(i)
        else:
            ordinary.append(i)
    room = n_vocab - len(must)
    if room < 0:
        raise ValueError(f"a vocabulary of {n_vocab} cannot hold the {len(must)} special and byte tokens of the source")
    # ordinary tokens in source order (BPE merge rank, sentencepiece score), then placeholders
    return sorted(must | set((ordinary + placeholders)[:room]))


def fit_vocab(src: SourceVocab, n_vocab: int) -> tuple[dict, dict]:
    """(tokenizer metadata for the made file, flashcli.maker.vocab_* metadata)."""
    n_src = len(src.tokens)
    tokens, types = list(src.tokens), list(src.types)
    scores = list(src.scores) if src.scores is not None else None
    merges = list(src.merges) if src.merges is not None else None
    special_ids = dict(src.special_ids)
    if n_vocab >= n_src:
        fit = "as is" if n_vocab == n_src else "padded"
        tokens += [f"[PAD{i}]" for i in range(n_src, n_vocab)]
        types += [UNUSED] * (n_vocab - n_src)
        if scores is not None:
            scores += [-1000.0] * (n_vocab - n_src)
    else:
        fit = "cut"
        kept = _kept_ids(src, n_vocab)
        new_id = {old: new for new, old in enumerate(kept)}
        tokens = [src.tokens[i] for i in kept]
        types = [src.types[i] for i in kept]
        scores = [scores[i] for i in kept] if scores is not None else None
        if merges is not None:
            texts = set(tokens)
            merges = [m for m in merges if _merge_kept(m, texts)]
        special_ids = {k: new_id[v] for k, v in special_ids.items()}

    meta = {"tokenizer.ggml.model": src.model}
    if src.pre is not None:
        meta["tokenizer.ggml.pre"] = src.pre
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    if scores is not None:
        meta["tokenizer.ggml.scores"] = [float(x) for x in scores]
    if merges is not None:
        meta["tokenizer.ggml.merges"] = merges
    for k, v in special_ids.items():
        meta[f"tokenizer.ggml.{k}_token_id"] = int(v)
    for k, v in src.flags.items():
        meta[f"tokenizer.ggml.{k}"] = bool(v)
    if src.chat_template is not None:
        meta["tokenizer.chat_template"] = src.chat_template
    record = {
        "flashcli.maker.vocab_source_tokens": n_src,
        "flashcli.maker.vocab_fit": fit,
        "flashcli.maker.vocab_tokens_changed": abs(n_vocab - n_src),
    }
    return meta, record


def _merge_kept(merge: str, texts: set) -> bool:
    left, _, right = merge.partition(" ")
    return left in texts and right in texts and left + right in texts
