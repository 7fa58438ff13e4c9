"""The pieces of ``dst-train evaluate`` that decide its numbers: threshold choice, the reference
state each frame is compared with, which matches get caption metrics, and the options that
shape a run (``--baseline-clips``, ``--max-context``, ``--embedding-model``)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from dst_train.data.dst_tree import COMPLETED, IN_PROGRESS, NOT_STARTED, load_dst_tsv
from dst_train.eval.evaluate import best_threshold, dst_inputs, reference_text, sweep
from dst_train.eval.score import VideoTurns, score_matches
from dst_train.eval.speaking import SIM_THRESHOLD, MatchResult
from dst_train.eval.text_metrics import caption_scores
from tests.conftest import adding_special_tokens, write_tsv
from tests.eval.test_evaluate_cli import model_folder  # noqa: F401  (a module-scoped fixture)


def test_the_threshold_with_the_best_validation_f1_is_chosen():
    # negatives at 0.1, 0.55 and 0.85, positives at 0.7 and 0.8
    probs = np.array([0.1, 0.55, 0.7, 0.8, 0.85])
    labels = np.array([0, 0, 1, 1, 0])
    rows = sweep(probs, labels)
    f1 = {r["threshold"]: r["f1"] for r in rows}
    assert f1[0.5] == pytest.approx(2 / 3)  # predicts 4: p 2/4, r 1
    assert f1[0.55] == f1[0.6] == f1[0.65] == pytest.approx(0.8)  # predicts 3: p 2/3, r 1
    assert f1[0.75] == pytest.approx(0.5) and f1[0.85] == 0.0
    assert best_threshold(rows) == 0.55  # the best F1; of those, the one nearest 0.5
    assert best_threshold(sweep(probs, 1 - labels)) == 0.05  # the labels decide it


def test_a_split_of_one_class_gives_defined_curves():
    """A val split where every frame is positive, or none is (a short split, a rare head)."""
    probs = np.array([0.3, 0.6, 0.9])
    every = {r["threshold"]: r for r in sweep(probs, np.ones(3, dtype=np.int64))}
    assert every[0.05]["recall"] == every[0.05]["precision"] == 1.0  # all predicted, all right
    assert every[0.65]["recall"] == pytest.approx(1 / 3)
    none = sweep(probs, np.zeros(3, dtype=np.int64))
    assert all(r["recall"] == r["precision"] == r["f1"] == 0.0 for r in none)  # 0, not NaN
    assert best_threshold(none) == 0.5  # no F1 to tell them apart: the one nearest 0.5


def test_frames_without_a_dst_annotation_take_no_part_in_the_update_threshold():
    # two frames of a video without DST (-1): whatever the head says there is never used
    probs = np.array([0.9, 0.9, 0.2, 0.8, 0.3])
    labels = np.array([-1, -1, 0, 1, 0])
    known = labels >= 0
    assert sweep(probs, labels) == sweep(probs[known], labels[known])
    assert {r["threshold"]: r["precision"] for r in sweep(probs, labels)}[0.5] == 1.0


def test_frame_probabilities_keep_the_update_labels_of_videos_without_dst_unknown(
    demo_root, tiny_model_dir, tmp_path
):
    import shutil

    import torch

    from dst_train.data.collate import make_collate
    from dst_train.data.dataset import load_split
    from dst_train.data.pipeline import make_dataset
    from dst_train.eval.evaluate import frame_probabilities
    from dst_train.model.backbone import load_image_processor, load_tokenizer
    from dst_train.model.build import Precision, build_model
    from tests.conftest import tiny_run_config

    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    # the train split (4 videos; val has 1): its first video loses its DST annotation
    (root / "dst" / f"{load_split(root, 'train')[0].clip.video_uid}.tsv").unlink()
    cfg = tiny_run_config(root, tiny_model_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.head_config(), Precision("fp32", "sdpa"))
    tok = load_tokenizer(cfg.model.arch)
    ds = make_dataset(cfg, "train", tok, model.backbone, load_image_processor(cfg.model.arch))
    probs = frame_probabilities(model, ds, make_collate(tok.pad_token_id, False))
    want = np.concatenate([s.update for s in ds.samples])
    assert (want == -1).any() and (want >= 0).any()  # both kinds of video in the split
    assert np.array_equal(probs["update"], want)
    assert np.array_equal(probs["speak"], np.concatenate([s.speak for s in ds.samples]))


def test_ties_go_to_the_threshold_nearest_one_half():
    rows = [{"threshold": t, "f1": 0.5} for t in (0.1, 0.45, 0.6, 0.9)]
    assert best_threshold(rows) == 0.45


@pytest.fixture
def tree(tmp_path):
    rows = [
        ("STEP", "1", 0, 10, "build"),
        ("SUBSTEP", "1.1", 1.0, 3.0, "base"),
        ("ACTION", "1.1.1", 1.0, 3.0, "screw"),
        ("SUBSTEP", "1.2", 3.2, 4.7, "top"),  # starts inside a frame: 3.2 s is in frame 6
        ("ACTION", "1.2.1", 3.2, 4.7, "glue"),
    ]
    return load_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))


def test_the_reference_state_after_a_frame_is_the_state_when_the_next_frame_starts(tree):
    # 2 fps: frame f covers [f/2, (f+1)/2) s. The action starts at 1.0 s: frame 1 ([0.5, 1.0))
    # ends with it not started, frame 2 ([1.0, 1.5)), the frame its start falls in (and the one
    # the training labels mark), ends with it in progress; it completes at 3.0 s, in frame 6.
    fps, start = 2.0, 0
    labels = SimpleNamespace(
        clip=SimpleNamespace(fps=fps), start=start, initial_state={}, dst_updates={2: "x"}
    )
    traces = [SimpleNamespace(frame=f, state={}, dst_valid=None) for f in range(8)]
    ref = dst_inputs({"labels": labels, "traces": traces, "tree": tree})["ref_states"]
    action = [s["1.1.1"] for s in ref]
    assert action == [NOT_STARTED] * 2 + [IN_PROGRESS] * 4 + [COMPLETED] * 2
    # a start inside frame 6 ([3.0, 3.5) s) is in the state after it, not in the one before
    assert [s["1.2.1"] for s in ref] == [NOT_STARTED] * 6 + [IN_PROGRESS] * 2
    assert dst_inputs({"labels": labels, "traces": traces, "tree": None}) is None


def test_an_invalid_decoded_update_is_still_a_predicted_update(tree):
    # the update head fired at frames 1 and 3; frame 3's text was invalid (then repaired): both
    # are predictions for update F1, and the valid ratio counts the one that needed no repair
    labels = SimpleNamespace(
        clip=SimpleNamespace(fps=2.0), start=0, initial_state={}, dst_updates={2: "x"}
    )
    valid = [None, True, None, False, None]
    traces = [SimpleNamespace(frame=f, state={}, dst_valid=v) for f, v in enumerate(valid)]
    got = dst_inputs({"labels": labels, "traces": traces, "tree": tree})
    assert got["pred_updates"] == [1, 3] and got["valid"] == [True, False]
    assert got["ref_updates"] == [2]


def test_the_reference_turn_is_silent_for_a_lone_dot():
    labels = SimpleNamespace(responses={3: ["."], 4: ["Screw it in.", "later"]})
    assert [reference_text(labels, f) for f in (2, 3, 4)] == ["", "", "Screw it in."]


def test_caption_metrics_use_only_the_matches_above_the_similarity_threshold():
    # "correct" is s > 0.5 (docs/evaluation.md): a match at exactly 0.5 is not one
    gen = ["Insert the pin.", "", "Open the lid now.", "Turn it."]
    ref = ["", "Insert the pin.", "Tighten the red screw.", "Flip the base over."]
    good, bad, edge = (0, 1, 0.93), (2, 2, 0.21), (3, 3, SIM_THRESHOLD)
    scores = score_matches(
        [VideoTurns("v", 2.0, "ego4d", gen, ref)], [MatchResult([good, bad, edge])]
    )
    right = ("Insert the pin.", "Insert the pin.")
    expected = caption_scores([right], jaccard=scores["jaccard"])
    for wrong in (
        ("Open the lid now.", "Tighten the red screw."),
        ("Turn it.", "Flip the base over."),
    ):
        assert caption_scores([right, wrong], jaccard=scores["jaccard"]) != expected
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key
    assert (scores["matches"], scores["correct_matches"]) == (3, 1)


def test_baseline_clips_max_context_and_embedding_model_reach_the_run(
    demo_root,
    model_folder,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from dst_train.data.dataset import load_split
    from dst_train.eval import evaluate as ev
    from dst_train.infer.stream import StreamingAssistant

    contexts, real_init = [], StreamingAssistant.__init__

    def recording(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        contexts.append(self.max_context)

    monkeypatch.setattr(StreamingAssistant, "__init__", recording)
    out = tmp_path / "eval"
    report = ev.evaluate(
        model_folder, demo_root, out=out, split="train", baseline=True, baseline_clips=1,
        max_clips=2, max_new_tokens=2, stream_batch=2, device="cpu", embedding_model="minilm",
        max_context=700,
    )  # fmt: skip
    assert report["clips"] == 2 and report["baseline_clips"] == 1
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert len((out / "baseline_predictions.jsonl").read_text().splitlines()) == 1
    assert "metrics_on_baseline_clips" in report
    assert report["metrics_on_baseline_clips"] != report["metrics"]  # 1 clip, not 2
    assert report["metrics_on_baseline_clips"] != report["baseline_metrics"]  # the model's
    assert contexts and set(contexts) == {700}
    assert json.loads((out / "traces" / "settings.json").read_text())["max_context"] == 700
    assert "minilm" in report["embedding_model"]  # not the mpnet default
    # the clips' DST (every demo video has a tree) is scored: its reference updates are counted
    streamed = load_split(demo_root, "train")[:2]
    metrics = report["metrics"]
    assert metrics["updates_reference"] == sum(len(lb.dst_updates) for lb in streamed) > 0
    assert metrics["dst_state_accuracy"] is not None


def test_a_clip_that_starts_late_in_its_video_lines_up_its_references():
    # ProAssist cuts long videos into clips: trace i of a clip is absolute frame start + i
    from dst_train.data.labels import build_clip_labels
    from dst_train.data.proassist import ClipRecord, Turn
    from dst_train.eval.evaluate import video_turns

    conv = [
        Turn("system", "sys"),
        Turn("frames", start=20, end=24),
        Turn("assistant", "Attach the wheel.", time=12.0),
        Turn("frames", start=24, end=30),
    ]
    labels = build_clip_labels(ClipRecord("assembly101", "v", 3, "f.arrow", 20, 30, conv))
    traces = [SimpleNamespace(response="") for _ in range(10)]
    turns = video_turns({"labels": labels, "traces": traces})
    assert turns.ref == [""] * 3 + ["Attach the wheel."] + [""] * 6
    assert turns.video_uid == "v_3"


def test_a_late_clips_reference_updates_are_frames_of_the_clip(tmp_path):
    """The DST reference of a clip that starts at frame 20: an action from 11 s to 13 s (2 fps)
    changes state on absolute frames 22 and 26, which are the clip's frames 2 and 6."""
    from dst_train.data.labels import build_clip_labels
    from dst_train.data.proassist import ClipRecord, Turn
    from dst_train.eval.evaluate import dst_inputs

    rows = [("STEP", "1", "", "", "s"), ("SUBSTEP", "1.1", "", "", "u"),
            ("ACTION", "1.1.1", 11.0, 13.0, "a")]  # fmt: skip
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))
    conv = [Turn("system", "sys"), Turn("frames", start=20, end=30)]
    labels = build_clip_labels(ClipRecord("assembly101", "v", 3, "f.arrow", 20, 30, conv), tree)
    traces = [SimpleNamespace(frame=20 + i, state={}, dst_valid=None) for i in range(10)]
    got = dst_inputs({"labels": labels, "traces": traces, "tree": tree})
    assert got["ref_updates"] == [2, 6]
    assert [s["1.1.1"] for s in got["ref_states"]][1:4] == [NOT_STARTED, IN_PROGRESS, IN_PROGRESS]


