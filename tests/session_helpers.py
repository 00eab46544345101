"""Driving a local Session's turns the way the session tests do."""

from __future__ import annotations


def final_event(events) -> dict:
    """Run a turn's event stream (e.g. `session.ask(...)`) to its end; its last event (None if none)."""
    final = None
    for event in events:
        final = event
    return final
