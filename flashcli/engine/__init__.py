"""The engine: a GGUF model's forward pass on ggml's own kernels, op for op as llama.cpp's.

What lives here: the GGUF reader and the converted file's format (gguf_file, bundles), the
ctypes bindings to the ggml that llama-cpp-python ships and a graph runner (ggml_bindings, ggml,
kernels, repack), the weight types it runs and resident weights (weight_types, weights), the
model's configuration and tokenizer (config, tokenizer), the decoder block, a MoE FFN and the
output head (layers, moe, output_head, model), the run state (decode_state) and the GPU backend
(gpu). Nothing here knows about budgets or disks beyond "a matrix arrives in this buffer".

May import: flashcli.errors and flashcli.arch; never flash, decoding or cli.
"""
