"""--dram-budget: the size parser and the planners that split a budget."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from flashcli.decoding.batching import Request, run_batch
from flashcli.decoding.sampling import make_sampler
from flashcli.engine import ggml
from flashcli.engine.bundles import layer_layouts
from flashcli.engine.config import ModelConfig
from flashcli.engine.gguf_file import GGUFFile
from flashcli.engine.tokenizer import Tokenizer
from flashcli.errors import BudgetTooSmall
from flashcli.flash.budget import parse_size, plan_neurons, plan_rows, prompt_batches
from flashcli.flash.flash_model import FlashModel, FlashOptions, plan_for
from flashcli.flash.weight_stream import pass_matrices

from conftest import TEXT


@pytest.mark.parametrize(
    "text,expected",
    [
        ("512M", 512 * 2**20),
        ("4G", 4 * 2**30),
        ("4GiB", 4 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("2GB", 2 * 10**9),
        ("100k", 100 * 1024),
        ("123", 123),
        ("8MiB", 8 * 2**20),
        ("1.5g", int(1.5 * 2**30)),
        ("50%", 500),
        ("12.5%", 125),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text, reference=1000) == expected


@pytest.mark.parametrize(
    "bad", ["", " ", "G", "4X", "-1G", "four", "1..5G", "0", "0G", "0%", "1e3", "4 GB", " 8M", "-50%", "abc", "5%%"]
)
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad, reference=1000)


def test_a_share_needs_a_reference():
    with pytest.raises(ValueError, match="model file"):
        parse_size("50%")


def test_rows_plan_fits_the_budget_and_streams_what_it_cannot_hold(smollm2):
    gf = GGUFFile(smollm2)
    cfg = ModelConfig.from_gguf(gf)
    matrices = pass_matrices(gf, cfg)
    ffn = [m for m in matrices if ".ffn_" in m.name]
    everything = plan_rows(gf, cfg, None, 256, 1, matrices)
    assert everything.streamed == () and everything.ffn_resident_fraction == 1.0
    smallest = plan_rows(gf, cfg, everything.minimum, 256, 1, matrices).minimum  # its prompt batch is smaller
    budget = smallest + sum(m.nbytes for m in matrices) - sum(m.nbytes for m in ffn) // 2
    p = plan_rows(gf, cfg, budget, 256, 1, matrices)
    assert p.total <= budget
    assert p.total > budget - 2 * max(m.nbytes for m in matrices)  # the budget is used, not wasted
    assert 0 < len(p.streamed) < len(ffn) and 0 < p.ffn_resident_fraction < 1
    assert all(".ffn_" in n for n in p.streamed)  # attention and the head are the last to stream
    lines = "\n".join(p.lines())
    assert "resident weights" in lines and "streamed" in lines
    with pytest.raises(BudgetTooSmall, match="minimum of"):
        plan_rows(gf, cfg, p.minimum - 1, 256, 1, matrices)
    least = plan_rows(gf, cfg, p.minimum, 256, 1, matrices)
    assert least.ffn_resident_fraction == 0.0 and len(least.streamed) == len(matrices)


@pytest.mark.parametrize(
    "batches, tokens, expected",
    [((8, 512), 153, (8, 256)), ((8, 512), 256, (8, 256)), ((8, 512), 257, (8, 512)), ((8, 512), 4096, (8, 512))]
    + [((8, 512), 1, (8, 8)), ((16, 512), 9, (16, 16)), ((8, 512), 0, (8, 8))],
)
def test_a_prompt_batch_is_no_larger_than_the_tokens_it_may_hold(batches, tokens, expected):
    assert prompt_batches(batches, tokens) == expected


def test_a_short_context_leaves_the_prompt_batchs_activations_to_the_weights(smollm2):
    """A plan for a context of 40 tokens has prompt batches of at most 64 tokens (not 128, as
    the budget would allow): the activations it sets aside shrink and more rows stay resident."""
    gf = GGUFFile(smollm2)
    cfg = ModelConfig.from_gguf(gf)
    matrices = pass_matrices(gf, cfg)
    budget = plan_rows(gf, cfg, None, 40, 1, matrices).total * 2 // 3
    wide = plan_rows(gf, cfg, budget, 40, 1, matrices, batches=(8, 512))
    capped = plan_rows(gf, cfg, budget, 40, 1, matrices, batches=prompt_batches((8, 512), 40))
    assert wide.prompt_batch > 64 >= capped.prompt_batch
    assert capped.parts["activations"] < wide.parts["activations"]
    assert capped.ffn_resident_fraction > wide.ffn_resident_fraction
    assert plan_for(gf, cfg, budget, 40, FlashOptions()).prompt_batch <= 64  # the loader's plans are capped


def test_rows_plan_keeps_repacked_tensors_resident_first(qwen):
    """The 1.5B's Q4_K FFN tensors run on repacked kernels, its Q6_K ones do not: streamed,
    the Q4_K ones cost a repack as they arrive, so they stay resident first."""
    gf = GGUFFile(qwen)
    cfg = ModelConfig.from_gguf(gf)
    matrices = pass_matrices(gf, cfg)
    ffn = [m for m in matrices if ".ffn_" in m.name]
    assert any(m.repacked for m in ffn) and any(not m.repacked for m in ffn)
    full = plan_rows(gf, cfg, None, 256, 1, matrices)
    budget = full.total - sum(m.nbytes for m in ffn) // 2
    streamed = set(plan_rows(gf, cfg, budget, 256, 1, matrices).streamed)
    assert 0 < len(streamed) < len(ffn)
    # no repacked tensor is streamed while a plain one is resident
    if any(m.repacked and m.name in streamed for m in ffn):
        assert all(m.name in streamed for m in ffn if not m.repacked)


def test_neuron_plan_fits_the_budget_and_favours_layers_that_need_more(smollm2_bundles):
    gf = GGUFFile(smollm2_bundles)
    cfg = ModelConfig.from_gguf(gf)
    strides = [x.stride for x in layer_layouts(gf, cfg.d_model, cfg.n_layers)]
    want = [0.2] * (cfg.n_layers - 1) + [0.6]
    full = plan_neurons(gf, cfg, None, 256, 1, strides, want, 1 << 20)
    assert full.slots == (cfg.n_ff,) * cfg.n_layers
    budget = (full.minimum + full.total) // 2
    p = plan_neurons(gf, cfg, budget, 256, 1, strides, want, 1 << 20)
    assert p.total <= budget
    assert p.total > 0.95 * budget  # the budget is used, not wasted
    assert p.slots[-1] > p.slots[0]  # the layer wanting 3x more gets more
    assert all(s <= cfg.n_ff for s in p.slots)
    with pytest.raises(BudgetTooSmall, match="minimum of"):
        plan_neurons(gf, cfg, p.minimum - 1, 256, 1, strides, want, 1 << 20)
    assert min(plan_neurons(gf, cfg, p.minimum, 256, 1, strides, want, 1 << 20).slots) >= 1


# --- what a flash model really allocates, against the plan's parts ----------------------------
#
# Measured without the planner's arithmetic and without root: every numpy array that owns its
# memory, every anonymous map and every ggml backend buffer reachable from the model, each under
# the plan's part its owner belongs to; and the peak of the ggml graphs' own memory (ggml-alloc's
# buffers, work buffers, inputs) while a prompt and a few tokens are evaluated.

PART_OF = {  # class -> the plan's part whose memory it holds
    "Weights": "resident weights",
    "RepackedWeights": "resident weights",
    "PredictorGraph": "resident weights",
    "DecodeState": "KV cache",
    "NeuronCache": "neuron caches",
    "StreamedWeights": "stream ring",
}
MEASURED_APART = {"Graph", "RecordsGraph"}  # graphs: their peak, by `GraphMemory`
NOT_ALLOCATED = {"GGUFFile", "TensorInfo", "ThreadPool", "MmapReader"}  # the mapped file, threads
IO_PART = {"rows": "stream ring", "bundles": "read buffers", "experts": "expert caches"}  # what reads from disk holds


def allocated(roots: list) -> tuple[dict, set]:
    """Bytes by part of what `roots` hold (in this order: an array reachable from two roots
    counts under the first), and the ids of the arrays counted."""
    out, seen, arrays = {}, set(), set()

    def add(part, n):
        out[part] = out.get(part, 0) + int(n)

    def walk(obj, part):
        if id(obj) in seen or obj is None or isinstance(obj, (int, float, str, bytes, bool)):
            return
        seen.add(id(obj))
        kind = type(obj).__name__
        if kind in NOT_ALLOCATED or kind in MEASURED_APART:
            return
        if isinstance(obj, np.ndarray):
            if obj.flags.owndata:
                arrays.add(id(obj))
                add(part, obj.nbytes)
            else:
                walk(obj.base, part)  # a view: what it views counts once
        elif isinstance(obj, mmap.mmap):
            add(part, len(obj))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            if any(type(x).__name__ in MEASURED_APART for x in obj):
                return  # a graph with its inputs and outputs
            for x in obj:
                walk(x, part)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x, part)
        elif type(obj).__module__.startswith("flashcli") and hasattr(obj, "__dict__"):
            part = PART_OF.get(kind, part)
            for name, x in vars(obj).items():
                if name == "_buffer" and isinstance(x, int) and x:  # a ggml backend buffer
                    add(part, ggml.lib().backend_buffer_get_size(x))
                else:
                    walk(x, part)

    for root, part in roots:
        walk(root, part)
    return out, arrays


class GraphMemory:
    """The peak, over every graph ggml-alloc places, of the memory of the graphs alive then:
    ggml-alloc's buffer, the work buffer, and input arrays not counted elsewhere."""

    def __init__(self, monkeypatch):
        self.live, self.counted, self.peak = weakref.WeakSet(), set(), 0
        finish = ggml.Graph.finish

        def tracked(graph, shared=None):
            out = finish(graph, shared)
            self.live.add(graph)
            self.peak = max(self.peak, self.now())
            return out

        monkeypatch.setattr(ggml.Graph, "finish", tracked)

    def now(self) -> int:
        graphs = [g for g in list(self.live) if g.ctx]
        inputs = {
            id(a): a.nbytes
            for g in graphs
            for a in g._keep  # shared by a batch's graphs: once
            if isinstance(a, np.ndarray) and a.flags.owndata and id(a) not in self.counted
        }
        shared = {id(g._shared): g._shared.nbytes + getattr(g._shared.work, "nbytes", 0) for g in graphs if g._shared}
        return (
            sum(g.activation_bytes + (g._work.nbytes if g._work is not None else 0) for g in graphs)
            + sum(shared.values())
            + sum(inputs.values())
        )


