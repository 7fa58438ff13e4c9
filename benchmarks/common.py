"""What every benchmark records: the machine, the versions, the command, and a printed table."""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from dst_train.atomic_io import write_text_atomic

RESULTS = Path(__file__).parent / "results"
PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "pyarrow", "peft", "numpy")


def environment() -> dict:
    """Device, package versions and command line of this run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = {"cpu": platform.processor() or platform.machine(), "cores": _cores()}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device.update(
                gpu=props.name,
                gpu_memory_gb=round(props.total_memory / 2**30, 1),
                capability=f"{props.major}.{props.minor}",
            )
    except ImportError:
        pass
    return {
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def table(rows: list[dict], columns: list[str]) -> str:
    """Plain fixed-width table of ``rows`` (dicts) restricted to ``columns``."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[k]) for row in cells]) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` + environment to ``benchmarks/results/<name>.json``, atomically: a run
    killed while writing (a GPU stage past its deadline) leaves the previous record whole."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    text = json.dumps({"benchmark": name, **environment(), **payload}, indent=2) + "\n"
    write_text_atomic(path, text)
    return path


def read_json_lines(path: Path) -> list[dict]:
    """The rows of a JSON-lines log appended to as things end (the fit probes); a line a kill
    cut short is skipped, [] when there is no file."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or torn by a kill mid-write
    return rows
