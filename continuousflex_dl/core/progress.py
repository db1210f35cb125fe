"""The one signature of the progress callbacks that the core's long loops call.

``progress(done, total, message)``: ``done`` of ``total`` units of work (images, particles,
epochs, rounds: the loop's docstring says which) are finished, and ``message`` is one line
saying what was done, for a run's log. Callers pass None for no reports.
"""
from __future__ import annotations

from typing import Callable, Optional

__all__ = ["Progress", "report"]

#: ``progress(done: int, total: int, message: str) -> None``.
Progress = Callable[[int, int, str], None]


def report(progress: Optional[Progress], done: int, total: int, message: str) -> None:
    """Call ``progress(done, total, message)`` unless ``progress`` is None."""
    if progress is not None:
        progress(int(done), int(total), message)
