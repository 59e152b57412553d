"""Tokenizer, detokenizer and chat template, taken from llama.cpp (vocab-only load, quiet)."""

from __future__ import annotations

import codecs
import contextlib
import os

from ..errors import BadModelFile


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to fd 2 while loading; keep our stderr for our own messages."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class Tokenizer:
    def __init__(self, path):
        import llama_cpp

        try:
            with _quiet_stderr():
                self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except Exception as e:
            raise BadModelFile(f"{path}: llama.cpp could not load the tokenizer ({e})") from None
        self._vocab = self._llama._model.vocab
        self._lib = llama_cpp
        self.metadata = self._llama.metadata
        self.n_vocab = self._llama.n_vocab()
        self.bos_token_id = self._llama.token_bos()
        self.eos_token_id = self._llama.token_eos()
        self.add_bos = self._llama._model.add_bos_token()

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add, special=special)

    def decode(self, tokens) -> str:
        return self._llama.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self._llama.detokenize([token])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def apply_chat_template(self, messages: str | list[dict]) -> str:
        """The model's chat template over a conversation: a list of {"role", "content"} (roles
        system, user, assistant), or a str for one user message; it ends with the assistant's
        turn opened. One renderer for `generate --chat` and `chat`, so that a conversation's
        prompt is the one a single run on its whole history reads."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            return self._builtin_chat_template(messages)
        eos = self.decode([self.eos_token_id]) if self.eos_token_id >= 0 else ""
        bos = self.decode([self.bos_token_id]) if self.bos_token_id >= 0 else ""
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        return formatter(messages=messages).prompt

    def _builtin_chat_template(self, messages: list[dict]) -> str:
        """llama.cpp's built-in template for the model's family (Gemma files often carry none)."""
        import ctypes

        from ..arch import ARCHITECTURES

        family = ARCHITECTURES.get(self.metadata.get("general.architecture"))
        name = family.chat_template if family else None
        if name is None:
            raise BadModelFile("the model has no chat template (tokenizer.chat_template); drop --chat")
        lib = self._lib
        encoded = [(m["role"].encode("utf-8"), m["content"].encode("utf-8")) for m in messages]
        msgs = (lib.llama_chat_message * len(encoded))(*(lib.llama_chat_message(r, c) for r, c in encoded))
        size = 4 * sum(len(c) for _, c in encoded) + 256 * len(encoded)
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_chat_apply_template(name.encode(), msgs, len(encoded), True, buf, size)
        if n < 0 or n > size:
            raise BadModelFile(f"llama.cpp could not apply its built-in {name!r} chat template")
        return buf.raw[:n].decode("utf-8")


class StreamDecoder:
    """Turns tokens into text pieces as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
