"""Making one call of a model (or of anything the engine calls) fail, as a fault would."""

from __future__ import annotations


def fail_once(monkeypatch, owner, name, error, at_call: int = 1) -> None:
    """Make `owner.name` (a function of a module or class, or a bound method) raise on its
    `at_call`-th call, then behave again. `error`: an exception, or what makes one (a class, a
    function of no arguments), so each failure can raise a fresh one."""
    original, calls = getattr(owner, name), []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            raise error() if callable(error) else error
        return original(*a, **k)

    monkeypatch.setattr(owner, name, flaky)
