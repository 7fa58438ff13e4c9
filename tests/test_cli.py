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


@pytest.mark.parametrize("argv, option", MISSING, ids=[" ".join(a) for a, _ in MISSING])
def test_a_subcommand_without_a_required_option_names_it_and_exits_2(argv, option, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required" in err and option in err, err
