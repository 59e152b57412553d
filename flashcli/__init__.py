"""flashcli: run GGUF language models larger than DRAM by reading FFN neurons from SSD."""

__version__ = "0.1.0"
