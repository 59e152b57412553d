"""The flash machinery: a model under a DRAM budget, what the budget does not hold read from disk.

What lives here: the plan and its parts (budget, budget_parts, measured, memory), the readers
(io_backends: O_DIRECT reads overlapped with compute), rows streamed through a read-ahead ring
(weight_stream, streaming), bundles of neurons with their predictor and caches (predictor,
neuron_cache, ffn_neurons), experts read whole into caches sharing pools of slots (expert_slots, expert_cache, expert_ffn),
and the builder that puts one of these under a model (flash_model).

May import: flashcli.errors, flashcli.arch and flashcli.engine; never decoding or cli.
"""
