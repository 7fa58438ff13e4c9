"""Checks a dataset (prepared JSONL + frames + DST) and counts what it holds.

Used by ``dst-train validate-data``. Collects *every* problem rather than stopping at the first;
each message names the file and line (or record) and what is wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from dst_train.data.dataset import SPLITS
from dst_train.data.dst_tree import DSTTree, read_dst_tsv
from dst_train.data.labels import build_clip_labels
from dst_train.data.proassist import ClipRecord, DataFormatError, FrameReader, iter_prepared


@dataclass
class ValidationReport:
    clips: int = 0
    videos: int = 0
    frames: int = 0
    assistant_turns: int = 0
    user_turns: int = 0
    speak_frames: int = 0
    update_frames: int = 0
    dst_files: int = 0
    dst_nodes: int = 0
    dst_transitions: int = 0
    clips_per_split: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self, max_listed: int = 20) -> str:
        rate = lambda k: f"{k / self.frames:.1%}" if self.frames else "-"  # noqa: E731
        lines = [
            f"clips {self.clips}  videos {self.videos}  frames {self.frames}  "
            f"(per split: {self.clips_per_split or '-'})",
            f"turns: assistant {self.assistant_turns}  user {self.user_turns}",
            f"labels: speak frames {self.speak_frames} ({rate(self.speak_frames)})  "
            f"update frames {self.update_frames} ({rate(self.update_frames)})",
            f"DST: files {self.dst_files}  nodes {self.dst_nodes}  "
            f"transitions {self.dst_transitions}",
        ]
        for name, items in (("errors", self.errors), ("warnings", self.warnings)):
            lines.append(f"{name}: {len(items)}")
            lines += [f"  {m}" for m in items[:max_listed]]
            if len(items) > max_listed:
                lines.append(f"  ... and {len(items) - max_listed} more (see --json)")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def validate_dataset(
    prepared: list[Path],
    frames_root: Path | None = None,
    dst_dir: Path | None = None,
    dst_tsvs: list[Path] = (),
    check_frames: bool = True,
    span_policy: str = "repair",
    progress: bool = False,
    deep: bool = False,
) -> ValidationReport:
    """``deep`` decodes every frame each clip uses (once per frame); otherwise each clip's first
    and last frame. Either way every frame read is checked for Arrow corruption first."""
    rep = ValidationReport()
    trees = _load_trees(rep, dst_dir, list(dst_tsvs), span_policy)
    videos_in: dict[str, set[str]] = {}
    frames = _FrameFiles(frames_root, deep, progress)
    for path in prepared:
        errors: list[str] = []
        split = path.stem
        for clip in tqdm(
            iter_prepared(path, errors),
            desc=f"checking {path.name}",
            disable=not progress,
            unit="clip",
        ):
            rep.clips += 1
            rep.clips_per_split[split] = rep.clips_per_split.get(split, 0) + 1
            videos_in.setdefault(clip.video_uid, {}).setdefault(split, clip.source)
            _check_clip(rep, clip, trees, expect_dst=bool(trees) or dst_dir is not None)
            if check_frames:
                frames.check(rep, clip)
        rep.errors += errors
    rep.videos = len(videos_in)
    for uid, splits in sorted(videos_in.items()):
        if len(set(splits) & set(SPLITS)) > 1:
            where = ", ".join(f"{s} ({splits[s]})" for s in sorted(splits))
            rep.errors.append(
                f"video {uid!r} appears in several splits: {where} "
                "(splits must be disjoint by video)"
            )
    unused = sorted(set(trees) - set(videos_in))
    if unused and prepared:
        rep.warnings.append(f"{len(unused)} DST file(s) match no clip, e.g. {unused[0]!r}")
    return rep


def _load_trees(
    rep: ValidationReport, dst_dir: Path | None, tsvs: list[Path], span_policy: str
) -> dict[str, DSTTree]:
    if dst_dir is not None:
        if not dst_dir.is_dir():
            rep.errors.append(f"{dst_dir}: DST folder does not exist")
        else:
            tsvs = sorted(dst_dir.glob("*.tsv")) + tsvs
    trees = {}
    for tsv in tsvs:
        tree, issues = read_dst_tsv(tsv, span_policy)
        rep.dst_files += 1
        rep.errors += [str(i) for i in issues if i.severity == "error"]
        rep.warnings += [str(i) for i in issues if i.severity == "warning"]
        if tree is not None:
            trees[tsv.stem] = tree
            rep.dst_nodes += len(tree.nodes)
            rep.dst_transitions += len(tree.transitions())
    return trees


def _check_clip(
    rep: ValidationReport, clip: ClipRecord, trees: dict[str, DSTTree], expect_dst: bool
) -> None:
    where = clip.source
    tree = trees.get(clip.video_uid)
    if tree is None and expect_dst:
        rep.warnings.append(f"{where}: no DST annotation for video {clip.video_uid!r}")
    labels = build_clip_labels(clip, tree)
    rep.frames += clip.num_frames
    rep.speak_frames += sum(labels.speak)
    rep.update_frames += sum(labels.update or [])
    rep.user_turns += sum(t.role == "user" for t in clip.conversation)
    rep.assistant_turns += sum(t.role == "assistant" for t in clip.conversation)
    if labels.pre_frame_assistant_turns:
        rep.warnings.append(
            f"{where}: {labels.pre_frame_assistant_turns} assistant turn(s) before "
            "the first frame (no speak label)"
        )
    shown = {f for s in labels.segments if s.kind == "frames" for f in range(s.start, s.end)}
    if len(shown) != clip.num_frames:
        warning = f"{where}: frames turns cover {len(shown)} of the clip's {clip.num_frames} frames"
        # training sequences hold only the frames shown: a DST update elsewhere is never trained
        hidden = sorted(f for f in labels.dst_updates if f not in shown)
        if hidden:
            warning += f"; DST updates at frames {hidden} fall on no frame shown (never trained)"
        rep.warnings.append(warning)
    for seg in labels.segments:
        if seg.kind == "assistant" and seg.frame is not None and seg.time is not None:
            lo, hi = (seg.frame - 1) / clip.fps, (seg.frame + 2) / clip.fps  # ±1 frame
            if not lo <= seg.time < hi:
                rep.warnings.append(
                    f"{where}: assistant turn at {seg.time:g} s follows frame "
                    f"{seg.frame} ({seg.frame / clip.fps:g} s)"
                )


class _FrameFiles:
    """Opens each frames file once and decodes the frames clips use: the first and last of each
    clip, or with ``deep`` all of them (a bitmap per file keeps overlapping clips from decoding a
    frame twice)."""

    def __init__(self, root: Path | None, deep: bool = False, progress: bool = False):
        self.root = root
        self.deep = deep
        self.readers: dict[str, FrameReader | None] = {}
        self.decoded: dict[str, bytearray] = {}
        self.bar = tqdm(desc="decoding frames", unit="frame", disable=not (deep and progress))

    def check(self, rep: ValidationReport, clip: ClipRecord) -> None:
        if self.root is None:
            rep.errors.append(
                f"{clip.source}: no frames root given (use --frames-root or --no-frames)"
            )
            return
        reader = self._reader(rep, clip)
        if reader is None:
            return
        if clip.end_frame_idx > len(reader):
            rep.errors.append(
                f"{clip.source}: end_frame_idx {clip.end_frame_idx} is past the end "
                f"of {reader.path} ({len(reader)} frames)"
            )
            return
        start, end = clip.start_frame_idx, clip.end_frame_idx
        wanted = range(start, end) if self.deep else sorted({start, end - 1})
        done = self.decoded[clip.frames_file]
        for k in wanted:
            if done[k]:
                continue
            done[k] = 1
            self.bar.update()
            try:
                reader.images(k, k + 1)
            except DataFormatError as e:
                rep.errors.append(f"{clip.source}: {e}")

    def _reader(self, rep: ValidationReport, clip: ClipRecord) -> FrameReader | None:
        if clip.frames_file not in self.readers:
            try:
                reader = FrameReader(self.root / clip.frames_file)
                self.decoded[clip.frames_file] = bytearray(len(reader))
            except DataFormatError as e:
                reader = None
                rep.errors.append(f"{clip.source}: {e}")
            self.readers[clip.frames_file] = reader
        return self.readers[clip.frames_file]
