"""Model families: what each does differently in the shared forward pass, one small file each.

The forward pass (model.py) is llama.cpp's decoder block with switches; an architecture sets
them. Adding a family that fits that block is one file here and one row in ARCHITECTURES;
what a family can set is architecture.py's Architecture.
"""

from __future__ import annotations

from .gemma3 import GEMMA3
from .llama import LLAMA
from .qwen2 import QWEN2
from .qwen2moe import QWEN2MOE
from .qwen3moe import QWEN3MOE

ARCHITECTURES = {a.name: a for a in (LLAMA, QWEN2, GEMMA3, QWEN3MOE, QWEN2MOE)}
