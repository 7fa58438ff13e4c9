"""Streaming inference throughput: one clip at a time vs several clips per batch.

    python benchmarks/streaming.py --model runs/demo/hf --data runs/demo/data   # after make demo
    python benchmarks/streaming.py --smoke                                      # tiny, for tests

Streams the same clips with ``batch_size`` 1, 2, 4, ... (one clip per batch row, a freed row
takes the next clip) and reports frames/s and the speed-up over batch 1 measured in the same run:
after an untimed warm-up, ``--repeats`` rounds with the sizes interleaved (order reversed each
round), the median per size. The JSON is written after every timed pass (``complete`` says
whether all ran: a run cut short keeps what it measured), and the log says where the time went.
``--max-frames`` streams each clip's first frames only (a GPU lease's minutes).
It also checks that batching does not change what the model does: the share of frames whose
response, DST text and tracked state equal batch 1's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import table, write_result  # noqa: E402
from dst_train.data.dataset import DatasetPaths, dst_path, load_split  # noqa: E402
from dst_train.data.dst_tree import load_dst_tsv  # noqa: E402
from dst_train.data.sequence import SequenceBuilder  # noqa: E402
from dst_train.infer.stream import StreamingAssistant, StreamJob  # noqa: E402
from dst_train.model.backbone import load_image_processor, load_tokenizer  # noqa: E402
from dst_train.model.frames import FramePixels  # noqa: E402


def smoke_model(tmp: Path) -> tuple[Path, Path]:
    """A tiny random model folder (varied heads) and 8 short demo videos."""
    from dst_train.data.synthetic import DemoSpec, make_demo_data
    from dst_train.model.tiny import demo_corpus, make_tiny_model

    data = tmp / "data"
    make_demo_data(data, seed=1, spec=DemoSpec(videos=8, steps=(1, 1), image_size=32))
    arch = make_tiny_model(tmp / "tiny", demo_corpus(data), seed=0)
    return random_model(arch, data, tmp / "hf"), data


def random_model(arch: Path, data: Path, folder: Path, dtype: str = "fp32") -> Path:
    """A converted-model folder of random weights for ``arch`` (a model folder; its weights, if
    any, are not used), with heads that vary per frame (untrained heads are constant). Built on
    the GPU when there is one (2 B random parameters take minutes on a CPU)."""
    from dst_train.config import load_config
    from dst_train.model.build import Precision, build_model

    cfg = load_config(None, [f"data.root={data}", f"model.arch={arch}", "model.pretrained=false"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = build_model(cfg.model, cfg.head_config(), Precision(dtype, "sdpa"))
    for head in (model.speak_head, model.update_head):
        torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    model.backbone.hf.save_pretrained(folder)
    model.save_heads(folder)
    load_tokenizer(str(arch)).save_pretrained(folder)
    load_image_processor(str(arch)).save_pretrained(folder)
    return folder


def jobs_for(data: Path, split: str, processor, clips: int, max_frames: int = 0) -> list[StreamJob]:
    """The first ``clips`` clips of ``split``, each cut to its first ``max_frames`` frames (0:
    whole)."""
    source = FramePixels(data, processor)
    dst_dir = DatasetPaths.from_root(data).dst_dir
    jobs = []
    for labels in load_split(data, split)[:clips]:
        if max_frames:
            c = labels.clip
            end = min(c.end_frame_idx, c.start_frame_idx + max_frames)
            labels = dataclasses.replace(labels, clip=dataclasses.replace(c, end_frame_idx=end))
        tsv = dst_path(dst_dir, labels.clip.video_uid) if dst_dir else None
        tree = load_dst_tsv(tsv) if tsv is not None and tsv.is_file() else None

        def frames(ids, _file=labels.clip.frames_file):
            return {"pixel_values": source.load(_file, ids)}

        jobs.append(StreamJob(labels, tree, frames))
    return jobs


def rows_of(jobs: list[StreamJob], sizes: list[int], seconds: dict, outputs: dict) -> list[dict]:
    """One row per batch size timed so far: the median of its passes, and how its traces
    compare with batch 1's (None until batch 1 has run)."""
    frames = sum(j.labels.clip.end_frame_idx - j.labels.clip.start_frame_idx for j in jobs)
    base = sizes[0]
    base_dt = statistics.median(seconds[base]) if seconds[base] else None
    rows = []
    for batch in (b for b in sizes if seconds[b]):
        dt, flat = statistics.median(seconds[batch]), outputs[batch]
        same_share = None
        if base in outputs:
            same_share = sum(map(same, flat, outputs[base])) / len(flat)
        rows.append(
            {
                "batch_size": batch,
                "clips": len(jobs),
                "frames": frames,
                "seconds": dt,
                "frames_per_s": frames / dt,
                "speedup_over_batch1": base_dt / dt if base_dt else None,
                "responses": sum(bool(t.response) for t in flat),
                "dst_updates": sum(bool(t.dst_text) for t in flat),
                "same_as_batch1": same_share,
            }
        )
    return rows


