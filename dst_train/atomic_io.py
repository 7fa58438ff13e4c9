"""Files that are either the old version or the new one, never half of either.

Every result a job writes and a later run reads back (traces, settings, reports, metrics) goes
through here: written to ``NAME.tmp`` next to it, then renamed over it (``os.replace`` is atomic
on POSIX), so a kill at any moment leaves a whole file or the previous one.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
