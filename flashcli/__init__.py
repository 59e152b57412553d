"""flashcli: run GGUF language models larger than DRAM by reading FFN neurons from SSD."""

# ggml runs each graph in an OpenMP parallel region; libgomp's default lets idle workers spin a
# while before they sleep. An earlier round set OMP_WAIT_POLICY=PASSIVE here (workers sleep at
# once), to leave the cores to reader threads. Measured on 2026-12-06 (the 1.5B at 50%, cold
# cache, 2 threads, the same text either way): passive waiting cost 25% of --batch --parallel 16
# (13.25 against 17.57 tok/s) and 35% of --draft auto (5.52 against 8.44), and gained 4% with
# --draft off (3.42 against 3.29), where the disk bounds the pass; it also slowed llama.cpp's
# reference in the benchmarks, which inherited it. So the policy is libgomp's (or the user's).

__version__ = "0.1.0"
