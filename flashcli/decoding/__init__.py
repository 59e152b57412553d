"""Decoding strategies: what turns a model into text, a token or many a pass.

What lives here: the loader that opens a file dense or flashed and picks a draft (loader),
sampling, one stream (generate), speculative decoding with its draft sources (speculative), many
sequences a pass and their input (batching, batch_drafting, batch_input), a conversation with its
KV cache kept across turns (chat), and perplexity.

May import: flashcli.errors, flashcli.arch, flashcli.engine and flashcli.flash; never cli.
"""
