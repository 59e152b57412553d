"""flashcli: run GGUF language models larger than DRAM by reading FFN neurons from SSD."""

import os

# ggml runs each graph in an OpenMP parallel region. By default OpenMP's idle workers spin after
# a region; flash generation runs dozens of small graphs a token with reader threads (reads,
# repacking) between them, and spinning workers took the cores those threads need (measured:
# 2.1 s of CPU a token on the 1.5B at half its size, 0.42 s with passive waiting; BENCHMARKS.md).
# libgomp reads this when it loads, so it is set before llama.cpp's libraries are.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
