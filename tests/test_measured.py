"""The speeds the cost model reads (flashcli/flash/measured.py): what runs measured, kept for the next;
and the draft choice made from them (loader.draft_pays), which one noisy run must not flip."""

from __future__ import annotations

import json
import re

import pytest

from flashcli.decoding.loader import draft_pays
from flashcli.flash import measured
from flashcli.flash.budget import Plan


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def disk_run(rate: float):
    """A run that waited for its reads (of another model): the disk gave `rate` bytes/s."""
    measured.remember("other.gguf", matrix_bytes=1, tokens=1, seconds=1.0, waited=0.5, streamed=int(rate))


def test_priors_until_enough_runs_measured():
    assert measured.disk().value == measured.PRIORS["disk"]
    assert measured.compute("a.gguf").value == measured.PRIORS["compute"] and not measured.compute("a.gguf").measured
    for _ in range(measured.MIN_RUNS - 1):
        disk_run(4e9)
    assert measured.disk() == measured.Figure(measured.PRIORS["disk"], measured.MIN_RUNS - 1, False)
    disk_run(4e9)
    assert measured.disk() == measured.Figure(4e9, measured.MIN_RUNS, True)


def test_a_disk_bound_run_measures_disk_and_compute():
    # 10 passes of one token over 500 MB of weights, 400 MB of them read per pass, in 4 s of
    # which 3 s waiting: the disk gave 4 GB in 4 s; compute was 10 tokens x 500 MB in 1 s
    for _ in range(measured.MIN_RUNS):
        measured.remember(
            "/m/a.gguf", matrix_bytes=500_000_000, tokens=10, seconds=4.0, waited=3.0, streamed=4_000_000_000
        )
    assert measured.disk().value == pytest.approx(1e9)
    assert measured.compute("elsewhere/a.gguf").value == pytest.approx(5e9) and measured.compute("a.gguf").measured
    assert measured.compute("b.gguf").value == measured.PRIORS["compute"]
    # a run that hardly waited says nothing of the disk; its compute is one value of four
    measured.remember("/m/a.gguf", matrix_bytes=500_000_000, tokens=10, seconds=2.0, waited=0.1, streamed=4_000_000_000)
    assert measured.disk() == measured.Figure(pytest.approx(1e9), measured.MIN_RUNS, True)
    assert measured.compute("a.gguf").runs == measured.MIN_RUNS + 1
    assert measured.compute("a.gguf").value == pytest.approx(5e9)  # the median, not the newest


def test_a_figure_keeps_the_last_runs_only():
    for rate in [1e9] * measured.HISTORY + [3e9] * (measured.HISTORY // 2 + 1):
        disk_run(rate)
    assert measured.disk() == measured.Figure(3e9, measured.HISTORY, True)


def test_an_unreadable_or_older_cache_is_ignored_or_read(tmp_path):
    (tmp_path / "flashcli").mkdir()
    path = tmp_path / "flashcli" / "measured.json"
    path.write_text("not json")
    assert measured.disk().value == measured.PRIORS["disk"]
    measured.remember("a.gguf", matrix_bytes=1, tokens=1, seconds=1.0, waited=0.0, streamed=0)
    assert measured.compute("a.gguf").runs == 1
    path.write_text(json.dumps({"disk": 2e9}))  # an older cache: one figure, read as one run
    assert measured.disk() == measured.Figure(measured.PRIORS["disk"], 1, False)


def rows_plan(resident: float, streamed: float) -> Plan:
    return Plan(0, 0, {"resident matrices": int(resident)}, 8, "rows", streamed_bytes=int(streamed))


# a target that streams half its 1 GB of matrices alone, 70% of them with a 400 MB draft beside it
ALONE, WITH_DRAFT, DRAFT = rows_plan(5e8, 5e8), rows_plan(3e8, 7e8), rows_plan(4e8, 0)


def choice() -> tuple[bool, str]:
    return draft_pays(ALONE, WITH_DRAFT, DRAFT, 8, "/m/t.gguf", "/m/d.gguf")


def test_one_noisy_run_does_not_flip_the_draft_choice_and_consistent_runs_do():
    """At the priors' disk rate streaming bounds the target and the draft pays; a disk 7x faster
    makes the target compute-bound and the draft not pay. One run that saw such a disk (before
    enough runs, or among slower ones) leaves the choice; runs that keep seeing it change it."""
    pays, why = choice()
    assert pays and "disk reads 1.50 GB/s (prior: 0 of 3 runs measured)" in why, why
    disk_run(1e10)
    assert choice()[0]  # one run: the prior still stands
    for rate in (1.4e9, 1.6e9, 1.5e9):
        disk_run(rate)
    assert choice()[0]  # median of 1.4, 1.5, 1.6, 10 GB/s
    for _ in range(4):
        disk_run(1e10)
    pays, why = choice()
    assert not pays and "disk reads 10.00 GB/s (median of 8 runs)" in why, why


def test_a_near_tie_keeps_the_default(monkeypatch):
    """A draft expected to win by less than DRAFT_MARGIN is not chosen; by more, it is."""
    from flashcli.decoding import loader

    found = re.search(r"([0-9.]+) tok/s expected with it .* against ([0-9.]+) without", choice()[1])
    ratio = float(found.group(1)) / float(found.group(2))  # printed to 0.1 tok/s: within 5%
    monkeypatch.setattr(loader, "DRAFT_MARGIN", 1.05 * ratio)
    pays, why = choice()
    assert not pays and "does not pay" in why
    monkeypatch.setattr(loader, "DRAFT_MARGIN", 0.95 * ratio)
    assert choice()[0]
