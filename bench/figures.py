"""What every bench script does with its figures: print them, and write them as JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def report(figures: dict, out: Optional[str], echo: bool = True) -> dict:
    """Print ``key: value`` per figure (``echo``) and write them as JSON to ``out`` (if given)."""
    if echo:
        for key, val in figures.items():
            print(f"{key}: {val}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(figures, indent=1))
    return figures
