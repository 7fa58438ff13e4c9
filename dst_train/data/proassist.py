"""ProAssist prepared samples (JSONL, one clip per line) and their frame files (Arrow).

Formats in DESIGN.md §2.1–2.2. Records are parsed into typed dataclasses; every error names the
file and line. Frames are read lazily: only the rows of the requested slice are touched.
"""

from __future__ import annotations

import base64
import io
import json
import math
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


# Plausibility limits: a value beyond them is a corrupt number, not a long video, and would
# otherwise surface as a MemoryError (a list per frame) or an OverflowError far from the record.
MAX_FRAME_INDEX = 10**9  # ~16 years at 2 fps
MAX_CLIP_FRAMES = 10**6  # ~5.8 days at 2 fps; ProAssist clips hold thousands
MAX_SECONDS = 10**9
MAX_FPS = 1000
MAX_COUNT = 10**7  # token counts (max_seq_len, seq_len, num_tokens_per_img)

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
_RANGES = {  # inclusive bounds of the numeric fields of a record
    "clip_idx": (0, MAX_FRAME_INDEX),
    "start_frame_idx": (0, MAX_FRAME_INDEX),
    "end_frame_idx": (0, MAX_FRAME_INDEX),
    "max_seq_len": (0, MAX_COUNT),
    "seq_len": (0, MAX_COUNT),
    "num_tokens_per_img": (0, MAX_COUNT),
    "fps": (1e-6, MAX_FPS),
}


def _check_type(where: str, key: str, value: Any, kind) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass in Python, but JSON true is not a number here
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise DataFormatError(f"{where}: field {key!r} must be {names}, got {value!r:.80}")


def _check_number(where: str, key: str, value: Any, kind, lo: float, hi: float) -> None:
    _check_type(where, key, value, kind)
    if isinstance(value, float) and not math.isfinite(value):
        raise DataFormatError(f"{where}: field {key!r} must be a finite number, got {value}")
    if not lo <= value <= hi:
        shown = f"{value:.6g}" if isinstance(value, float) else f"{value!r:.40}"
        raise DataFormatError(f"{where}: field {key!r} = {shown} is outside [{lo:g}, {hi:g}]")


def _parse_turn(where: str, k: int, raw: Any) -> Turn:
    at = f"{where}: conversation[{k}]"
    if not isinstance(raw, dict):
        raise DataFormatError(f"{at}: a turn must be an object, got {raw!r:.80}")
    role = raw.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise DataFormatError(f"{at}: unknown role {role!r:.80} (expected one of {ROLES})")
    if role == "frames":
        start, end = raw.get("start"), raw.get("end")
        for key, v in (("start", start), ("end", end)):
            _check_number(at, key, v, int, 0, MAX_FRAME_INDEX)
        if end <= start:
            raise DataFormatError(f"{at}: empty or reversed frames span [{start}, {end})")
        return Turn("frames", start=start, end=end)
    content = raw.get("content")
    _check_type(at, "content", content, str)
    time = raw.get("time")
    if role in ("user", "assistant") or time is not None:
        _check_number(at, "time", time, (int, float), 0, MAX_SECONDS)
    labels = raw.get("labels")
    if labels is not None:
        _check_type(at, "labels", labels, str)
    return Turn(
        role, content=content, time=None if time is None else float(time), labels=labels or ""
    )


def parse_clip(obj: Any, where: str) -> ClipRecord:
    """Validate one decoded JSON object and build a :class:`ClipRecord`."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: a record must be a JSON object")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    for key, kind in (*_REQUIRED.items(), *_OPTIONAL.items()):
        if key in _RANGES and key in obj:
            _check_number(where, key, obj[key], kind, *_RANGES[key])
        elif key in obj:
            _check_type(where, key, obj[key], kind)
    start, end = obj["start_frame_idx"], obj["end_frame_idx"]
    if end <= start:
        raise DataFormatError(
            f"{where}: bad frame range start_frame_idx={start} end_frame_idx={end}"
        )
    if end - start > MAX_CLIP_FRAMES:
        raise DataFormatError(
            f"{where}: clip of {end - start} frames is longer than the {MAX_CLIP_FRAMES} "
            "frames a clip may hold (split the video into clips)"
        )
    turns = [_parse_turn(where, k, t) for k, t in enumerate(obj["conversation"])]
    _check_conversation(where, turns, start, end)
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
        fps=float(obj.get("fps", 2.0)),
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
        fh = path.open("rb")  # bytes: only \n ends a record, and a bad byte names its line
    except OSError as e:
        _fail(errors, DataFormatError(f"{path}: cannot open prepared file: {e.strerror or e}"))
        return
    with fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                obj = _decode_line(raw, where, first=lineno == 1)
                if obj is not None:
                    yield parse_clip(obj, where)
            except DataFormatError as e:
                _fail(errors, e)


def _decode_line(raw: bytes, where: str, first: bool) -> Any:
    """One JSONL line → its JSON value (None for a blank line)."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{where}: not UTF-8 (byte {e.start} of the line)") from None
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataFormatError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise DataFormatError(f"{where}: invalid JSON ({e})") from None


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
        self._check_structure(start, end)
        return self._ds[start:end]["frame"]

    def _check_structure(self, start: int, end: int) -> None:
        """Full Arrow validation of the rows about to be read: string offsets inside the data
        buffer, in order, and UTF-8. Reading rows with a corrupt offset crashes the process
        natively (segfault), so this runs before every read; it costs a pass over the slice's
        bytes, little next to decoding its JPEGs."""
        import pyarrow as pa

        column = self._ds.data.table.column("frame")
        try:
            column.slice(start, end - start).validate(full=True)
            return
        except pa.ArrowException:
            pass
        for k in range(start, end):  # name the first bad frame
            try:
                column.slice(k, 1).validate(full=True)
            except pa.ArrowException as e:
                raise DataFormatError(
                    f"{self.path}: frame {k}: corrupt Arrow data ({e}); re-extract the frames"
                ) from None

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
