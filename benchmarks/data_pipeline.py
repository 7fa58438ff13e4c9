"""Data-pipeline throughput: label building and lazy frame reads on long videos.

    python benchmarks/data_pipeline.py            # 4 videos of >= 2000 frames each
    python benchmarks/data_pipeline.py --smoke    # tiny, for the tests

Measures (1) clips/s and frames/s of label building (JSONL parse + DST + labels, no tokenizer),
(2) frames/s of lazy frame reads (Arrow slice + base64 JPEG decode) in windows, and (3) the peak
Python memory of reading one fixed window from a short and from a long video: the ratio must stay
near 1 (memory follows the frames read, not the video length).
"""

from __future__ import annotations

import argparse
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


def window_peak_bytes(arrow: Path, window: int) -> int:
    """Peak Python allocation while opening ``arrow`` and decoding one window from its middle."""
    tracemalloc.start()
    reader = FrameReader(arrow)
    mid = len(reader) // 2
    reader.images(mid, mid + window)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--window", type=int, default=32, help="frames per read")
    ap.add_argument("--repeats", type=int, default=3, help="passes of label building")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
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
        mem = {
            "window": args.window,
            "short_video_frames": len(FrameReader(short_arrow)),
            "long_video_frames": len(FrameReader(long_arrow)),
            "short_peak_kib": window_peak_bytes(short_arrow, args.window) / 1024,
            "long_peak_kib": window_peak_bytes(long_arrow, args.window) / 1024,
        }
        mem["long_over_short"] = mem["long_peak_kib"] / mem["short_peak_kib"]
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
