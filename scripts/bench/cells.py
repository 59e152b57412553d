"""Cells and lines shared by the report's sections: a number or a dash, a run's speed, a target."""

from __future__ import annotations


def number(x, spec=".2f", none="-"):
    """x formatted by spec, or none where the figure is missing."""
    return none if x is None else format(x, spec)


def target(ok, text) -> str:
    """A target line; ok None where the run that would tell was not made."""
    return f"- {'NOT RUN' if ok is None else 'PASS' if ok else 'FAIL'}: {text}"


def speed(run: dict) -> str:
    """Decode tok/s; with the status and the tokens made where the run did not finish."""
    if run.get("status") == "ok":
        return number(run.get("decode_tok_s"))
    return f"{number(run.get('decode_tok_s'), '.3f')} ({run.get('status')}, {run.get('tokens', 0)} tokens)"
