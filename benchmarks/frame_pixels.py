"""Frame pixels in the loader: the processor's fp32 pixels vs 8-bit pixels the model normalizes.

    python benchmarks/frame_pixels.py            # 384-px frames, smolvlm2-2.2b and qwen2.5-vl-3b
    python benchmarks/frame_pixels.py --smoke    # tiny, for the tests

The frames of a demo video made at ``--size`` px (base64 JPEG in Arrow, as ProAssist stores them)
are read and turned into the pixels a loader worker hands on, for each family's processor at its
real frame size, two ways: ``processor(images)`` — fp32, rescaled and normalized on the host, what
the workers made before — and ``processor.pixels(images)`` — uint8, what they make now; the model
normalizes those on its device (``normalize_pixels``, timed here on this machine's device). Per
frame, in one process: worker milliseconds (JPEG decode included), bytes handed on (worker →
collate → GPU), the normalization's milliseconds; then frames/s through a DataLoader with
``--workers`` workers, the hand-over to the training process included. The two must give equal
normalized pixels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import table, write_result  # noqa: E402

ARCHS = ("smolvlm2-2.2b", "qwen2.5-vl-3b")


def _best_seconds(fn, repeats: int):
    """(fastest wall seconds over ``repeats`` runs, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


class FrameWindows(torch.utils.data.Dataset):
    """Windows of frames of one video, each read and made into pixels by ``make`` (the
    processor's ``__call__`` or ``pixels``) in a loader worker."""

    def __init__(self, path: Path, spans: list[tuple[int, int]], make):
        self.path, self.spans, self.make, self.reader = path, spans, make, None

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> torch.Tensor:
        from dst_train.data.proassist import FrameReader

        self.reader = self.reader or FrameReader(self.path)  # one per worker
        return self.make(self.reader.images(*self.spans[i]))


def loader_rate(path: Path, spans, make, workers: int, repeats: int) -> tuple[float, float]:
    """(frames/s, bytes handed over per frame) through a DataLoader with ``workers`` workers
    (decode, pixels, and the hand-over to the training process through shared memory), worker
    start included."""

    def run() -> tuple[int, int]:
        ds = FrameWindows(path, spans, make)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        got = [(len(x), x.numel() * x.element_size()) for x in loader]
        return sum(n for n, _ in got), sum(b for _, b in got)

    seconds, (frames, nbytes) = _best_seconds(run, repeats)
    return frames / seconds, nbytes / frames


def measure(arch: str, proc, reader, args) -> list[dict]:
    from dst_train.model.backbone import normalize_pixels, pixel_table

    frames, chunk, repeats = args.frames, args.chunk, args.repeats
    spans = [(a, min(a + chunk, frames)) for a in range(0, frames, chunk)]
    old_s, old = _best_seconds(lambda: [proc(reader.images(*s)) for s in spans], repeats)
    new_s, new = _best_seconds(lambda: [proc.pixels(reader.images(*s)) for s in spans], repeats)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table_ = pixel_table(proc)
    on_device = [p.to(device) for p in new]

    def normalize():
        out = [normalize_pixels(p, table_) for p in on_device]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    norm_s, normed = _best_seconds(normalize, repeats)
    equal = all(torch.equal(a, b.cpu()) for a, b in zip(old, normed, strict=True))
    common = {"arch": arch, "frame_size": proc.image_size, "frames": frames, "equal": equal}
    rates = [
        loader_rate(reader.path, spans * args.passes, make, args.workers, repeats)
        for make in (proc, proc.pixels)
    ]
    return [
        {
            **common,
            "pixels": "fp32 (processor)",
            "worker_ms_per_frame": 1e3 * old_s / frames,
            "bytes_per_frame": old[0][0].numel() * old[0].element_size(),
            "device_ms_per_frame": 0.0,
            "loader_frames_per_s": rates[0][0],
            "loader_bytes_per_frame": rates[0][1],
        },
        {
            **common,
            "pixels": "uint8 (model normalizes)",
            "worker_ms_per_frame": 1e3 * new_s / frames,
            "bytes_per_frame": new[0][0].numel() * new[0].element_size(),
            "device_ms_per_frame": 1e3 * norm_s / frames,
            "loader_frames_per_s": rates[1][0],
            "loader_bytes_per_frame": rates[1][1],
        },
    ]


def processors(archs: list[str]) -> list[tuple[str, object]]:
    from dst_train.model.backbone import arch_config, family

    out = []
    for arch in archs:
        config = arch_config(arch)
        out.append((arch, family(config.model_type).frame_processor(config)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=384, help="stored frame pixels (square)")
    ap.add_argument("--frames", type=int, default=256, help="frames read per way")
    ap.add_argument("--chunk", type=int, default=64, help="frames per processor call")
    ap.add_argument("--repeats", type=int, default=2, help="fastest of this many runs")
    ap.add_argument("--workers", type=int, default=2, help="loader workers")
    ap.add_argument("--passes", type=int, default=3, help="times the loader reads the frames")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    archs = ["tiny"] if args.smoke else list(ARCHS)
    if args.smoke:
        args.size, args.frames, args.chunk, args.repeats, args.workers = 32, 24, 8, 1, 1
    from dst_train.data.dataset import load_split
    from dst_train.data.proassist import FrameReader
    from dst_train.data.synthetic import DemoSpec, make_demo_data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data(Path(tmp), seed=1, spec=DemoSpec(videos=1, image_size=args.size))
        clip = load_split(Path(tmp), "train")[0].clip
        reader = FrameReader(Path(tmp) / clip.frames_file)
        args.frames = min(args.frames, len(reader))
        for arch, proc in processors(archs):
            rows += measure(arch, proc, reader, args)
    columns = ["arch", "frame_size", "pixels", "worker_ms_per_frame", "bytes_per_frame"]
    print(table(rows, [*columns, "device_ms_per_frame", "loader_frames_per_s", "equal"]))
    ratios = {
        rows[k]["arch"]: {
            "worker_time_uint8_over_fp32": rows[k + 1]["worker_ms_per_frame"]
            / rows[k]["worker_ms_per_frame"],
            "bytes_uint8_over_fp32": rows[k + 1]["bytes_per_frame"] / rows[k]["bytes_per_frame"],
            "loader_rate_uint8_over_fp32": rows[k + 1]["loader_frames_per_s"]
            / rows[k]["loader_frames_per_s"],
        }
        for k in range(0, len(rows), 2)
    }
    print(ratios)
    path = write_result(
        "frame_pixels_smoke" if args.smoke else "frame_pixels",
        {"settings": vars(args), "rows": rows, "ratios": ratios},
        Path(args.out) if args.out else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
