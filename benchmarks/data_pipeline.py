"""Data-pipeline throughput: label building and lazy frame reads on long videos.

    python benchmarks/data_pipeline.py            # 4 videos of >= 2000 frames each
    python benchmarks/data_pipeline.py --smoke    # tiny, for the tests

Measures (1) clips/s and frames/s of label building (JSONL parse + DST + labels, no tokenizer),
(2) frames/s of lazy frame reads (Arrow slice + base64 JPEG decode) in windows, and (3) the peak
memory of reading one fixed window from a short and from a long video, each in a fresh process:
Python allocations (tracemalloc), Arrow's native memory pool, and the process's resident-set
growth (native buffers, decoded images and the memory-mapped pages touched). The ratios must stay
near 1 (memory follows the frames read, not the video length).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_result  # noqa: E402
from dst_train.data.dataset import SPLITS, DatasetPaths, load_split  # noqa: E402
from dst_train.data.proassist import FrameReader, read_prepared  # noqa: E402
from dst_train.data.synthetic import DemoSpec, make_demo_data  # noqa: E402


def long_spec(videos: int, smoke: bool) -> DemoSpec:
    if smoke:
        return DemoSpec(videos=videos, action_frames=(20, 30), gap_frames=(2, 6), image_size=32)
    # 27 actions of 100-200 frames: >= 2 970 frames (25+ minutes at 2 fps) per video
    return DemoSpec(
        videos=videos,
        steps=(3, 3),
        substeps=(3, 3),
        actions=(3, 3),
        action_frames=(100, 200),
        gap_frames=(10, 40),
        image_size=64,
    )


def bench_labels(root: Path, repeats: int) -> dict:
    clips = frames = 0
    t0 = time.perf_counter()
    for _ in range(repeats):
        for split in SPLITS:
            for labels in load_split(root, split):
                clips += 1
                frames += labels.num_frames
    dt = time.perf_counter() - t0
    return {
        "stage": "labels",
        "clips": clips,
        "frames": frames,
        "seconds": dt,
        "clips_per_s": clips / dt,
        "frames_per_s": frames / dt,
    }


def bench_frames(root: Path, window: int) -> dict:
    frames = 0
    t0 = time.perf_counter()
    for path in DatasetPaths.from_root(root).prepared:
        for clip in read_prepared(path):
            reader = FrameReader(root / clip.frames_file)
            for a in range(clip.start_frame_idx, clip.end_frame_idx, window):
                frames += len(reader.images(a, min(a + window, clip.end_frame_idx)))
    dt = time.perf_counter() - t0
    return {"stage": "frame reads", "frames": frames, "seconds": dt, "frames_per_s": frames / dt}


def window_peaks(arrow: Path, window: int) -> dict:
    """Peaks of opening ``arrow`` and decoding one window from its middle, in this process:
    Python allocations, Arrow's pool, resident-set growth over the state before (bytes)."""
    import pyarrow as pa

    rss_before = _rss_peak()
    tracemalloc.start()
    reader = FrameReader(arrow)
    mid = len(reader) // 2
    reader.images(mid, mid + window)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "python": python_peak,
        "arrow_pool": pa.default_memory_pool().max_memory(),
        "rss_growth": _rss_peak() - rss_before,
    }


def _rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def window_peaks_fresh(arrow: Path, window: int) -> dict:
    """:func:`window_peaks` in a fresh process (one process's earlier reads would hide it)."""
    cmd = [sys.executable, __file__, "--child-window", str(arrow), "--window", str(window)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--window", type=int, default=32, help="frames per read")
    ap.add_argument("--repeats", type=int, default=3, help="passes of label building")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--child-window", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_window:
        print(json.dumps(window_peaks(Path(args.child_window), args.window)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        long_root, short_root = Path(tmp) / "long", Path(tmp) / "short"
        make_demo_data(long_root, seed=1, spec=long_spec(args.videos, args.smoke))
        make_demo_data(
            short_root,
            seed=1,
            spec=DemoSpec(videos=3, image_size=long_spec(1, args.smoke).image_size),
        )
        clips = [c for p in DatasetPaths.from_root(long_root).prepared for c in read_prepared(p)]
        rows = [bench_labels(long_root, args.repeats), bench_frames(long_root, args.window)]
        long_arrow = max(
            (long_root / c.frames_file for c in clips), key=lambda p: len(FrameReader(p))
        )
        short_arrow = next((short_root / "frames").glob("*.arrow"))
        short = window_peaks_fresh(short_arrow, args.window)
        long = window_peaks_fresh(long_arrow, args.window)
        mem = {
            "window": args.window,
            "short_video_frames": len(FrameReader(short_arrow)),
            "long_video_frames": len(FrameReader(long_arrow)),
        }
        for kind in ("python", "arrow_pool", "rss_growth"):
            mem[f"short_{kind}_kib"] = short[kind] / 1024
            mem[f"long_{kind}_kib"] = long[kind] / 1024
            mem[f"{kind}_long_over_short"] = long[kind] / max(short[kind], 1)
        frames_per_video = [c.num_frames for c in clips]
    print(table(rows, ["stage", "clips", "frames", "seconds", "clips_per_s", "frames_per_s"]))
    print()
    print(table([mem], list(mem)))
    path = write_result(
        "data_pipeline_smoke" if args.smoke else "data_pipeline",
        {"frames_per_video": frames_per_video, "throughput": rows, "memory": mem},
        Path(args.out) if args.out else None,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
