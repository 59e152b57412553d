"""The benchmark runner's report: a run of some sections leaves BENCHMARKS.md alone."""

from __future__ import annotations

import sys

import pytest

from scripts.bench import __main__ as bench
from scripts.bench import report


@pytest.fixture
def sandboxed(tmp_path, monkeypatch):
    """bench's main with its documents in tmp_path and its sections doing nothing."""
    doc, partial = tmp_path / "BENCHMARKS.md", tmp_path / "bench-out" / "BENCHMARKS.sections.md"
    doc.write_text("records of earlier runs\n")
    monkeypatch.setattr(report, "DOC", doc)
    monkeypatch.setattr(bench, "PARTIAL_REPORT", partial)
    ran = []
    for name, module in bench.SECTIONS.items():
        monkeypatch.setattr(module, "run", lambda quick, name=name: ran.append(name))
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0)
    return doc, partial, ran


def test_a_run_of_some_sections_reports_beside_their_results(sandboxed, monkeypatch):
    doc, partial, ran = sandboxed
    monkeypatch.setattr(sys, "argv", ["bench", "--section", "columns"])
    bench.main()
    assert ran == ["columns"]
    assert doc.read_text() == "records of earlier runs\n"
    assert partial.read_text().startswith("# flashcli benchmarks")


def test_the_report_only_run_rewrites_the_document(sandboxed, monkeypatch):
    doc, partial, ran = sandboxed
    monkeypatch.setattr(sys, "argv", ["bench", "--report-only"])
    bench.main()
    assert ran == []
    assert doc.read_text().startswith("# flashcli benchmarks")
    assert not partial.exists()