def budget_of(path, kind: str, sequences: int = 1) -> int:
    """tight: the plan's minimum; roomy: the converted file's size; ample: the minimum and the
    file's size (a tiny file, below the runtime reserve); none: no budget (a draft beside its
    target is loaded so, its plan's total taken from the target's budget)."""
    if kind == "none":
        return None
    budget = os.path.getsize(path)
    if kind in ("tight", "ample"):
        gf = GGUFFile(path)
        minimum = plan_for(gf, ModelConfig.from_gguf(gf), None, 256, sequences=sequences).minimum
        budget = minimum + (budget if kind == "ample" else 0)
    return budget


@pytest.fixture(
    scope="module",
    params=[
        ("smollm2_flash", "tight", 1),
        ("smollm2_flash", "roomy", 1),
        ("relu_flash", "tight", 1),
        ("relu_flash", "roomy", 1),
        ("smollm2_flash", "tight", 4),
        ("relu_flash", "tight", 4),
        ("smollm2_draft", "none", 1),
        ("moe_tiny", "tight", 1),
        ("moe_tiny", "ample", 1),
        ("moe_converted", "tight", 1),
        ("moe_converted", "ample", 1),
    ],
    ids=lambda p: f"{p[0].replace('_flash', '')}-{p[1]}" + (f"-{p[2]}-sequences" if p[2] > 1 else ""),
)
def allocation(request):
    """(plan, bytes by part) of a flash model at its minimum budget or at its file's size, after a
    prompt of one full prompt batch and a partial one, and 4 single tokens (as generation runs);
    with several sequences, 6 prompts of different lengths decoded together (batching.py)."""
    path = request.getfixturevalue(request.param[0])
    sequences = request.param[2]
    budget = budget_of(path, request.param[1], sequences)
    with pytest.MonkeyPatch.context() as mp:
        graphs = GraphMemory(mp)
        model = FlashModel(path, budget, n_ctx=256, sequences=sequences)
        batch = model.prompt_batch
        io = IO_PART[model.plan.layout]
        roots = [(model.weights, "resident weights"), (model.states, "KV cache"), (model.stream, io), (model.ffn, io)]
        graphs.counted = allocated(roots)[1]
        tokenizer = Tokenizer(path)
        tokens = tokenizer.encode(TEXT)[: min(batch + 8, 200) + 4]
        if sequences == 1:
            for s in range(0, len(tokens) - 4, batch):
                model.eval(tokens[s : min(s + batch, len(tokens) - 4)])
            for t in tokens[-4:]:
                model.eval([t])
        else:
            requests = [Request(i, i, tokens[: 5 + 37 * i], 6, make_sampler()) for i in range(6)]
            assert len(list(run_batch(model, tokenizer, requests, sequences))) == 6
        found = allocated(roots)[0]  # after the run: buffers that grow have grown
        found["activations"] = graphs.peak
        model.close()
    return model.plan, found


