"""Mixtures of experts against llama.cpp on the same files: each family's router (softmax, top
k, renormalised or not, a shared expert), the experts on the kernels llama.cpp runs them on
(repacked where ggml repacks their type on this CPU), resident and through the expert cache."""

from __future__ import annotations

import numpy as np
import pytest

from converters.model_maker import SHAPES
from flashcli.decoding.generate import generate_step
from flashcli.decoding.sampling import make_sampler
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.model import Model
from flashcli.errors import BadModelFile

from conftest import llama_cpp_greedy, llama_cpp_logits, token_logits
from synthetic import Shape, write_llama_gguf

FAMILIES = ["tiny-mixtral", "tiny-qwen3moe", "tiny-qwen2moe", "tiny-olmoe"]  # the model maker's
TOKENS = [1] + np.random.default_rng(0).integers(3, 4000, 47).tolist()
SKEW_MARGIN = 0.05  # measured: even 0.19 and 0.26, "hot" 0.39 and 0.54 on these tokens


def test_a_mixture_without_its_used_count_is_refused(synthetic_dir):
    shape = Shape(n_layers=2, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, n_vocab=512)
    path = write_llama_gguf(synthetic_dir / "moe-no-used.gguf", shape, 8, arch="llama", extra={"llama.expert_count": 8})
    with pytest.raises(BadModelFile, match="expert_used_count"):
        ModelConfig.from_gguf(GGUFFile(path))


def expert_cached(path, slots_per_layer: int, prefetch: bool = False):
    """The file's model with its experts read into caches of this many slots a layer."""
    from flashcli.engine import ggml
    from flashcli.engine.weights import Weights
    from flashcli.flash.expert_ffn import ExpertFFN

    gf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gf)
    pool = ggml.ThreadPool()
    weights = Weights(gf, cfg, with_ffn=False, anonymous=True)
    ffn = ExpertFFN(gf, cfg, weights, [slots_per_layer] * cfg.n_layers, pool, prefetch=prefetch)
    return Model(path, n_ctx=128, ffn=ffn, gguf_file=gf, pool=pool, weights=weights, cfg=cfg)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("file_type", ["Q8_0", "Q4_K_M"])
def test_experts_read_into_a_cache_give_llama_cpp_logits(name, file_type, made):
    """As few slots as a token needs and a spare: the prompt's experts outnumber them (they run
    in rounds), every decoded token reads; the logits and greedy tokens are llama.cpp's (the
    resident model's are: test_arch.py)."""
    path = made(name, file_type)
    k = SHAPES[name].n_expert_used
    tokens = TOKENS
    ref, llm = llama_cpp_logits(path, tokens)
    model = expert_cached(path, k + 1)
    np.testing.assert_array_equal(token_logits(model, tokens), ref)
    assert model.ffn.telemetry(len(tokens))["experts_read_per_token"] > 0
    want = llama_cpp_greedy(llm, tokens[:8], 16)
    assert list(generate_step(expert_cached(path, k + 2), tokens[:8], make_sampler(0.0), 16)) == want
    prefetching = expert_cached(path, 2 * k, prefetch=True)  # guesses take room, never a token
    assert list(generate_step(prefetching, tokens[:8], make_sampler(0.0), 16)) == want
    # how many guesses are read before the next layer stops them is a race (test_expert_reads.py
    # tests the stop); that guesses were made is not
    assert prefetching.ffn.guessed > 0


def _routed(path, tokens, decoded: int):
    """The model through an expert cache of every expert: a prompt, then `decoded` one-token passes."""
    model = expert_cached(path, SHAPES["tiny-qwen3moe"].n_expert)
    model.eval(tokens[:8])
    for t in tokens[8 : 8 + decoded]:
        model.eval([t])
    return model


