"""A dataset root on disk and the clips of one split.

Layout (what ``make-demo-data`` writes and what users point ``data.root`` at)::

    ROOT/prepared/{train,val,test}.jsonl   ProAssist prepared clips (frames_file relative to ROOT)
    ROOT/frames/<name>.arrow               frames, base64 JPEG, one row per frame
    ROOT/dst/<video_uid>.tsv               DST annotation of each video
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from dst_train.data.dst_tree import DSTFormatError, DSTTree, read_dst_tsv
from dst_train.data.labels import ClipLabels, build_clip_labels
from dst_train.data.proassist import DataFormatError, iter_prepared

SPLITS = ("train", "val", "test")


@dataclass
class DatasetPaths:
    prepared: list[Path]
    frames_root: Path | None
    dst_dir: Path | None

    @classmethod
    def from_root(cls, root: str | Path) -> DatasetPaths:
        root = Path(root)
        if not (root / "prepared").is_dir():
            raise DataFormatError(f"{root}: not a dataset root (no prepared/ folder)")
        prepared = sorted((root / "prepared").glob("*.jsonl"))
        if not prepared:
            raise DataFormatError(f"{root / 'prepared'}: no *.jsonl files")
        dst = root / "dst"
        return cls(prepared, root, dst if dst.is_dir() else None)

    def split_file(self, split: str) -> Path:
        for p in self.prepared:
            if p.stem == split:
                return p
        raise DataFormatError(
            f"no prepared file for split {split!r} among {[str(p) for p in self.prepared]}"
        )


def dst_path(dst_dir: Path, video_uid: str) -> Path:
    return dst_dir / f"{video_uid}.tsv"


def load_split(root: str | Path, split: str, span_policy: str = "repair") -> list[ClipLabels]:
    """Labelled clips of one split. Raises on any bad record or annotation (use
    ``dst-train validate-data`` for a full report)."""
    paths = DatasetPaths.from_root(root)
    trees: dict[str, DSTTree | None] = {}
    out = []
    for clip in iter_prepared(paths.split_file(split)):
        if clip.video_uid not in trees:
            trees[clip.video_uid] = _load_tree(paths.dst_dir, clip.video_uid, span_policy)
        out.append(build_clip_labels(clip, trees[clip.video_uid]))
    return out


def _load_tree(dst_dir: Path | None, video_uid: str, span_policy: str) -> DSTTree | None:
    if dst_dir is None or not dst_path(dst_dir, video_uid).is_file():
        return None
    tree, issues = read_dst_tsv(dst_path(dst_dir, video_uid), span_policy)
    if tree is None:
        raise DSTFormatError("\n".join(str(i) for i in issues if i.severity == "error"))
    return tree


def assign_splits(
    video_uids: list[str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, str]:
    """Deterministic video → split assignment (never one video in two splits).

    Videos are ordered by a seeded hash, then cut by ``fractions`` (train, val, test); val and
    test get at least one video each when there are three or more videos. Train takes what val
    and test leave, so the three must be non-negative and add up to 1.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions}: need (train, val, test) >= 0 adding to 1")
    uids = sorted(set(video_uids), key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    n = len(uids)
    n_val = max(1 if n >= 3 else 0, round(fractions[1] * n))
    n_test = max(1 if n >= 3 else 0, round(fractions[2] * n))
    n_train = n - n_val - n_test
    out = {u: "train" for u in uids[:n_train]}
    out.update({u: "val" for u in uids[n_train : n_train + n_val]})
    out.update({u: "test" for u in uids[n_train + n_val :]})
    return out