PARTS = {
    "rows": ["resident weights", "KV cache", "stream ring", "activations"],
    "bundles": ["resident weights", "KV cache", "read buffers", "neuron caches", "activations"],
    "experts": ["resident weights", "KV cache", "expert caches", "activations"],
}


def test_allocated_bytes_stay_within_the_plans_parts(allocation):
    """Each part the plan has, against the bytes found for it (a rows plan has no neuron caches,
    a bundles plan no stream ring). Experts: the slots (ggml's repacked buffers, plain slots'
    pages), their maps and the staging buffers of the reads in flight are exactly the plan's part."""
    plan, found = allocation
    for part in PARTS[plan.layout]:
        planned = plan.parts[part] + (plan.parts.get("resident matrices", 0) if part == "resident weights" else 0)
        if part == "expert caches":
            assert found.get(part) == planned, (found, plan.parts)
        elif planned == 0:  # nothing streams where everything is resident (a draft)
            assert found.get(part, 0) == 0, (part, found, plan.parts)
        else:
            assert 0 < found.get(part, 0) <= planned, (part, found, plan.parts)


@pytest.mark.parametrize(
    "model,kind",
    [
        ("smollm2_flash", "tight"),
        ("smollm2_flash", "roomy"),
        ("relu_flash", "tight"),
        ("relu_flash", "roomy"),
    ],
)
def test_peak_rss_of_a_generation_stays_within_the_budget(model, kind, request, tmp_path):
    """The same bound from outside, everything included (Python objects, threads, allocator
    slack): a `flashcli generate` run's peak RSS beyond its baseline (interpreter, libraries,
    tokenizer, measured before the model loads) stays within --dram-budget."""
    path = request.getfixturevalue(model)
    budget = budget_of(path, kind)
    stats = tmp_path / "stats.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashcli.cli",
            "generate",
            str(path),
            "-p",
            TEXT[:200],
            "-n",
            "8",
            "--ctx",
            "256",
            "-q",
            "--dram-budget",
            str(budget),
            "--stats-json",
            str(stats),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    s = json.loads(stats.read_text())
    assert s["dram_budget_bytes"] == budget
    assert s["peak_rss_bytes"] - s["baseline_rss_bytes"] <= budget, s
