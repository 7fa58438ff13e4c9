"""``dst-train score``: ProAssist's speaking and text metrics for any system's output.

Input: a JSONL file, one object per video::

    {"video_uid": str, "fps": 2.0, "dataset": "assembly101",
     "predictions": [{"time": seconds, "text": str}, ...],
     "references":  [{"time": seconds, "text": str}, ...]}

A turn at ``t`` seconds sits on frame ``int(t * fps)``; a video has frames 0 … its last turn's;
text ``""`` is silence. Two turns of one side on one frame (ProAssist's stream cannot hold that)
are joined with a space. The window is ProAssist's for the video's ``dataset``. Metrics are
corpus level over the file's videos (matches pooled, then the formulas of
:mod:`dst_train.eval.speaking`), text metrics on the correct matches
(:mod:`dst_train.eval.text_metrics`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dst_train.atomic_io import write_text_atomic
from dst_train.eval.speaking import (
    SIM_THRESHOLD,
    MatchResult,
    frame_of,
    match_turns,
    speaking_scores,
    window_frames,
)
from dst_train.eval.text_metrics import caption_scores

# what `score --json` and evaluate report for speaking, in this order
SCORE_KEYS = (
    "speak_precision",
    "speak_recall",
    "speak_f1",
    "jaccard",
    "missing_rate",
    "redundant_rate",
    "semantic_similarity",
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
    "meteor",
    "cider",
)


class ScoreInputError(ValueError):
    """A score file that is not in the format above; the message names file, line and field."""


@dataclass
class VideoTurns:
    """One video's frames: generated and reference text per frame ("" = silent)."""

    video_uid: str
    fps: float
    dataset: str
    gen: list[str]
    ref: list[str]


def read_score_file(path: str | Path) -> list[VideoTurns]:
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ScoreInputError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ScoreInputError(f"{path}: not UTF-8 (byte {e.start})") from None
    videos = []
    for n, line in enumerate(raw.split("\n"), start=1):
        if line.strip():
            videos.append(_video(line, f"{path}:{n}"))
    if not videos:
        raise ScoreInputError(f"{path}: no video records")
    return videos


def _video(line: str, where: str) -> VideoTurns:
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ScoreInputError(f"{where}: not a JSON object: {e}") from None
    if not isinstance(obj, dict):
        raise ScoreInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("video_uid", "fps", "dataset", "predictions", "references"):
        if key not in obj:
            raise ScoreInputError(f"{where}: missing key {key!r}")
    uid, dataset = obj["video_uid"], obj["dataset"]
    for key, val in (("video_uid", uid), ("dataset", dataset)):
        if not isinstance(val, str):
            raise ScoreInputError(f"{where}: field {key}: expected a string, got {val!r:.60}")
    fps = _number(obj["fps"], where, "fps")
    if fps <= 0:
        raise ScoreInputError(f"{where}: field fps: must be > 0, got {fps}")
    sides = {}
    for side in ("predictions", "references"):
        sides[side] = _turns(obj[side], fps, where, side)
    n = 1 + max((f for turns in sides.values() for f in turns), default=-1)
    gen, ref = ([turns.get(i, "") for i in range(n)] for turns in sides.values())
    return VideoTurns(uid, fps, dataset, gen, ref)


MAX_FRAMES = 10_000_000  # ~58 days at 2 fps: beyond it a time is a mistake, not a video


def _turns(turns, fps: float, where: str, side: str) -> dict[int, str]:
    if not isinstance(turns, list):
        raise ScoreInputError(f"{where}: field {side}: expected a list, got {turns!r:.60}")
    by_frame: dict[int, str] = {}
    for k, turn in enumerate(turns):
        field = f"{side}[{k}]"
        if not isinstance(turn, dict):
            raise ScoreInputError(f"{where}: field {field}: expected an object, got {turn!r:.60}")
        for key in ("time", "text"):
            if key not in turn:
                raise ScoreInputError(f"{where}: field {field}: missing key {key!r}")
        t = _number(turn["time"], where, f"{field}.time")
        if t < 0:
            raise ScoreInputError(f"{where}: field {field}.time: negative ({t})")
        if not isinstance(turn["text"], str):
            raise ScoreInputError(f"{where}: field {field}.text: expected a string")
        frame = frame_of(t, fps)
        if frame > MAX_FRAMES:
            raise ScoreInputError(f"{where}: field {field}.time: {t} s is frame {frame}, too far")
        if turn["text"]:
            old = by_frame.get(frame)
            by_frame[frame] = f"{old} {turn['text']}" if old else turn["text"]
    return by_frame


def _number(val, where: str, field: str) -> float:
    # bool is an int subclass in Python, but JSON true is not a time
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise ScoreInputError(f"{where}: field {field}: expected a number, got {val!r:.60}")
    if not math.isfinite(val):
        raise ScoreInputError(f"{where}: field {field}: not finite ({val})")
    return float(val)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number in JSON")


def match_videos(videos: list[VideoTurns], similarity, keep_zero_cost: bool):
    return [
        match_turns(v.gen, v.ref, similarity, window_frames(v.dataset, v.fps), keep_zero_cost)
        for v in videos
    ]


def score_matches(videos: list[VideoTurns], matches: list[MatchResult]) -> dict:
    """Speaking + text metrics of matched videos (corpus level)."""
    scores = speaking_scores(matches)
    pairs = [
        (v.gen[i], v.ref[j])
        for v, m in zip(videos, matches, strict=True)
        for i, j, s in m.matched
        if s > SIM_THRESHOLD
    ]
    return scores | caption_scores(pairs, jaccard=scores["jaccard"])


def score_videos(videos: list[VideoTurns], similarity, keep_zero_cost: bool = False) -> dict:
    return score_matches(videos, match_videos(videos, similarity, keep_zero_cost))


def time_of(frame: int, fps: float) -> float:
    """The start time of ``frame`` that :func:`frame_of` maps back to it exactly."""
    t = frame / fps
    while frame_of(t, fps) < frame:  # frame / fps * fps can fall one ulp short
        t = math.nextafter(t, math.inf)
    return t


def write_score_file(videos: list[VideoTurns], path: Path) -> None:
    """The score format of ``videos`` (a turn at frame f gets time f / fps)."""
    lines = []
    for v in videos:
        side = {
            key: [{"time": time_of(f, v.fps), "text": t} for f, t in enumerate(texts) if t]
            for key, texts in (("predictions", v.gen), ("references", v.ref))
        }
        lines.append(
            json.dumps({"video_uid": v.video_uid, "fps": v.fps, "dataset": v.dataset, **side})
        )
    write_text_atomic(path, "".join(x + "\n" for x in lines))
