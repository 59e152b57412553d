"""smollm3 (SmolLM3): llama's block, except that every fourth layer (the 4th, 8th, ...) applies
no rope to q and k. llama.cpp fixes the step at 4; no metadata key carries it."""

from .architecture import ROPE_NORMAL, Architecture

SMOLLM3 = Architecture(
    "smollm3",
    rope_mode=ROPE_NORMAL,
    ffn_activation="silu",
    multipliers=("attention.scale",),
    no_rope_every=4,
    chat_template="chatml",
)
