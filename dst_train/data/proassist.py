"""ProAssist prepared samples (JSONL, one clip per line) and their frame files (Arrow).

Formats in DESIGN.md §2.1–2.2. Records are parsed into typed dataclasses; every error names the
file and line. Frames are read lazily: only the rows of the requested slice are touched.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "frames", "user", "assistant")


class DataFormatError(ValueError):
    """Bad input data; the message says which file, which line/record, and what is wrong."""


@dataclass(frozen=True)
class Turn:
    """One conversation turn. ``frames`` turns use ``start``/``end`` (absolute frame indices,
    end exclusive); text turns use ``content`` and, for user/assistant, ``time`` in seconds."""

    role: str
    content: str = ""
    time: float | None = None
    start: int | None = None
    end: int | None = None
    labels: str = ""


@dataclass
class ClipRecord:
    """One prepared clip of one video (a line of ``prepared/*.jsonl``)."""

    dataset: str
    video_uid: str
    clip_idx: int
    frames_file: str  # relative to the dataset root
    start_frame_idx: int
    end_frame_idx: int  # exclusive
    conversation: list[Turn]
    max_seq_len: int = 0
    seq_len: int = 0
    num_tokens_per_img: int = 1
    use_img_sep_token: bool = False
    fps: float = 2.0
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "path:line", for error messages

    @property
    def num_frames(self) -> int:
        return self.end_frame_idx - self.start_frame_idx


_REQUIRED = {
    "dataset": str,
    "video_uid": str,
    "clip_idx": int,
    "frames_file": str,
    "start_frame_idx": int,
    "end_frame_idx": int,
    "conversation": list,
}
_OPTIONAL = {
    "max_seq_len": int,
    "seq_len": int,
    "num_tokens_per_img": int,
    "use_img_sep_token": bool,
    "fps": (int, float),
    "metadata": (dict, type(None)),
}


def _check_type(where: str, key: str, value: Any, kind) -> None:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataFormatError(f"{where}: field {key!r} must be {names}, got {value!r:.80}")


def _parse_turn(where: str, k: int, raw: Any) -> Turn:
    at = f"{where}: conversation[{k}]"
    if not isinstance(raw, dict):
        raise DataFormatError(f"{at}: a turn must be an object, got {raw!r:.80}")
    role = raw.get("role")
    if role not in ROLES:
        raise DataFormatError(f"{at}: unknown role {role!r} (expected one of {ROLES})")
    if role == "frames":
        start, end = raw.get("start"), raw.get("end")
        for key, v in (("start", start), ("end", end)):
            _check_type(at, key, v, int)
        if end <= start:
            raise DataFormatError(f"{at}: empty or reversed frames span [{start}, {end})")
        return Turn("frames", start=start, end=end)
    content = raw.get("content")
    _check_type(at, "content", content, str)
    time = raw.get("time")
    if role in ("user", "assistant"):
        _check_type(at, "time", time, (int, float))
    labels = raw.get("labels") or ""
    return Turn(role, content=content, time=None if time is None else float(time), labels=labels)


def parse_clip(obj: Any, where: str) -> ClipRecord:
    """Validate one decoded JSON object and build a :class:`ClipRecord`."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: a record must be a JSON object")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    for key, kind in _REQUIRED.items():
        _check_type(where, key, obj[key], kind)
    for key, kind in _OPTIONAL.items():
        if key in obj:
            _check_type(where, key, obj[key], kind)
    start, end = obj["start_frame_idx"], obj["end_frame_idx"]
    if start < 0 or end <= start:
        raise DataFormatError(
            f"{where}: bad frame range start_frame_idx={start} end_frame_idx={end}"
        )
    turns = [_parse_turn(where, k, t) for k, t in enumerate(obj["conversation"])]
    _check_conversation(where, turns, start, end)
    fps = float(obj.get("fps", 2.0))
    if fps <= 0:
        raise DataFormatError(f"{where}: fps must be positive, got {fps}")
    return ClipRecord(
        dataset=obj["dataset"],
        video_uid=obj["video_uid"],
        clip_idx=obj["clip_idx"],
        frames_file=obj["frames_file"],
        start_frame_idx=start,
        end_frame_idx=end,
        conversation=turns,
        max_seq_len=obj.get("max_seq_len", 0),
        seq_len=obj.get("seq_len", 0),
        num_tokens_per_img=obj.get("num_tokens_per_img", 1),
        use_img_sep_token=obj.get("use_img_sep_token", False),
        fps=fps,
        metadata=obj.get("metadata") or {},
        source=where,
    )


def _check_conversation(where: str, turns: list[Turn], start: int, end: int) -> None:
    """Frame spans must lie inside the clip, in order and without overlap."""
    cursor = start
    for k, t in enumerate(turns):
        if t.role != "frames":
            continue
        if t.start < cursor or t.end > end:
            raise DataFormatError(
                f"{where}: conversation[{k}]: frames [{t.start}, {t.end}) out of order or outside "
                f"the clip [{start}, {end}) (previous span ended at {cursor})"
            )
        cursor = t.end


def iter_prepared(path: str | Path, errors: list[str] | None = None) -> Iterator[ClipRecord]:
    """Yield the clips of one prepared JSONL file, streaming line by line.

    With ``errors=None`` the first bad record raises :class:`DataFormatError`; with a list, bad
    records are appended to it (as messages) and skipped, so a validator can report them all.
    """
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8")
    except OSError as e:
        _fail(errors, DataFormatError(f"{path}: cannot open prepared file: {e.strerror or e}"))
        return
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _fail(
                    errors, DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                )
                continue
            try:
                yield parse_clip(obj, where)
            except DataFormatError as e:
                _fail(errors, e)


def read_prepared(path: str | Path) -> list[ClipRecord]:
    return list(iter_prepared(path))


def _fail(errors: list[str] | None, exc: DataFormatError) -> None:
    if errors is None:
        raise exc
    errors.append(str(exc))


class FrameReader:
    """Lazy random access to one ``frames/<name>.arrow`` file (column ``frame``: base64 JPEG).

    ``datasets.Dataset.from_file`` memory-maps the Arrow file, so opening a file of thousands of
    frames costs no RAM; only the requested rows are materialised.
    """

    def __init__(self, path: str | Path):
        from datasets import Dataset

        self.path = Path(path)
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: frames file does not exist")
        try:
            self._ds = Dataset.from_file(str(self.path))
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataFormatError(f"{self.path}: not a readable Arrow frames file ({e})") from e
        if "frame" not in self._ds.column_names:
            raise DataFormatError(f"{self.path}: no 'frame' column (has {self._ds.column_names})")

    def __len__(self) -> int:
        return self._ds.num_rows

    def encoded(self, start: int, end: int) -> list[str]:
        """Base64 strings of frames ``[start, end)``."""
        if not 0 <= start <= end <= len(self):
            raise DataFormatError(
                f"{self.path}: frame slice [{start}, {end}) is outside the file's "
                f"{len(self)} frames"
            )
        return self._ds[start:end]["frame"]

    def images(self, start: int, end: int) -> list:
        """Decoded RGB ``PIL.Image`` frames ``[start, end)``."""
        return [
            decode_frame(b64, f"{self.path}[{start + k}]")
            for k, b64 in enumerate(self.encoded(start, end))
        ]


def decode_frame(b64: str, where: str = "frame"):
    from PIL import Image

    try:
        return Image.open(io.BytesIO(base64.b64decode(b64, validate=True))).convert("RGB")
    except Exception as e:
        raise DataFormatError(f"{where}: not a base64-encoded image ({e})") from e


def encode_frame(image, quality: int = 90) -> str:
    """RGB ``PIL.Image`` → base64 JPEG string (the ProAssist frame encoding)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_frames(path: str | Path, encoded_frames) -> int:
    """Write an iterable of base64 frames to an Arrow file with ``datasets``' ArrowWriter,
    streaming (never holds the whole video). Returns the number of frames."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.features import Features, Value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with ArrowWriter(path=str(path), features=Features({"frame": Value("string")})) as writer:
        for b64 in encoded_frames:
            writer.write({"frame": b64})
            n += 1
        writer.finalize()
    return n