def test_resume_names_the_trace_file_and_line_it_cannot_read(tmp_path):
    from dst_train.eval.evaluate import SETTINGS_FILE, StaleTraces, finished_traces, trace_file

    clip = SimpleNamespace(video_uid="v1", clip_idx=0)
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"split": "test"}))
    good = {"frame": 0, "time": 0.0, "speak_prob": 0.1, "update_prob": 0.2}
    path = trace_file(tmp_path, clip)
    path.write_text(json.dumps(good) + "\n")
    got = finished_traces(tmp_path, {"split": "test"}, [SimpleNamespace(clip=clip)])
    assert got[0][0].speak_prob == 0.1
    for bad in ("{not json", json.dumps({**good, "mystery": 1}), json.dumps([1, 2])):
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(StaleTraces, match=rf"{path}:2: not a trace record .*--resume"):
            finished_traces(tmp_path, {"split": "test"}, [SimpleNamespace(clip=clip)])
    settings = tmp_path / SETTINGS_FILE
    for bad, why in (("[1]", "not a JSON object"), ("{torn", "Expecting property name")):
        settings.write_text(bad)  # the run settings file, not written by us
        with pytest.raises(StaleTraces, match=rf"{settings}: unreadable \({why}.*--resume"):
            finished_traces(tmp_path, {"split": "test"}, [SimpleNamespace(clip=clip)])


