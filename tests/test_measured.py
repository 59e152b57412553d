"""The speeds the cost model reads (flashcli/measured.py): what a run measured, kept for the next."""

from __future__ import annotations

import pytest

from flashcli import measured


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_priors_until_a_run_measured():
    assert measured.disk_rate() == measured.PRIORS["disk"]
    assert measured.compute_rate("a.gguf") == measured.PRIORS["compute"] and not measured.is_measured("a.gguf")


def test_a_disk_bound_run_measures_disk_and_compute():
    # 10 passes of one token over 500 MB of weights, 400 MB of them read per pass, in 4 s of
    # which 3 s waiting: the disk gave 4 GB in 4 s; compute was 10 tokens x 500 MB in 1 s
    measured.remember("/m/a.gguf", matrix_bytes=500_000_000, tokens=10, seconds=4.0, waited=3.0, streamed=4_000_000_000)
    assert measured.disk_rate() == pytest.approx(1e9)
    assert measured.compute_rate("elsewhere/a.gguf") == pytest.approx(5e9) and measured.is_measured("a.gguf")
    assert measured.compute_rate("b.gguf") == measured.PRIORS["compute"]
    # a later run is averaged in; one that hardly waited says nothing of the disk
    measured.remember("/m/a.gguf", matrix_bytes=500_000_000, tokens=10, seconds=2.0, waited=0.1, streamed=4_000_000_000)
    assert measured.disk_rate() == pytest.approx(1e9)
    assert measured.compute_rate("a.gguf") == pytest.approx(0.5 * 5e9 + 0.5 * 5e9 / 1.9)


def test_an_unreadable_cache_is_ignored(tmp_path):
    (tmp_path / "flashcli").mkdir()
    (tmp_path / "flashcli" / "measured.json").write_text("not json")
    assert measured.disk_rate() == measured.PRIORS["disk"]
    measured.remember("a.gguf", matrix_bytes=1, tokens=1, seconds=1.0, waited=0.0, streamed=0)
    assert measured.is_measured("a.gguf")
