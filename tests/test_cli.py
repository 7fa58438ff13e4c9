"""The CLI's usage: each subcommand names the option it cannot run without."""

import pytest

from dst_train.cli import main

# subcommand and the options given → the required option left out. Written out here, not read
# from the parser: a run without its config would otherwise go on with every default
MISSING = [
    (["make-demo-data"], "--out"),
    (["make-tiny-model", "--out", "m"], "--data"),
    (["make-tiny-model", "--data", "d"], "--out"),
    (["cache-features", "--out", "c"], "--config"),
    (["cache-features", "--config", "r.yaml"], "--out"),
    (["train"], "--config"),
    (["autotune"], "--config"),
    (["evaluate", "model"], "--data"),
]


def _usage_error(argv: list[str], capsys) -> str:
    """argparse's error line for ``argv`` (it exits 2 before any job starts)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, option", MISSING, ids=[" ".join(a) for a, _ in MISSING])
def test_a_subcommand_without_a_required_option_names_it_and_exits_2(argv, option, capsys):
    err = _usage_error(argv, capsys)
    assert "the following arguments are required" in err and option in err, err


# a numeric option out of its range → argparse's error line naming it, before anything runs.
# Each of these went on before: --max-clips -1 evaluated every clip but the last, --fraction 90
# planned for 90 times the card, --batch-size 0 ended in a traceback once the model was loaded
OUT_OF_RANGE = [
    (["model-info", "--gpus", "two"], "--gpus: invalid int value: 'two'"),
    (["autotune", "--config", "r.yaml", "--fraction", "most"],
     "--fraction: invalid float value: 'most'"),
    (["model-info", "--gpus", "0"], "--gpus: need at least 1, got 0"),
    (["model-info", "--tokens-per-frame", "-4"], "--tokens-per-frame: need at least 0, got -4"),
    (["cache-features", "--config", "r.yaml", "--out", "c", "--batch-size", "0"],
     "--batch-size: need at least 1, got 0"),
    (["autotune", "--config", "r.yaml", "--fraction", "90"],
     "--fraction: need a share in (0, 1], got 90"),
    (["autotune", "--config", "r.yaml", "--fraction", "0"],
     "--fraction: need a share in (0, 1], got 0"),
    (["autotune", "--config", "r.yaml", "--target-gb", "-24"],
     "--target-gb: need a positive number, got -24"),
    (["autotune", "--config", "r.yaml", "--target-gb", "inf"],
     "--target-gb: need a positive number, got inf"),
    (["autotune", "--config", "r.yaml", "--max-micro", "0"], "--max-micro: need at least 1, got 0"),
    (["autotune", "--config", "r.yaml", "--global-batch", "-8"],
     "--global-batch: need at least 0, got -8"),
    (["evaluate", "m", "--data", "d", "--max-clips", "-1"], "--max-clips: need at least 1, got -1"),
    (["evaluate", "m", "--data", "d", "--baseline-clips", "0"],
     "--baseline-clips: need at least 1, got 0"),
    (["evaluate", "m", "--data", "d", "--max-new-tokens", "0"],
     "--max-new-tokens: need at least 1, got 0"),
    (["evaluate", "m", "--data", "d", "--max-context", "0"],
     "--max-context: need at least 1, got 0"),
    (["evaluate", "m", "--data", "d", "--stream-batch", "0"],
     "--stream-batch: need at least 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("argv, message", OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_a_numeric_option_out_of_range_is_named_and_exits_2(argv, message, capsys):
    err = _usage_error(argv, capsys)
    assert f"argument {message}" in err, err


def test_the_ends_of_the_numeric_ranges_parse():
    """The smallest values that mean something (0 = the default where the help says so)."""
    from dst_train.cli import build_parser

    parse = build_parser().parse_args
    info = parse(["model-info", "--gpus", "1", "--tokens-per-frame", "0"])
    assert (info.gpus, info.tokens_per_frame) == (1, 0)
    tune = parse(["autotune", "--config", "r", "--fraction", "1", "--target-gb", "0.5",
                  "--max-micro", "1", "--global-batch", "0"])  # fmt: skip
    assert (tune.fraction, tune.target_gb, tune.max_micro, tune.global_batch) == (1, 0.5, 1, 0)
    ev = parse(["evaluate", "m", "--data", "d", "--max-clips", "1", "--baseline-clips", "1",
                "--max-new-tokens", "1", "--max-context", "1", "--stream-batch", "1"])  # fmt: skip
    assert (ev.max_clips, ev.baseline_clips, ev.max_new_tokens, ev.max_context) == (1, 1, 1, 1)
    assert ev.stream_batch == 1
    assert (
        parse(["cache-features", "--config", "r", "--out", "c", "--batch-size", "1"]).batch_size
        == 1
    )


def test_model_info_takes_its_options_and_names_what_it_cannot_read(capsys):
    """``--tokens-per-frame`` reaches the count (1 by default); a bad override, a pooling the
    vision grid cannot make and a model folder that is not there are error lines, exit 2."""
    import json

    assert main(["model-info", "--arch", "smolvlm2-256m", "--tokens-per-frame", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_per_frame"] == 4
    bad = {
        ("model.bogus=1",): "error: config.model: unknown key(s) ['bogus']",
        ("--arch", "smolvlm2-256m", "--tokens-per-frame", "3"): "error: tokens_per_frame must be",
        # not a hub id ("namespace/name"): a folder, and it is not there
        ("--arch", "/nowhere/model"): "error: /nowhere/model: no model folder there (no config",
    }
    for argv, message in bad.items():
        assert main(["model-info", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message), err


def test_train_and_autotune_exit_with_the_code_of_what_stopped_them(
    demo_root, tiny_model_dir, monkeypatch, capsys
):
    """A run the trainer stopped (an OOM it cannot replay, an fp16 overflow streak) is exit 1
    with its reason; missing inputs are exit 2 for autotune as for train, before anything runs."""
    from dst_train.engine import trainer

    def stopped(cfg):
        raise trainer.TrainingStopped("7 optimizer steps in a row were skipped")

    monkeypatch.setattr(trainer, "fit", stopped)  # the job, not the CLI, is what this stands in
    good = ["--config", "/dev/null", f"data.root={demo_root}", f"model.arch={tiny_model_dir}"]
    assert main(["train", *good]) == 1
    assert capsys.readouterr().err == "training stopped: 7 optimizer steps in a row were skipped\n"
    assert main(["autotune", "--config", "/dev/null", "data.root=/nowhere"]) == 2
    assert capsys.readouterr().err.startswith("error: missing inputs:\n  data.root=/nowhere")
