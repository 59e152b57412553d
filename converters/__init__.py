"""flashcli's offline side: a llama.cpp GGUF -> a flash GGUF (bundled FFN neurons, predictors,
calibration statistics). Generation (flashcli/) never imports this package; both read GGUF
files and the bundle format through flashcli.gguf_file and flashcli.bundles."""
