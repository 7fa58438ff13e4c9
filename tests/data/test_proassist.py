import json

import pytest
from PIL import Image

from dst_train.data.proassist import (
    DataFormatError,
    FrameReader,
    encode_frame,
    iter_prepared,
    read_prepared,
    write_frames,
)

# Shaped like a real ProAssist prepared record (DESIGN.md §2.1), with made-up content.
RECORD = {
    "dataset": "assembly101",
    "video_uid": "vid_a",
    "clip_idx": 0,
    "frames_file": "frames/vid_a.arrow",
    "max_seq_len": 0,
    "seq_len": 120,
    "num_tokens_per_img": 1,
    "use_img_sep_token": False,
    "start_frame_idx": 2,
    "end_frame_idx": 10,
    "conversation": [
        {"role": "system", "content": "You are a proactive assistant."},
        {"role": "frames", "start": 2, "end": 5},
        {"role": "user", "time": 2.2, "content": "Help me build it.", "labels": ""},
        {"role": "frames", "start": 5, "end": 6},
        {
            "role": "assistant",
            "time": 2.9,
            "content": "Start with the wheels.",
            "labels": "initiative|instruction",
            "progress": "summary we do not train on",
        },
        {"role": "frames", "start": 6, "end": 10},
    ],
    "fps": 2,
    "metadata": {"user_type": "no_talk"},
}


def _jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_reads_typed_records(tmp_path):
    (clip,) = read_prepared(_jsonl(tmp_path / "train.jsonl", RECORD))
    assert clip.video_uid == "vid_a" and clip.num_frames == 8 and clip.fps == 2.0
    assert [t.role for t in clip.conversation] == [
        "system",
        "frames",
        "user",
        "frames",
        "assistant",
        "frames",
    ]
    assert clip.conversation[1].start == 2 and clip.conversation[4].time == 2.9
    assert clip.source.endswith("train.jsonl:1")


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda r: r.pop("video_uid"), "missing field\\(s\\) video_uid"),
        (lambda r: r.update(clip_idx="0"), "field 'clip_idx' must be int"),
        (lambda r: r.update(end_frame_idx=1), "bad frame range"),
        (
            lambda r: r["conversation"].append({"role": "robot", "content": "x"}),
            "unknown role 'robot'",
        ),
        (lambda r: r["conversation"][1].update(end=2), "empty or reversed frames span"),
        (lambda r: r["conversation"][5].update(end=11), "outside the clip"),
        (lambda r: r["conversation"][4].pop("time"), "conversation\\[4\\]: field 'time'"),
        (lambda r: r.update(fps=0), "field .fps. = 0 is outside"),
    ],
)
def test_malformed_record_errors_name_file_and_line(tmp_path, mutate, msg):
    bad = json.loads(json.dumps(RECORD))
    mutate(bad)
    path = _jsonl(tmp_path / "x.jsonl", RECORD, bad)
    with pytest.raises(DataFormatError, match=f"x.jsonl:2: .*{msg}"):
        read_prepared(path)


def test_invalid_json_and_error_collection(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", "{not json", RECORD, '["a list"]')
    with pytest.raises(DataFormatError, match="x.jsonl:1: invalid JSON"):
        read_prepared(path)
    errors: list[str] = []
    clips = list(iter_prepared(path, errors))
    assert len(clips) == 1 and len(errors) == 2
    assert "x.jsonl:3: a record must be a JSON object" in errors[1]


def test_missing_prepared_file(tmp_path):
    with pytest.raises(DataFormatError, match="cannot open prepared file"):
        read_prepared(tmp_path / "nope.jsonl")


def _frames(tmp_path, n=5):
    imgs = [Image.new("RGB", (16, 16), (k * 40, 0, 0)) for k in range(n)]
    path = tmp_path / "frames" / "v.arrow"
    assert write_frames(path, (encode_frame(i) for i in imgs)) == n
    return path


def test_frame_reader_slices_lazily(tmp_path):
    reader = FrameReader(_frames(tmp_path))
    assert len(reader) == 5
    imgs = reader.images(1, 3)
    assert len(imgs) == 2 and imgs[0].size == (16, 16)
    assert abs(imgs[1].getpixel((8, 8))[0] - 80) < 8  # JPEG is lossy
    assert reader.images(5, 5) == []


def test_frame_reader_errors(tmp_path):
    reader = FrameReader(_frames(tmp_path))
    with pytest.raises(DataFormatError, match=r"frame slice \[3, 9\) is outside the file's 5"):
        reader.images(3, 9)
    with pytest.raises(DataFormatError, match="frames file does not exist"):
        FrameReader(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataFormatError, match="not a readable Arrow frames file"):
        FrameReader(tmp_path / "junk.arrow")
    bad = tmp_path / "bad.arrow"
    write_frames(bad, ["bm90IGEganBlZw=="])  # valid base64, not an image
    with pytest.raises(DataFormatError, match=r"bad.arrow\[0\]: not a base64-encoded image"):
        FrameReader(bad).images(0, 1)
    # an Arrow file of something else: its columns are named
    from datasets import Dataset

    other = tmp_path / "other"
    Dataset.from_dict({"image": ["x"]}).save_to_disk(str(other))
    arrow = next(other.glob("*.arrow"))
    with pytest.raises(DataFormatError, match=rf"{arrow}: no 'frame' column \(has \['image'\]\)"):
        FrameReader(arrow)


def test_a_dataset_root_needs_its_prepared_jsonl_files(tmp_path):
    from dst_train.data.dataset import DatasetPaths

    (tmp_path / "prepared").mkdir()
    with pytest.raises(DataFormatError, match=rf"{tmp_path / 'prepared'}: no \*\.jsonl files"):
        DatasetPaths.from_root(tmp_path)