def test_the_decoding_limit_is_a_quarter_longer_than_the_longest_reference_turn(
    demo_root, tiny_model_dir
):
    from dst_train.data.dataset import load_split
    from dst_train.eval.evaluate import auto_max_new_tokens
    from dst_train.model.backbone import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    labels = load_split(demo_root, "test")
    texts = [t for lb in labels for ts in lb.responses.values() for t in ts]
    texts += [t for lb in labels for t in lb.dst_updates.values()]  # DST turns count too
    longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert longest >= 10  # long enough for a quarter to be tokens
    limit = auto_max_new_tokens(tok, labels)
    assert limit == int(1.25 * longest) + 2
    assert auto_max_new_tokens(adding_special_tokens(tok), labels) == limit  # turns, not BOS/EOS
    assert auto_max_new_tokens(tok, []) == int(1.25 * 48) + 2  # no reference turn: 48 tokens


def test_each_process_of_a_launched_evaluation_takes_its_own_gpu(monkeypatch):
    import torch

    from dst_train.ranks import Ranks, inference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with GPUs
    for asked in ("auto", "cuda"):  # the LOCAL_RANK-th GPU
        assert inference_device(asked, local_rank=1) == torch.device("cuda", 1)
    assert inference_device("cuda:0", local_rank=1) == torch.device("cuda", 0)  # as named
    assert inference_device("cpu", local_rank=1) == torch.device("cpu")
    # evaluate and cache-features compute where Ranks.device says, and make it the current GPU
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert Ranks(1, 2, local_rank=1).device() == torch.device("cuda", 1) == current[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device("auto", local_rank=1) == torch.device("cpu")


def test_the_report_table_has_a_column_per_model_and_na_where_a_metric_is_undefined():
    from dst_train.eval.report import ROWS, table

    trained = {k: 0.5 for k in ROWS} | {"speak_f1": 0.8125, "update_precision": None}
    report = {
        "metrics": trained,
        "baseline_clips": 2,
        "metrics_on_baseline_clips": {k: 0.25 for k in ROWS},
        "baseline_metrics": {k: 0.0 for k in ROWS},
    }
    lines = table(report).splitlines()
    assert lines[0] == (
        "| metric | trained | trained, first 2 clips | untrained baseline, first 2 clips |"
    )
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines[2:]}
    assert list(rows) == list(ROWS)
    assert rows["speak_f1"] == "| speak_f1 | 0.812 | 0.250 | 0.000 |"
    assert rows["update_precision"] == "| update_precision | n/a | 0.250 | 0.000 |"
    # without a baseline: one column
    assert table({"metrics": trained}).splitlines()[0] == "| metric | trained |"


def test_the_baseline_is_an_untrained_model_the_same_on_every_load(
    model_folder,  # noqa: F811
    tmp_path,
):
    """``--baseline`` builds the architecture with fresh random weights, never the folder's. The
    test model's backbone is itself a seed-0 random init, bit-identical to the baseline's, so a
    copy with moved backbone weights stands for a trained one."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from dst_train.eval.evaluate import load_models

    trained = tmp_path / "trained"
    shutil.copytree(model_folder, trained)
    weights = trained / "model.safetensors"
    save_file({k: v + 0.5 for k, v in load_file(weights).items()}, weights, {"format": "pt"})
    models = load_models(trained, baseline=True)
    model, base = models["model"].state_dict(), models["baseline"].state_dict()
    again = load_models(trained, baseline=True)["baseline"].state_dict()
    matrices = [k for k in model if k.startswith("backbone.") and model[k].dim() >= 2]
    assert matrices and not any(torch.equal(base[k], model[k]) for k in matrices)
    assert all(torch.equal(base[k], again[k]) for k in base)