def test_skewed_routers_pick_hot_experts_through_the_real_pass(made):
    """--router-skew gives the routers hot experts through flashcli's own pass (the carrier in the
    embeddings reaches every router through attention and norms): the hottest tenth of a layer's
    experts take more of the picks, and a token reuses more of its predecessor's experts, than
    with even routers; a skewed file still computes what llama.cpp computes."""
    tokens = TOKENS[:40]
    even = _routed(made("tiny-qwen3moe", "Q8_0"), tokens, 32).ffn.telemetry(40)
    skewed_path = made("tiny-qwen3moe", "Q8_0", "hot")
    hot = _routed(skewed_path, tokens, 32).ffn.telemetry(40)
    assert hot["expert_top_decile_share"] > even["expert_top_decile_share"] + SKEW_MARGIN
    assert hot["expert_repeat_rate"] > even["expert_repeat_rate"] + SKEW_MARGIN
    ref, _ = llama_cpp_logits(skewed_path, TOKENS[:16])
    np.testing.assert_array_equal(token_logits(expert_cached(skewed_path, 5), TOKENS[:16]), ref)


def test_routing_stats_count_picks_and_repeats():
    """Picks per expert from every pass; repeats only between one-token passes in a row (a
    batch between them breaks the pair)."""
    from flashcli.flash.expert_ffn import RoutingStats

    stats = RoutingStats(n_layers=1, n_expert=8, k=2)
    stats.add(0, [np.array([[0, 1]])])
    stats.add(0, [np.array([[1, 2]])])  # one of two reused
    stats.add(0, [np.array([[1, 2]])])  # both
    stats.add(0, [np.array([[3, 4], [5, 6]])])  # a batch: picks only
    stats.add(0, [np.array([[5, 6]])])  # no pair with the batch
    stats.add(0, [np.array([[0, 7]])])  # none
    assert stats.picks[0].tolist() == [2, 3, 2, 1, 1, 2, 2, 1]
    assert stats.repeated == 3 and stats.followed == 6
    # the hottest tenth of 8 experts is 1 expert: expert 1, 3 of 14 picks
    assert stats.telemetry() == {"expert_repeat_rate": 0.5, "expert_top_decile_share": 3 / 14}


def test_the_expert_cache_keeps_what_it_has_room_for(moe_tiny):
    """Slots for every expert: no expert is read twice; the pools' bytes are what their slots
    allocated (numpy arrays or ggml's repacked buffers, counted apart)."""
    from flashcli.engine import ggml

    path = moe_tiny
    n_expert = SHAPES["tiny-qwen3moe"].n_expert
    model = expert_cached(path, n_expert)
    model.eval(list(range(3, 40)))
    for t in range(8):
        model.eval([50 + t])
    for cache in model.ffn.caches:
        assert 0 < cache.misses <= n_expert and cache.hits > 0
        assert len(np.flatnonzero(cache.slot_of >= 0)) == cache.misses  # each read once, still there
    allocated, used = 0, 0
    for pool in model.ffn.pools:  # layers of the same types and shapes share one
        for slots in pool.slots.values():
            used += slots.n_slots * slots.expert_bytes
            if slots.repacked:
                allocated += ggml.lib().backend_buffer_get_size(slots._buffer)
            else:  # plain slots: the pages of their map, placed at the file's offset in a page
                assert slots.plain.base is not None and slots.plain.ctypes.data % 4096 == slots.info.offset % 4096
                allocated += len(slots._mm)
    held = sum(p.nbytes for p in model.ffn.pools)
    assert held == allocated and used <= allocated <= used + 2 * 4096 * 3 * len(model.ffn.pools)
    assert sum(p.n_slots for p in model.ffn.pools) == n_expert * SHAPES["tiny-qwen3moe"].n_layers


