"""``dst-train evaluate``: thresholds on val, streaming on test, ProAssist + DST metrics, report.

1. Thresholds: one teacher-forced pass over the val split gives every frame's speak/update
   probability; the threshold maximising frame-level F1 is chosen per head (cheap: no decoding).
2. Streaming: every test clip runs through :class:`StreamingAssistant` with those thresholds; the
   per-frame trace is written to ``OUT/traces/<video>_<clip>.jsonl`` (with ``settings.json``:
   what the traces depend on, checked by ``--resume``).
3. Metrics (speaking, text, DST), ``report.json``, ``report.md``, plots; with ``--baseline`` the
   same for an untrained model of the same architecture (its thresholds chosen the same way).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dst_train.atomic_io import write_text_atomic
from dst_train.eval.dst_metrics import dst_scores
from dst_train.eval.report import REPORT_KEYS
from dst_train.eval.score import VideoTurns, score_videos, write_score_file
from dst_train.eval.speaking import SentenceSimilarity
from dst_train.model.precision import DTYPES
from dst_train.ranks import Ranks

THRESHOLDS = [round(x, 2) for x in np.arange(0.05, 0.96, 0.05)]


CPU = torch.device("cpu")


def load_models(
    model_dir: Path,
    baseline: bool,
    seed: int = 0,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
):
    from dst_train.config import ModelConfig
    from dst_train.model.build import Precision, build_model
    from dst_train.model.dst_model import DSTModel

    models = {"model": DSTModel.from_pretrained(model_dir, dtype=dtype).to(device)}
    if baseline:
        torch.manual_seed(seed)
        cfg = models["model"].cfg
        untrained = build_model(
            ModelConfig(
                arch=str(model_dir),
                pretrained=False,
                tokens_per_frame=cfg.tokens_per_frame,
                head_hidden=cfg.head_hidden,
            ),
            cfg,
            Precision("fp32", "sdpa"),
        )
        models["baseline"] = untrained.to(device, dtype)
    return models


@torch.no_grad()
def frame_probabilities(
    model, dataset, collate, device: torch.device = CPU, ranks: Ranks | None = None
) -> dict[str, np.ndarray]:
    """Teacher-forced speak/update probabilities and labels of every frame of ``dataset``; the
    update label is -1 on the frames of a video without DST annotation (the batch's 0 there
    only fills a slot that has no loss weight). With several ``ranks`` each scores its share of
    the samples and every rank gets all frames (in another order: what is read of them, the
    thresholds' counts, does not depend on it)."""
    ranks = ranks or Ranks()
    model.eval()
    out = {"speak_p": [], "update_p": [], "speak": [], "update": []}
    for i in ranks.share(list(range(len(dataset)))):
        item = dataset[i]
        batch = collate([item])
        res = model(**{k: v.to(device) for k, v in batch.items()})
        for head in ("speak", "update"):
            out[f"{head}_p"].append(torch.sigmoid(res[f"{head}_logits"].float()).cpu().numpy())
        out["speak"].append(batch["speak"].numpy())
        out["update"].append(np.array(item["sample"].update, dtype=np.int64))
    out = {k: [a for part in ranks.gather(v) for a in part] for k, v in out.items()}
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def sweep(probs: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Precision, recall and F1 at each of ``THRESHOLDS``; frames labelled -1 (unknown: a video
    without DST, whose updates streaming never decodes) are left out."""
    known = labels >= 0
    probs, labels = probs[known], labels[known]
    rows = []
    for t in THRESHOLDS:
        pred = probs > t
        tp = int((pred & (labels == 1)).sum())
        p = tp / pred.sum() if pred.sum() else 0.0
        r = tp / (labels == 1).sum() if (labels == 1).sum() else 0.0
        rows.append(
            {
                "threshold": t,
                "precision": p,
                "recall": r,
                "f1": 2 * p * r / (p + r) if p + r else 0.0,
            }
        )
    return rows


def best_threshold(rows: list[dict]) -> float:
    return max(rows, key=lambda r: (r["f1"], -abs(r["threshold"] - 0.5)))["threshold"]


class StaleTraces(ValueError):
    """``--resume`` found traces made with other settings, or a trace file it cannot read."""


SETTINGS_FILE = "settings.json"


def trace_file(trace_dir: Path, clip) -> Path:
    return trace_dir / f"{clip.video_uid}_{clip.clip_idx}.jsonl"


def finished_traces(trace_dir: Path, settings: dict, labels_list) -> dict[int, list]:
    """Traces of an earlier run with the same ``settings`` (clip index → traces), for
    ``--resume``; raises :class:`StaleTraces` naming the setting that changed, or the file
    and line that is not a trace."""
    path = trace_dir / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: not written by us
        raise StaleTraces(
            f"{path}: unreadable ({e}); remove the folder or run without --resume"
        ) from None
    changed = [k for k in settings if old.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise StaleTraces(
            f"{trace_dir}: traces were made with {k}={old.get(k)!r}, this run has "
            f"{settings[k]!r}; remove the folder or run without --resume"
        )
    found = {}
    for i, labels in enumerate(labels_list):
        f = trace_file(trace_dir, labels.clip)
        if f.is_file():  # written atomically: a file there is a whole clip
            found[i] = [_trace(f, n, x) for n, x in enumerate(f.read_text().splitlines(), 1)]
    return found


def _trace(path: Path, line: int, text: str):
    """One line of a trace file as a FrameTrace; StaleTraces naming ``path:line`` if it is not
    one (edited by hand, or written by another version)."""
    from dst_train.infer.stream import FrameTrace

    try:
        return FrameTrace(**json.loads(text))
    except (ValueError, TypeError) as e:  # bad JSON, not an object, unknown or missing keys
        raise StaleTraces(
            f"{path}:{line}: not a trace record ({e}); remove the file or run without --resume"
        ) from None


def run_split(
    model,
    tokenizer,
    builder,
    labels_list,
    trees,
    frame_source,
    thresholds: dict,
    max_context: int,
    max_new_tokens: int,
    trace_dir: Path | None,
    stream_batch: int,
    device: torch.device,
    settings: dict,
    resume: bool,
    ranks: Ranks | None = None,
) -> tuple[list[dict], list[int]]:
    """Stream every clip of ``labels_list`` (``stream_batch`` at once) and write each trace to
    ``trace_dir/<video>_<clip>.jsonl`` as its clip finishes, next to ``settings.json`` (what the
    traces depend on). With ``resume``, clips whose trace an earlier run with the same settings
    wrote are read back instead of streamed. With several ``ranks`` each streams its share of
    the clips and every rank gets every clip's traces. Returns (one dict per clip: labels, tree,
    traces; the clips each rank streamed)."""
    from dst_train.infer.stream import StreamingAssistant, StreamJob

    ranks = ranks or Ranks()
    done_before = finished_traces(trace_dir, settings, labels_list) if resume and trace_dir else {}
    ranks.barrier()  # every rank has read what it resumes from before the folder is rewritten
    if trace_dir is not None and ranks.main:
        trace_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run owns the folder: no trace of other settings may stay behind
            for old in (*trace_dir.glob("*.jsonl"), *trace_dir.glob("*.jsonl.tmp")):
                old.unlink()
        write_text_atomic(trace_dir / SETTINGS_FILE, json.dumps(settings, indent=2))
    ranks.barrier()

    assistant = StreamingAssistant(
        model,
        tokenizer,
        builder,
        thresholds["speak"],
        thresholds["update"],
        max_context=max_context,
        max_new_tokens=max_new_tokens,
        device=device,
    )
    jobs = []
    for labels in labels_list:
        clip = labels.clip

        def frames(ids, _file=clip.frames_file):
            return {"pixel_values": frame_source.load(_file, ids)}

        jobs.append(StreamJob(labels, trees.get(clip.video_uid), frames))
    mine = ranks.share([i for i in range(len(jobs)) if i not in done_before])
    who = f" (rank 0 of {ranks.world})" if ranks.world > 1 else ""
    progress = tqdm(total=len(mine), desc="streaming" + who, unit="clip", disable=not ranks.main)

    def done(k: int, traces) -> None:
        progress.update()
        if trace_dir is not None:
            # atomic: a kill mid-write never leaves half a trace for --resume to read
            write_text_atomic(
                trace_file(trace_dir, jobs[mine[k]].labels.clip),
                "".join(json.dumps(t.to_dict()) + "\n" for t in traces),
            )

    streamed = assistant.run_many([jobs[i] for i in mine], batch_size=stream_batch, on_done=done)
    progress.close()
    parts = ranks.gather(dict(zip(mine, streamed, strict=True)))
    all_traces = done_before | {i: t for part in parts for i, t in part.items()}
    videos = [
        {"labels": job.labels, "tree": job.tree, "traces": all_traces[i]}
        for i, job in enumerate(jobs)
    ]
    return videos, [len(part) for part in parts]


def reference_text(labels, frame: int) -> str:
    """ProAssist's reference at absolute ``frame``: the first assistant turn after that frames
    block (user turns in between are inputs), a lone "." being silence."""
    text = labels.responses.get(frame, [""])[0]
    return "" if text.strip() == "." else text


def video_turns(v: dict) -> VideoTurns:
    """One streamed clip as the score format's frames (``dst-train score`` input)."""
    labels, traces = v["labels"], v["traces"]
    clip = labels.clip
    return VideoTurns(
        f"{clip.video_uid}_{clip.clip_idx}",
        clip.fps,
        clip.dataset,
        [t.response for t in traces],
        [reference_text(labels, labels.start + i) for i in range(len(traces))],
    )


def dst_inputs(v: dict) -> dict | None:
    labels, traces, tree = v["labels"], v["traces"], v["tree"]
    if tree is None:
        return None
    fps, s0 = labels.clip.fps, labels.start
    return {
        "pred_states": [t.state for t in traces],
        # the reference state after frame f is the state just before frame f + 1 starts
        "ref_states": [tree.state_before((t.frame + 1) / fps) for t in traces],
        "initial_state": labels.initial_state,
        "pred_updates": [i for i, t in enumerate(traces) if t.dst_valid is not None],
        "ref_updates": [f - s0 for f in labels.dst_updates],
        "valid": [bool(t.dst_valid) for t in traces if t.dst_valid is not None],
        "fps": fps,
    }


def score(
    videos: list[dict],
    similarity,
    keep_zero_cost: bool,
    predictions_file: Path | None = None,
) -> dict:
    """ProAssist speaking + text metrics (exactly as ``dst-train score`` on the same turns)
    and our DST metrics; ``predictions_file`` gets the turns in the score format."""
    turns = [video_turns(v) for v in videos]
    if predictions_file is not None:
        write_score_file(turns, predictions_file)
    dst = [d for d in map(dst_inputs, videos) if d is not None]
    return {**score_videos(turns, similarity, keep_zero_cost), **dst_scores(dst)}


def auto_max_new_tokens(tokenizer, labels_list) -> int:
    """1.25 × the longest reference turn (response or DST text) of ``labels_list``, in tokens:
    long enough for any right answer, and it bounds the cost of a model that never stops."""
    texts = [t for lb in labels_list for ts in lb.responses.values() for t in ts]
    texts += [t for lb in labels_list for t in lb.dst_updates.values()]
    longest = max(
        (len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts), default=48
    )
    return int(longest * 1.25) + 2


def _flat(scores: dict) -> dict:
    """The report's keys first, then every other number ``score`` gave."""
    return {k: scores.get(k) for k in REPORT_KEYS} | {
        k: v for k, v in scores.items() if k not in REPORT_KEYS
    }


def evaluate(
    model_dir: str | Path,
    data_root: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    baseline: bool = False,
    embedding_model: str | None = None,
    max_context: int = 4096,
    max_new_tokens: int | None = None,
    max_clips: int | None = None,
    baseline_clips: int | None = None,
    val_split: str = "val",
    stream_batch: int = 8,
    device: str = "auto",
    dtype: str = "fp32",
    resume: bool = False,
    keep_zero_cost: bool = False,
    ranks: Ranks | None = None,
) -> dict | None:
    """The whole evaluation (module docstring); returns the report. With several ``ranks`` (a
    launcher's processes, one per GPU: ``cli``), each streams its share of the clips on its own
    GPU and rank 0 scores, writes the report and returns it (the others return None)."""
    from dst_train.config import load_config
    from dst_train.data.collate import make_collate
    from dst_train.data.dataset import DatasetPaths, dst_path, load_split
    from dst_train.data.dst_tree import load_dst_tsv
    from dst_train.data.pipeline import make_dataset
    from dst_train.data.sequence import SequenceBuilder
    from dst_train.eval.report import write_report
    from dst_train.eval.speaking import resolve_embedding_model
    from dst_train.model.backbone import load_image_processor, load_tokenizer
    from dst_train.model.dst_model import check_model_folder
    from dst_train.model.frames import FramePixels

    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    # bad arguments fail here, before minutes of model loading and streaming
    model_dir, data_root = check_model_folder(model_dir), Path(data_root)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    counts = {
        "stream_batch": stream_batch,
        "max_context": max_context,
        "max_new_tokens": max_new_tokens,
        "max_clips": max_clips,
        "baseline_clips": baseline_clips,
    }
    for name, value in counts.items():
        if value is not None and value < 1:  # None: the default (auto tokens, every clip)
            raise ValueError(f"{name} must be >= 1, got {value}")
    dev = ranks.device(device)
    paths = DatasetPaths.from_root(data_root)
    for name in (split, val_split):
        paths.split_file(name)
    out = Path(out) if out else model_dir.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(model_dir))
    processor = load_image_processor(str(model_dir))
    embedding_model = resolve_embedding_model(embedding_model)
    similarity = SentenceSimilarity(embedding_model) if ranks.main else None  # rank 0 scores
    cfg = load_config(None, [f"data.root={data_root}", f"model.arch={model_dir}"])
    cfg.data.max_seq_len = max_context
    labels_list = load_split(data_root, split, cfg.data.span_policy)[:max_clips]
    # an untrained model speaks and updates at almost every frame, each time up to
    # max_new_tokens: it is by far the slowest row, so it may run on the first clips only
    baseline_clips = min(baseline_clips or len(labels_list), len(labels_list))
    max_new_tokens = max_new_tokens or auto_max_new_tokens(
        tokenizer, load_split(data_root, val_split, cfg.data.span_policy)
    )
    trees = {}
    for labels in labels_list:
        uid = labels.clip.video_uid
        tsv = dst_path(paths.dst_dir, uid) if paths.dst_dir else None
        if uid not in trees and tsv is not None and tsv.is_file():
            trees[uid] = load_dst_tsv(tsv, cfg.data.span_policy)
    source = FramePixels(data_root, processor)
    report = {
        "model_dir": str(model_dir),
        "data": str(data_root),
        "split": split,
        "videos": len({lb.clip.video_uid for lb in labels_list}),
        "clips": len(labels_list),
        "embedding_model": embedding_model,
        "max_new_tokens": max_new_tokens,
        "baseline_clips": baseline_clips if baseline else None,
        "stream_batch": stream_batch,
        "device": str(dev),
        "processes": ranks.world,
        "dtype": dtype,
        "keep_zero_cost_edges": keep_zero_cost,
    }
    for name, model in load_models(model_dir, baseline, device=dev, dtype=DTYPES[dtype]).items():
        model.eval()
        builder = SequenceBuilder(
            tokenizer,
            model.backbone.chat,
            model.backbone.image_token_id,
            model.backbone.tokens_per_frame,
            max_context,
        )
        cfg.model.tokens_per_frame = model.backbone.tokens_per_frame
        val = make_dataset(cfg, val_split, tokenizer, model.backbone, processor)
        collate = make_collate(tokenizer.pad_token_id, False)
        probs = frame_probabilities(model, val, collate, dev, ranks)
        curves = {h: sweep(probs[f"{h}_p"], probs[h]) for h in ("speak", "update")}
        thresholds = {h: best_threshold(c) for h, c in curves.items()}
        videos, per_rank = run_split(
            model,
            tokenizer,
            builder,
            labels_list if name == "model" else labels_list[:baseline_clips],
            trees,
            source,
            thresholds,
            max_context,
            max_new_tokens,
            out / "traces" if name == "model" else None,
            stream_batch,
            dev,
            settings={
                "model_dir": str(model_dir.resolve()),
                "data": str(data_root.resolve()),
                "split": split,
                "thresholds": thresholds,
                "max_context": max_context,
                "max_new_tokens": max_new_tokens,
                "dtype": dtype,
            },
            resume=resume,
            ranks=ranks,
        )
        report[("" if name == "model" else "baseline_") + "clips_per_process"] = per_rank
        if not ranks.main:
            continue
        key = "metrics" if name == "model" else "baseline_metrics"
        preds = out / ("predictions.jsonl" if name == "model" else "baseline_predictions.jsonl")
        report[key] = _flat(score(videos, similarity, keep_zero_cost, preds))
        if name == "model" and baseline and baseline_clips < len(labels_list):
            # the trained model on exactly the baseline's clips: the like-for-like comparison
            report["metrics_on_baseline_clips"] = _flat(
                score(videos[:baseline_clips], similarity, keep_zero_cost)
            )
        report[f"{name}_thresholds"] = thresholds
        report[f"{name}_threshold_curves"] = curves
        if name == "model":
            report["_videos"] = videos
    if not ranks.main:
        return None
    report["seconds"] = time.perf_counter() - t0
    write_report(report, out)
    report.pop("_videos", None)
    return report
