"""``dst-train score``: a fixture file through the real CLI, and every bad input → ``error:``
naming the line and the field, exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.helpers import REPO

FIXTURES = Path(__file__).parents[1] / "fixtures" / "proassist_parity"


def run_score(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dst_train.cli", "score", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_without_java_the_text_metrics_are_n_a_and_the_rest_is_scored(tmp_path):
    """BLEU, METEOR and CIDEr need java (the PTB tokenizer, METEOR's jar); a machine without it
    (a GPU image) still gets the speaking and similarity metrics, and a warning."""
    import os

    (tmp_path / "bin").mkdir()  # a PATH on which there is no java
    env = {**os.environ, "PATH": str(tmp_path / "bin")}
    proc = run_score(FIXTURES / "cases" / "001.jsonl", "--embedding-model", "minilm", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(line.split() for line in proc.stdout.splitlines()[1:])
    assert all(rows[k] == "n/a" for k in ("bleu1", "bleu4", "meteor", "cider"))
    assert float(rows["speak_f1"]) > 0 and float(rows["semantic_similarity"]) > 0
    assert "java not found: BLEU/METEOR/CIDEr need it" in proc.stderr


GOOD = {
    "video_uid": "v1",
    "fps": 2.0,
    "dataset": "assembly101",
    "predictions": [{"time": 1.0, "text": "a"}],
    "references": [{"time": 1.5, "text": "b"}],
}


def test_score_a_fixture_file_gives_proassists_numbers():
    proc = run_score(FIXTURES / "cases" / "001.jsonl", "--embedding-model", "minilm", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout)["metrics"]
    want = json.loads((FIXTURES / "expected.json").read_text())["001.jsonl"]
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key


def test_score_table_with_the_default_model_proassists_mpnet(tmp_path):
    f = tmp_path / "one.jsonl"
    video = dict(
        GOOD,
        predictions=[{"time": 3.0, "text": "Attach the wheel to the axle."}],
        references=[{"time": 3.5, "text": "Now put the wheel on the axle."}],
    )
    f.write_text(json.dumps(video) + "\n")
    proc = run_score(f)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "all-mpnet-base-v2" in proc.stdout
    assert "speak_f1             1.0000" in proc.stdout


def _with(**change):
    obj = json.loads(json.dumps(GOOD))
    for path, value in change.items():
        *keys, last = path.split("__")
        target = obj
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        last = int(last) if last.isdigit() else last
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return json.dumps(obj)


BAD = [
    ("{not json", "not a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    (_with(fps=KeyError), "missing key 'fps'"),
    (_with(video_uid=7), "field video_uid"),
    (_with(fps=True), "field fps: expected a number"),
    (_with(fps=0), "field fps: must be > 0"),
    (_with(predictions="x"), "field predictions: expected a list"),
    (_with(predictions__0__time=-1), "field predictions[0].time: negative"),
    (_with(references__0__time="3"), "field references[0].time: expected a number"),
    (_with(references__0__time=None), "field references[0].time: expected a number"),
    (_with(predictions__0__text=5), "field predictions[0].text: expected a string"),
    (_with(predictions__0__time=1e13), "too far"),
    (json.dumps(GOOD).replace("2.0", "NaN"), "not a number in JSON"),
    (json.dumps(GOOD).replace('"time": 1.0', '"time": Infinity'), "not a number in JSON"),
    ("[" * 100000 + "]" * 100000, "not a JSON object"),
    (_with(predictions__0="x"), "field predictions[0]: expected an object, got 'x'"),
    (_with(references__0__text=KeyError), "field references[0]: missing key 'text'"),
    # Python's json reads a number too big for a float as infinity
    (json.dumps(GOOD).replace('"time": 1.0', '"time": 1e400'), "time: not finite (inf)"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_line_and_field(tmp_path, line, message):
    from dst_train.eval.score import ScoreInputError, read_score_file

    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(ScoreInputError) as err:
        read_score_file(f)
    assert f"{f}:3:" in str(err.value) and message in str(err.value)


def test_bad_input_through_the_cli_is_an_error_line_and_exit_2(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(_with(predictions__0__time=float("nan")).replace("NaN", "NaN") + "\n")
    proc = run_score(f, "--embedding-model", "minilm")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {f}:1:") and "Traceback" not in proc.stderr
    f.write_bytes(b"\xff\xfe\n")
    proc = run_score(f, "--embedding-model", "minilm")
    assert proc.returncode == 2 and "not UTF-8" in proc.stderr
    proc = run_score(tmp_path / "missing.jsonl")
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    f.write_text("\n\n")
    proc = run_score(f)
    assert proc.returncode == 2 and proc.stderr == f"error: {f}: no video records\n"


def test_two_turns_on_one_frame_are_joined_and_times_map_by_truncation(tmp_path):
    from dst_train.eval.score import read_score_file, time_of, write_score_file

    f = tmp_path / "v.jsonl"
    video = dict(GOOD, references=[{"time": 1.0, "text": "b"}, {"time": 1.49, "text": "c"}])
    f.write_text(json.dumps(video) + "\n")
    (v,) = read_score_file(f)
    assert v.ref == ["", "", "b c"] and v.gen == ["", "", "a"]
    write_score_file([v], tmp_path / "back.jsonl")
    assert read_score_file(tmp_path / "back.jsonl")[0].ref == v.ref
    assert all(int(time_of(k, 29.97) * 29.97) == k for k in range(5000))


def test_the_last_frame_allowed_is_read_and_the_next_is_too_far(tmp_path):
    from dst_train.eval.score import MAX_FRAMES, ScoreInputError, read_score_file

    f = tmp_path / "v.jsonl"
    f.write_text(_with(predictions__0__time=MAX_FRAMES / 2.0) + "\n")  # fps 2: frame MAX_FRAMES
    (v,) = read_score_file(f)
    assert v.gen[MAX_FRAMES] == "a"
    f.write_text(_with(predictions__0__time=(MAX_FRAMES + 1) / 2.0) + "\n")
    with pytest.raises(ScoreInputError, match=f"is frame {MAX_FRAMES + 1}, too far"):
        read_score_file(f)
