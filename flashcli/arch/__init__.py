"""Model families: what each does differently in the shared forward pass, one small file each.

The forward pass (flashcli/engine/model.py) is llama.cpp's decoder block with switches; an
architecture sets them. Adding a family that fits that block is one file here and one row in
ARCHITECTURES; what a family can set is architecture.py's Architecture.

May import: flashcli.errors only (the families are data).
"""

from __future__ import annotations

from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .granite import GRANITE
from .llama import LLAMA
from .olmo2 import OLMO2
from .olmoe import OLMOE
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen2moe import QWEN2MOE
from .qwen3 import QWEN3
from .qwen3moe import QWEN3MOE
from .smollm3 import SMOLLM3

ARCHITECTURES = {
    a.name: a for a in (LLAMA, QWEN2, QWEN3, GEMMA2, GEMMA3, GRANITE, OLMO2, PHI3, SMOLLM3, QWEN3MOE, QWEN2MOE, OLMOE)
}
