"""llama.cpp through llama-cpp-python, as the bench's engines run it: the model, and its last logits."""

from __future__ import annotations

import numpy as np


def llama_model(path, n_ctx: int, threads: int, repack: bool, **llama_options):
    """llama.cpp through llama-cpp-python, memory-mapped; repack=False turns off its weight
    repacking (use_extra_bufts), which Llama() does not expose. llama_options go to Llama()
    (draft_model=...). Llama() asks llama_cpp.llama_cpp (the bindings module) for its defaults,
    not the package that re-exports them: patching the package's name left repacking on (until
    2026-12-06 the "memory-mapped" runs were repacked ones).
    """
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    from flashcli.engine.tokenizer import _quiet_stderr

    default = bindings.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = repack
        return p

    bindings.llama_model_default_params = params
    try:
        with _quiet_stderr():
            return llama_cpp.Llama(
                str(path),
                n_ctx=n_ctx,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                **llama_options,
            )
    finally:
        bindings.llama_model_default_params = default


def last_logits(llm) -> np.ndarray:
    """The last evaluated token's logits (llama-cpp-python keeps none without logits_all, which
    would hold n_ctx x vocab floats: too much for a memory limit)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