def small_caches(n_expert: int, n_slots: int, layers: int = 1) -> list:
    """ExpertCaches of `layers` layers sharing a pool of n_slots slots, whose reads do nothing
    (every record 'read')."""
    from flashcli.flash.expert_cache import ExpertCache
    from flashcli.flash.expert_slots import ExpertPool

    pool = ExpertPool({}, list(range(layers)), n_expert, n_slots)
    made = []
    for layer in range(layers):
        cache = ExpertCache.__new__(ExpertCache)
        cache.pool, cache.row, cache.n_expert, cache.n_slots = pool, layer, n_expert, n_slots
        cache.slot_of, cache.uses, cache.counted_at = pool.slot_of[layer], pool.uses[layer], pool.counted_at[layer]
        cache.hits = cache.misses = 0
        cache.infos = dict.fromkeys(("gate", "up", "down"))
        cache._read = lambda experts, slots, stop=None: np.full(len(experts), 3)
        made.append(cache)
    return made


def small_cache(n_expert: int, n_slots: int):
    return small_caches(n_expert, n_slots)[0]


def resident(cache) -> list:
    return sorted(np.flatnonzero(cache.slot_of >= 0).tolist())


def test_a_small_cache_evicts_the_least_recently_used_among_equals():
    """Three slots, experts asked for in turn, each once or twice: the one used longest ago goes."""
    cache = small_cache(8, 3)
    for step, experts in enumerate([[0, 1], [2], [0], [3], [1]]):
        cache.fetch(np.array(experts), step)
    # 1 went for 3 (0 was used since), then 2 for 1
    assert resident(cache) == [0, 1, 3] and cache.misses == 5 and cache.hits == 1


def test_the_victims_are_the_least_by_weight_then_last_use_as_a_full_sort_orders_them():
    """expert_cache._least sorts only the near-least: the same slots as numpy's full lexsort,
    ties (equal weights, equal last uses) included."""
    from flashcli.flash.expert_cache import _least

    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(1, n + 1))
        weight = rng.integers(-1, 4, n) * rng.choice([1.0, 0.5])
        last_used = rng.integers(-1, 5, n)
        assert _least(weight, last_used, k).tolist() == np.lexsort((last_used, weight))[:k].tolist()


def test_a_hot_expert_outlives_a_moment_without_use():
    """Expert 0 used in four passes, then not for three: it stays, and the experts used once
    since go first (least recently used would drop 0); unused for long enough, it goes."""
    from flashcli.flash.expert_cache import USE_DECAY

    cache = small_cache(8, 3)
    for step, experts in enumerate([[0], [0], [0], [0], [1], [2], [3]]):
        cache.fetch(np.array(experts), step)
    assert resident(cache) == [0, 2, 3]  # 1 (one use, two passes ago) went for 3
    # 2 and 3 used in turn (resident: no eviction) until 0's four uses weigh less than theirs
    weight0 = sum(USE_DECAY ** (6 - s) for s in range(4))
    for step in range(7, 7 + 60):
        cache.fetch(np.array([2 + step % 2]), step)
    assert weight0 * USE_DECAY**60 < USE_DECAY**2  # below a single use of 2 or 3 two passes ago
    cache.fetch(np.array([4]), 67)
    assert resident(cache) == [2, 3, 4] and cache.hits == 3 + 60


def test_layers_sharing_a_pool_hold_what_their_tokens_need():
    """Two layers, one pool of 6 slots: a layer whose tokens spread over many experts takes the
    slots of the other's faded ones, never one the other is using in the same fetch; each
    layer's map and the pool's owners agree."""
    a, b = small_caches(16, 6, layers=2)
    a.fetch(np.array([0, 1]), 0)
    b.fetch(np.array([0, 1]), 0)
    for step in range(1, 5):  # layer 1 keeps to 0 and 1; layer 0 spreads over 2..9
        a.fetch(np.array([2 * step, 2 * step + 1]), step)
        b.fetch(np.array([0, 1]), step)
    assert resident(b) == [0, 1] and resident(a) == [6, 7, 8, 9]  # a has 4 slots, b its 2
    pool = a.pool
    for row, cache in enumerate((a, b)):
        for e in resident(cache):
            assert pool.owner[cache.slot_of[e]] == row and pool.expert_in[cache.slot_of[e]] == e
    # layer 1's tokens spread now: it takes back layer 0's least weighted slots
    b.fetch(np.array([10, 11, 12, 13]), 5)
    assert resident(b) == [0, 1, 10, 11, 12, 13] and resident(a) == []


