"""The expert cache's fading window at other decays (issue 35), replayed on one decode's routing.

Records 256 greedy tokens' routing of MODEL at half its size (studies/moe_cache_policies.record,
kept in /tmp/moe_routing.pkl for the next run), then replays it through one pool of SLOTS
experts for all layers (the plan's total; flashcli's two pools of layers alike, as one) with the
fading policy at each DECAY given: hit rates over decode passes 1-128 and 129-256.

    PYTHONPATH=. python studies/moe_decay_sweep.py MODEL.flash.gguf SLOTS 0.97 0.99 0.9 0.995
"""

import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import moe_cache_policies as policies  # noqa: E402

path, slots_total, decays = sys.argv[1], int(sys.argv[2]), [float(x) for x in sys.argv[3:]]
kept = Path("/tmp/moe_routing.pkl")
if kept.exists():
    seq = pickle.loads(kept.read_bytes())
else:
    seq, _ = policies.record(path, 256, 0.5)
    kept.write_bytes(pickle.dumps(seq))
slots = [slots_total // len(seq)] * len(seq)
asked = sum(len(s[1]) for s in seq)
for decay in decays:
    policies.DECAY = decay
    hits = policies.replay(seq, slots, "global fading", 128)
    first, rest = hits[1:129].sum() / (asked * 128), hits[129:].sum() / (asked * len(hits[129:]))
    print(f"decay {decay}: hit rate passes 1-128 {first:.4f}, 129-256 {rest:.4f}", flush=True)