def same(a, b) -> bool:
    return (a.response, a.dst_text, a.state) == (b.response, b.dst_text, b.state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="converted model folder (default: runs/demo/hf)")
    p.add_argument(
        "--random-arch", type=Path, help="instead: random weights of this model folder's shapes"
    )
    p.add_argument("--data", help="dataset root (default: runs/demo/data)")
    p.add_argument("--split", default="test")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes to compare (1 is the base)")
    p.add_argument("--speak-threshold", type=float, default=0.5)
    p.add_argument("--update-threshold", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--device", default="auto", help="auto (GPU if visible), cpu, cuda[:N]")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--smoke", action="store_true", help="tiny random model, short clips")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    p.add_argument("--name", help="result file name (default streaming[_smoke])")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per size (median kept)")
    p.add_argument(
        "--max-frames", type=int, default=0, help="stream each clip's first N frames (0: all)"
    )
    args = p.parse_args()
    from dst_train.model.dst_model import DSTModel
    from dst_train.model.precision import DTYPES
    from dst_train.ranks import inference_device

    clock = time.perf_counter()

    def progress(what: str) -> None:  # the log says where the time went (a stage may time out)
        print(f"{time.perf_counter() - clock:7.1f} s  {what}", flush=True)

    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        model_dir, data = smoke_model(Path(tmp.name))
        args.clips, args.batches, args.max_new_tokens, args.repeats = 4, "1,4", 4, 2
        args.split, args.speak_threshold, args.update_threshold = "train", 0.7, 0.7
    else:
        data = Path(args.data or "runs/demo/data")
        model_dir = Path(args.model or "runs/demo/hf")
        if args.random_arch:
            model_dir = random_model(args.random_arch, data, Path(tmp.name) / "hf", args.dtype)
    progress(f"model folder ready: {model_dir}")
    torch.manual_seed(0)
    device = inference_device(args.device)
    model = DSTModel.from_pretrained(model_dir, dtype=DTYPES[args.dtype]).to(device).eval()
    tok = load_tokenizer(str(model_dir))
    builder = SequenceBuilder(
        tok, model.backbone.chat, model.backbone.image_token_id, model.backbone.tokens_per_frame
    )
    assistant = StreamingAssistant(
        model,
        tok,
        builder,
        args.speak_threshold,
        args.update_threshold,
        max_new_tokens=args.max_new_tokens,
        device=device,
    )
    processor = load_image_processor(str(model_dir))
    jobs = jobs_for(data, args.split, processor, args.clips, args.max_frames)
    progress(f"model on {device}; {len(jobs)} clips")
    sizes = [int(b) for b in args.batches.split(",")]
    assistant.run_many(jobs[:1], batch_size=1)  # warm-up: kernels, allocator, caches (untimed)
    progress("warm-up clip streamed")
    seconds = {b: [] for b in sizes}
    outputs = {}
    name = args.name or ("streaming_smoke" if args.smoke else "streaming")
    for r in range(args.repeats):  # interleaved, the order reversed every round: drift in
        for batch in sizes if r % 2 == 0 else sizes[::-1]:  # clocks or heat hits all sizes
            t0 = time.perf_counter()
            traces = assistant.run_many(jobs, batch_size=batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[batch].append(time.perf_counter() - t0)
            outputs[batch] = [t for clip in traces for t in clip]
            progress(f"round {r + 1}/{args.repeats}, batch {batch}: {seconds[batch][-1]:.1f} s")
            # written after every timed pass: a run cut short keeps the passes that ran
            rows = rows_of(jobs, sizes, seconds, outputs)
            done = r == args.repeats - 1 and len(rows) == len(sizes)
            path = write_result(
                name,
                {
                    "model": str(model_dir),
                    "split": args.split,
                    "ran_on": str(device),  # "device" is the machine (common.environment)
                    "dtype": args.dtype,
                    "max_frames": args.max_frames,
                    "rounds_done": r + int(done),
                    "complete": done,
                    "rows": rows,
                },
                args.out,
            )
    print(table(rows, list(rows[0])))
    print(path)
    tmp.cleanup()


if __name__ == "__main__":
    main()
