"""The second backbone family end to end: a tiny random Qwen2.5-VL (real transformers classes, a
locally trained tokenizer with Qwen's chat tokens) trains under DeepSpeed on 2 gloo ranks,
converts to a plain transformers folder, evaluates — and learns: the loss falls and the
speak/update decisions beat the untrained baseline. Nothing outside dst_train/model/ knows the
family; this is the same command line as the SmolVLM demo."""

import json
import subprocess
import sys

import pytest

from dst_train.cli import main
from tests.engine.helpers import REPO, metrics, run_training


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    from dst_train.model.tiny import demo_corpus, make_tiny_model

    root = tmp_path_factory.mktemp("qwen")
    data = root / "data"
    args = ["--out", data, "--seed", "3", "--videos", "12", "--image-size", "64", "--held-out", "2"]
    assert main(["make-demo-data", *map(str, args)]) == 0  # 8 train, 2 val, 2 test videos
    model = make_tiny_model(root / "tiny", demo_corpus(data), seed=0, family_name="qwen2.5-vl")
    out = root / "run"
    run_training(
        [
            f"data.root={data}",
            f"model.arch={model}",
            f"output_dir={out}",
            "train.max_steps=100",
            "train.lr=0.01",
            "train.warmup_steps=5",
            "train.eval_every=50",
            "train.save_every=100",
            "train.tensorboard=false",
        ],
        timeout=900,
    )
    return data, out


def _cli(*args, timeout=900):
    cmd = [sys.executable, "-m", "dst_train.cli", *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_tiny_qwen_trains_converts_evaluates_and_learns(qwen_run, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    data, out = qwen_run
    rows = metrics(out)
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    val = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    assert len(train) == 100 and sum(train[-10:]) < 0.2 * sum(train[:10])
    assert len(val) == 2 and val[1] < val[0]

    hf = tmp_path / "hf"
    _cli("convert", out, hf)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(hf)  # a plain transformers folder
    # on the clips it trained on: the decisions it learned, against an untrained model
    _cli(
        "evaluate", hf, "--data", data, "--split", "train", "--out", tmp_path / "eval",
        "--baseline", "--embedding-model", "minilm", "--max-new-tokens", "16", "--device", "cpu",
    )  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    ours, untrained = report["metrics"], report["baseline_metrics"]
    for key in ("speak_f1", "update_f1"):
        assert ours[key] > untrained[key] + 0.2, (key, ours[key], untrained[key])
