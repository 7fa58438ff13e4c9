"""A ProAssist-shaped prepared record and a DST TSV in each published style, through the whole
path — readers, labels, token sequence — to what the model is trained on."""

import copy
import json

import pytest
from PIL import Image

from dst_train.data.pipeline import build_samples
from dst_train.data.proassist import encode_frame, write_frames
from dst_train.data.sequence import DST, IGNORE, RESPONSE, SequenceBuilder
from dst_train.model.backbone import ChatFormat, load_tokenizer
from tests.conftest import write_tsv
from tests.data.test_proassist import RECORD

# frame f covers [f/2, (f+1)/2) s; the clip is frames 2..9 (1.0 s to 5.0 s)
STYLES = {
    "numeric": [
        ("STEP", "1", "", "", "build the cart"),
        ("SUBSTEP", "1.1", "", "", "wheels"),
        ("ACTION", "1.1.1", 1.6, 3.2, "attach wheel"),  # frame 3 (in progress), frame 6 (done)
        ("ACTION", "1.1.2", 3.9, 3.9, "tighten nut"),  # instantaneous, frame 7
    ],
    "letter": [
        ("step", "S1", "", "", "build the cart"),
        ("substep", "S1.1", "", "", "wheels"),
        ("action", "S1.1.a", 1.6, 3.2, "attach wheel"),
        ("action", "S1.1.b", 3.9, 3.9, "tighten nut"),
    ],
}


@pytest.fixture(scope="module")
def chat_tokens(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    return tok, tok.convert_tokens_to_ids(ChatFormat().image)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_a_proassist_record_and_tsv_become_the_expected_tokens(tmp_path, chat_tokens, style):
    tok, image_id = chat_tokens
    record = copy.deepcopy(RECORD)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "train.jsonl").write_text(json.dumps(record) + "\n")
    frames = [encode_frame(Image.new("RGB", (8, 8), (10 * i, 0, 0))) for i in range(12)]
    write_frames(tmp_path / record["frames_file"], frames)
    (tmp_path / "dst").mkdir()
    write_tsv(tmp_path / "dst" / "vid_a.tsv", STYLES[style])
    ids = [row[1] for row in STYLES[style]]
    step, sub, act1, act2 = ids

    builder = SequenceBuilder(tok, ChatFormat(), image_id, tokens_per_frame=2)
    (s,) = build_samples(tmp_path, "train", builder)
    assert s.frames == list(range(2, 10)) and s.video_uid == "vid_a"
    assert all(s.input_ids[p] == s.input_ids[p - 1] == image_id for p in s.decision_pos)
    assert s.input_ids.count(image_id) == 2 * 8
    assert s.speak == [0, 0, 0, 1, 0, 0, 0, 0]  # the reply follows the frames block [5, 6)
    assert s.update == [0, 1, 0, 0, 1, 1, 0, 0]  # frames 3, 6 and 7

    def text_of(kind):
        return tok.decode([t for t, k in zip(s.targets, s.target_kind, strict=True) if k == kind])

    assert s.targets.count(IGNORE) + sum(k != 0 for k in s.target_kind) == len(s.targets)
    assert text_of(RESPONSE) == "Start with the wheels.<end_of_utterance>"
    updates = text_of(DST).split("<end_of_utterance>")[:-1]
    assert updates == [
        f"{step}=in_progress; {sub}=in_progress; {act1}=in_progress",
        f"{act1}=completed",
        f"{step}=completed; {sub}=completed; {act2}=completed",
    ]
    # the system prompt carries the task tree and the state at the clip's start (all not started)
    prompt = tok.decode(s.input_ids[: s.decision_pos[0] - 1])
    assert f"{act1} attach wheel: not_started" in prompt and "Help me" not in prompt
    # labels sit where the model predicts them: each labelled token is the next input token
    for p, (t, k) in enumerate(zip(s.targets, s.target_kind, strict=True)):
        if k:
            assert s.input_ids[p + 1] == t
