"""Hostile input: every reader either accepts a sane value or names the file and line.

Property tests mutate valid prepared JSONL records, DST TSV files and YAML configs (wrong types,
NaN/Infinity/booleans as numbers, huge integers, deep nesting, absurd sizes, bytes that are not
UTF-8) and drive them through the user's commands. Corrupted Arrow frame files are checked in a
subprocess, since a native crash would otherwise take pytest down with it.
"""

import base64
import copy
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dst_train.cli import main
from dst_train.config import ConfigError, load_config
from dst_train.data.proassist import encode_frame, read_prepared
from tests.data.test_proassist import RECORD

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([10**13, -1, 10**400, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.just("HUGE"),  # a 200 000-character string, made at write time (hypothesis prints examples)
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(obj, prefix=()):
    """Every (nested) key path of a JSON value."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


RECORD_PATHS = list(_paths(RECORD))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _validate(capsys, *args):
    code = main(["validate-data", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _assert_sane(clip):
    """What an accepted record guarantees to the code after the reader."""
    for v in (clip.clip_idx, clip.start_frame_idx, clip.end_frame_idx, clip.seq_len):
        assert type(v) is int and 0 <= v <= 10**9
    assert 0 < clip.num_frames <= 10**6
    assert math.isfinite(clip.fps) and clip.fps > 0
    for t in clip.conversation:
        assert isinstance(t.content, str) and isinstance(t.labels, str)
        assert t.time is None or (math.isfinite(t.time) and t.time >= 0)
        if t.role == "frames":
            assert type(t.start) is int and type(t.end) is int


@SETTINGS
@given(
    edits=st.lists(st.tuples(st.sampled_from(RECORD_PATHS), HOSTILE), min_size=1, max_size=3),
    junk=st.one_of(
        st.none(), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=4))
    ).filter(lambda j: j is None or b"\n" not in j[1]),
    nesting=st.sampled_from([0, 0, 0, 100_000]),
)
def test_mutated_prepared_records_are_named_errors(tmp_path, capsys, edits, junk, nesting):
    record = copy.deepcopy(RECORD)
    for path, value in edits:
        try:
            _set(record, path, "x" * 200_000 if value == "HUGE" else value)
        except (KeyError, IndexError, TypeError):  # an earlier edit replaced a parent
            pass
    line = json.dumps(record).encode()
    if nesting:
        line = b"[" * nesting + b"]" * nesting
    if junk is not None:
        at, data = junk
        line = line[: at % (len(line) + 1)] + data + line[at % (len(line) + 1) :]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"not": "a clip"}\n' + line + b"\n")  # the mutated record is line 2
    code, report = _validate(capsys, "--prepared", str(path), "--no-frames")
    assert code == 1  # line 1 is never a clip
    first, *rest = report["errors"]
    assert first.startswith(f"{path}:1: missing field(s)")
    assert len(rest) == 1 - report["clips"]
    assert all(e.startswith(f"{path}:2: ") for e in rest)
    if report["clips"]:
        (clip,) = read_prepared(path.write_bytes(line) and path)
        _assert_sane(clip)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(fps=True), "field 'fps' must be int/float, got True"),
        (lambda r: r.update(fps=float("nan")), "field 'fps' must be a finite number"),
        (lambda r: r["conversation"][2].update(time=True), "field 'time' must be int/float"),
        (lambda r: r["conversation"][2].update(time=float("inf")), "must be a finite number"),
        (lambda r: r["conversation"][2].update(time=-1), "field 'time' = -1 is outside"),
        (lambda r: r["conversation"][2].update(labels=["a"]), "field 'labels' must be str"),
        (lambda r: r["conversation"][1].update(start="2"), "field 'start' must be int"),
        (lambda r: r.update(end_frame_idx=10**13), "'end_frame_idx' = 10000000000000 is outside"),
        (lambda r: r.update(end_frame_idx=2 + 10**7), "longer than the 1000000 frames"),
        (lambda r: r.update(fps=10**400), "field 'fps' = 1000000000"),
        (lambda r: r.update(seq_len=-5), "field 'seq_len' = -5 is outside"),
        # one past each plausibility limit
        (lambda r: r.update(clip_idx=10**9 + 1), "field 'clip_idx' = 1000000001 is outside"),
        (lambda r: r.update(seq_len=10**7 + 1), "field 'seq_len' = 10000001 is outside"),
        (lambda r: r.update(fps=1000.5), "field 'fps' = 1000.5 is outside"),
        (lambda r: r["conversation"][2].update(time=10**9 + 1), "'time' = 1000000001 is outside"),
    ],
)
def test_each_hostile_value_class_names_field_and_line(tmp_path, capsys, mutate, message):
    record = copy.deepcopy(RECORD)
    mutate(record)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    code, report = _validate(capsys, "--prepared", str(path), "--no-frames")
    assert code == 1 and len(report["errors"]) == 1
    assert report["errors"][0].startswith(f"{path}:1: ") and message in report["errors"][0]


def test_values_at_the_plausibility_limits_are_accepted(tmp_path, capsys):
    record = copy.deepcopy(RECORD)
    record.update(clip_idx=10**9, seq_len=10**7, max_seq_len=10**7, fps=1000)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n")
    code, report = _validate(capsys, "--prepared", str(path), "--no-frames")
    assert (code, report["errors"], report["clips"]) == (0, [], 1)


@pytest.mark.parametrize(
    "line, message",
    [
        (b'{"a": "\xff"}', "not UTF-8 (byte 7 of the line)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"clip_idx": 1' + b"0" * 5000 + b"}", "invalid JSON (Exceeds the limit"),
    ],
)
def test_undecodable_lines_name_their_line(tmp_path, capsys, line, message):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(RECORD).encode() + b"\n" + line + b"\n")
    code, report = _validate(capsys, "--prepared", str(path), "--no-frames")
    assert code == 1 and report["clips"] == 1
    assert report["errors"] == [f"{path}:2: " + report["errors"][0].split(": ", 1)[1]]
    assert message in report["errors"][0]


def test_a_bom_on_the_first_line_is_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORD).encode() + b"\n")
    assert len(read_prepared(path)) == 1


# ----------------------------------------------------------------------------- DST TSV
TSV = (
    b"type\tid\tstart_ts\tend_ts\tname\n"
    b"STEP\t1\t0\t10\tbuild\n"
    b"SUBSTEP\t1.1\t\t\tbase\n"
    b"ACTION\t1.1.1\t1.0\t3.0\tscrew\n"
    b"ACTION\t1.1.2\t4\t4\tclick\n"
)
PIECES = st.one_of(
    st.sampled_from(
        [b"\t", b"\n", b"\r", b"\x00", b"\xff", b"\x0c", "\u2028".encode(), b'"', b"x" * 200_000]
        + [b"1e309", b"nan", b"-1", b"9" * 5000, b"1.1.1.1", b"S1", b"true"]
    ),
    st.binary(min_size=1, max_size=3),
)


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, len(TSV)), PIECES), min_size=1, max_size=3))
def test_mutated_dst_files_are_named_errors(tmp_path, capsys, edits):
    data = bytearray(TSV)
    for at, piece in edits:
        data[at:at] = piece
    path = tmp_path / "v.tsv"
    path.write_bytes(bytes(data))
    code, report = _validate(capsys, "--dst-tsv", str(path))
    assert code in (0, 1)
    assert all(m.startswith(f"{path}") for m in report["errors"] + report["warnings"])
    assert (code == 1) == bool(report["errors"])


def test_a_huge_cell_is_a_named_error(tmp_path, capsys):
    path = tmp_path / "v.tsv"
    path.write_bytes(TSV + b"ACTION\t1.1.3\t5\t6\t" + b"x" * 200_000 + b"\n")
    code, report = _validate(capsys, "--dst-tsv", str(path))
    assert code == 1
    assert report["errors"] == [
        f"{path}:6: error: field name has 200000 characters (at most 10000)"
    ]
    path.write_bytes(TSV + b"ACTION\t1.1.3\t5\t6\t" + b"x" * 10_000 + b"\n")  # at the limit: fine
    code, report = _validate(capsys, "--dst-tsv", str(path))
    assert code == 0 and report["errors"] == []


# ----------------------------------------------------------------------------- YAML config
CONFIG = "launch/configs/demo.yaml"
CONFIG_KEYS = [
    "model.dtype",
    "model.lora_r",
    "model.lora_dropout",
    "loss.focal_gamma",
    "loss.focal_alpha",
    "train.lr",
    "train.betas",
    "train.micro_batch_size",
    "train.max_steps",
    "seed",
    "data.num_workers",
]
YAML_VALUES = st.one_of(
    st.sampled_from(
        ["true", ".nan", ".inf", "-.inf", "1e400", "1" + "0" * 400, "1" + "0" * 5000, "-3"]
        + ["[1, 2, 3]", "[0.9]", "{a: 1}", "'x'", "[" * 1000, "2.5", "~", ": :", "\xff"]
    ),
    st.text(max_size=8),
)


@SETTINGS
@given(overrides=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), YAML_VALUES), max_size=3))
def test_hostile_config_overrides_are_config_errors(overrides):
    try:
        cfg = load_config(CONFIG, [f"{k}={v}" for k, v in overrides])
    except ConfigError:
        return
    t = cfg.train
    assert type(t.micro_batch_size) is int and 1 <= t.micro_batch_size < 2**31
    assert math.isfinite(t.lr) and t.lr > 0 and all(0 <= b < 1 for b in t.betas)
    assert 0 <= cfg.model.lora_dropout <= 1 and math.isfinite(cfg.loss.focal_gamma)
    assert 0 <= cfg.seed < 2**31


@SETTINGS
@given(at=st.integers(0, 2000), piece=st.binary(min_size=1, max_size=4))
def test_corrupted_config_files_are_config_errors(tmp_path, at, piece):
    data = open(CONFIG, "rb").read()
    path = tmp_path / "c.yaml"
    path.write_bytes(data[: at % len(data)] + piece + data[at % len(data) :])
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or str(e).startswith("invalid config")


# ----------------------------------------------------------------------------- Arrow frames
def _frames_dataset(root, corrupt: str):
    """A dataset of one 6-frame clip whose frames file is corrupted at frame 3."""
    frames = [encode_frame(Image.new("RGB", (8, 8), (40 * i, 9, 9))) for i in range(6)]
    if corrupt == "truncated_jpeg":
        frames[3] = base64.b64encode(base64.b64decode(frames[3])[:200]).decode()
    data = bytearray("".join(frames).encode())
    offsets = np.cumsum([0] + [len(f) for f in frames]).astype(np.int32)
    if corrupt == "offset_past_the_end":
        offsets[4] = 10**8
    elif corrupt == "offsets_decreasing":
        offsets[4] = offsets[3] - 10
    elif corrupt == "invalid_utf8":
        data[offsets[3] + 5] = 0xFF
    column = pa.StringArray.from_buffers(6, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))
    table = pa.table({"frame": column})
    (root / "frames").mkdir(parents=True)
    (root / "prepared").mkdir()
    with pa.OSFile(str(root / "frames" / "v.arrow"), "wb") as fh:
        with pa.ipc.new_stream(fh, table.schema) as writer:
            writer.write_table(table)
    record = dict(RECORD, video_uid="v", frames_file="frames/v.arrow", start_frame_idx=0)
    record["end_frame_idx"] = 6
    record["conversation"] = [{"role": "frames", "start": 0, "end": 6}]
    (root / "prepared" / "train.jsonl").write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("offset_past_the_end", "frame 3: corrupt Arrow data"),
        ("offsets_decreasing", "frame 3: corrupt Arrow data"),
        ("invalid_utf8", "frame 3: corrupt Arrow data (In chunk 0: Invalid: Invalid UTF8"),
        ("truncated_jpeg", "v.arrow[3]: not a base64-encoded image"),
    ],
)
def test_corrupt_frames_are_found_by_a_deep_check_without_a_crash(tmp_path, corrupt, message):
    _frames_dataset(tmp_path, corrupt)
    cmd = [sys.executable, "-m", "dst_train.cli", "validate-data", str(tmp_path), "--json"]
    shallow = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    deep = subprocess.run([*cmd, "--deep"], capture_output=True, text=True, timeout=120)
    assert deep.returncode == 1, deep.stderr[-2000:]  # not a segfault (-11), not a traceback
    error = json.loads(deep.stdout)["errors"][0]  # a bad offset also spoils the next frame
    assert error.startswith(f"{tmp_path / 'prepared' / 'train.jsonl'}:1: {tmp_path}/frames/v.arrow")
    assert message in error
    # without --deep only frames 0 and 5 are read: a corruption in the middle goes unseen
    assert shallow.returncode == 0, shallow.stderr[-2000:]