def test_generate_under_a_budget_streams_experts_and_keeps_the_text(moe_tiny, tmp_path):
    """`flashcli generate --dram-budget` at the plan's minimum (a token's experts per layer):
    the plan names the expert caches, experts are read, and the text is the resident run's;
    below the minimum, one line with it."""
    import json
    import subprocess
    import sys

    from flashcli.flash.flash_model import plan_for

    gf = GGUFFile(moe_tiny)
    minimum = plan_for(gf, ModelConfig.from_gguf(gf), None, 4096).minimum
    cmd = [
        sys.executable,
        "-m",
        "flashcli.cli",
        "generate",
        str(moe_tiny),
        "-p",
        "ab cd ef",
        "-n",
        "16",
        "--draft",
        "off",
    ]
    resident = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    stats = tmp_path / "stats.json"
    flash = subprocess.run(
        cmd + ["--dram-budget", str(minimum), "-v", "--stats-json", str(stats)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resident.returncode == 0 and flash.returncode == 0, flash.stderr
    assert flash.stdout == resident.stdout and "expert caches hold" in flash.stderr
    s = json.loads(stats.read_text())
    assert s["ffn_layout"] == "experts" and s["experts_read_per_token"] > 0 and 0 <= s["expert_hit_rate"] < 1
    assert 0 <= s["expert_repeat_rate"] <= 1 and 0 < s["expert_top_decile_share"] <= 1
    assert "expert hit rate" in flash.stderr and "experts its predecessor's" in flash.stderr
    low = subprocess.run(cmd + ["--dram-budget", "1M"], capture_output=True, text=True, timeout=300)
    assert low.returncode != 0 and low.stdout == "" and len(low.stderr.strip().splitlines()) == 1
    assert "minimum" in low.stderr


def test_prefetch_is_an_option_of_flash_generation_and_never_changes_a_token(moe_tiny):
    """FlashOptions.expert_prefetch reaches the expert caches: guesses are made (and scored; how
    many are read before the next layer stops them is a race), the greedy tokens stay
    llama.cpp's; off (the default), nothing is guessed or read ahead."""
    import os

    from flashcli.decoding.loader import LoadOptions, check, load
    from flashcli.flash.flash_model import FlashOptions, plan_for

    # room for every expert: guesses never crowd a token's experts out
    budget = plan_for(*check(moe_tiny), None, 128).minimum + os.path.getsize(moe_tiny)
    _, llm = llama_cpp_logits(moe_tiny, TOKENS[:8])
    want = llama_cpp_greedy(llm, TOKENS[:8], 16)
    for prefetch in (False, True):
        loaded = load(
            moe_tiny, LoadOptions(dram_budget=budget, n_ctx=128, flash=FlashOptions(expert_prefetch=prefetch))
        )
        assert list(generate_step(loaded.model, TOKENS[:8], make_sampler(0.0), 16)) == want
        t = loaded.model.telemetry()
        assert (loaded.model.ffn.guessed > 0) == prefetch
        assert prefetch or t["experts_prefetched_per_token"] == 0
        loaded.close()


@pytest.mark.parametrize("name", ["tiny-qwen3moe", "tiny-mixtral", "tiny-olmoe", "tiny-qwen2moe"])
@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_0"])
def test_a_converted_mixture_stores_its_experts_repacked_and_keeps_llama_cpp_logits(name, file_type, made, tmp_path):
    """`convert` lays each expert out as one record (gate, up, down) and stores the kinds ggml
    repacks on this CPU as its repacked kernels read them (asked of ggml, not of the file), so
    that an expert is one read and ready as it lands; through the expert cache and resident, the
    logits stay llama.cpp's on the source."""
    from converters.convert import convert
    from flashcli.cli.info import describe
    from flashcli.engine.bundles import prepacked_names
    from flashcli.engine.repack import repacks
    from flashcli.engine.weights import EXPERT_MATRICES

    source = made(name, file_type)
    flash = convert(source, tmp_path / "moe.flash.gguf").output
    is_expert = tuple(f".{m}.weight" for m in EXPERT_MATRICES)
    experts = [t for n, t in GGUFFile(source).tensors.items() if n.endswith(is_expert)]
    stored = {n for n in prepacked_names(GGUFFile(flash)) if n.endswith(is_expert)}
    assert stored == {t.name for t in experts if repacks(t.ggml_type, t.ne)}
    assert not any(n.endswith(is_expert) for n in GGUFFile(flash).tensors)  # records (one read an expert)
    assert describe(flash)["ffn_bytes"] == describe(source)["ffn_bytes"]  # `flashcli info` counts them
    if not stored:
        pytest.skip(f"ggml repacks none of {file_type}'s expert types on this CPU")
    ref, _ = llama_cpp_logits(source, TOKENS)
    k = SHAPES[name].n_expert_used
    np.testing.assert_array_equal(token_logits(expert_cached(flash, k + 1), TOKENS), ref)
    np.testing.assert_array_equal(token_logits(Model(flash, n_ctx=128), TOKENS), ref)


def test_batched_sequences_read_their_experts_through_the_cache_and_keep_llama_cpp_tokens(moe_tiny):
    """`--batch`: three sequences decoded together at the plan's minimum (a pass carries a token
    of each, their experts read together where they fit), each one's greedy text llama.cpp's."""
    from flashcli.decoding.batching import Request, run_batch
    from flashcli.decoding.loader import LoadOptions, check, load
    from flashcli.engine.tokenizer import Tokenizer
    from flashcli.flash.flash_model import plan_for

    tok = Tokenizer(moe_tiny)
    prompts = [TOKENS[:5], TOKENS[5:17], TOKENS[17:20], TOKENS[20:31]]
    budget = plan_for(*check(moe_tiny), None, 128, sequences=3).minimum
    model = load(moe_tiny, LoadOptions(dram_budget=budget, n_ctx=128, sequences=3)).model
    requests = [Request(i, i, t, 8, make_sampler(0.0)) for i, t in enumerate(prompts)]
    results = {r.index: r for r in run_batch(model, tok, requests, 3)}
    assert model.ffn.telemetry(32)["experts_read_per_token"] > 0
    model.close()
    _, llm = llama_cpp_logits(moe_tiny, TOKENS[:8])
    for i, t in enumerate(prompts):
        ids = []
        for token in llama_cpp_greedy(llm, t, 8):
            if tok.is_end_of_generation(token):
                break
            ids.append(token)
        assert results[i].text == tok.decode(np.array(ids)), i


PROBE = """
import os, sys
import flashcli.engine.ggml_bindings as b
real = b._Lib.__init__
def probe(self):
    print("spin count when ggml loads:", os.environ.get("GOMP_SPINCOUNT"), file=sys.stderr)
    real(self)
b._Lib.__init__ = probe
from flashcli.cli.main import cli
cli(sys.argv[1:])
"""


@pytest.mark.parametrize("mixture", [True, False])
def test_generate_shortens_openmp_spinning_for_a_mixture_before_ggml_loads(mixture, moe_tiny, smollm2):
    """`flashcli generate` on a mixture of experts sets GOMP_SPINCOUNT (libgomp reads it once,
    when ggml's library loads) before anything loads ggml; on a dense model it stays unset."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    model = moe_tiny if mixture else smollm2
    cmd = [sys.executable, "-c", PROBE, "generate", str(model), "-p", "ab cd", "-n", "2", "--draft", "off"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    loads = [line for line in run.stderr.splitlines() if line.startswith("spin count when ggml loads:")]
    assert loads == [f"spin count when ggml loads: {'10000' if mixture else 'None'}"]
