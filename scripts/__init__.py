"""Scripts that are run on purpose: fetching models, studies, benchmarks (not part of flashcli)."""
