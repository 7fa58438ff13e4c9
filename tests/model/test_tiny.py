"""``make-tiny-model`` shape options: the LM size asked for, and a clear refusal otherwise."""

import json

from dst_train.cli import main


def test_tiny_model_has_the_asked_lm_shape(demo_root, tmp_path):
    out = tmp_path / "m"
    args = ["make-tiny-model", "--data", str(demo_root), "--out", str(out)]
    assert main([*args, "--hidden", "96", "--layers", "3"]) == 0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (96, 3)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (6, 3)


def test_tiny_model_refuses_a_hidden_size_heads_cannot_split(demo_root, tmp_path, capsys):
    args = ["make-tiny-model", "--data", str(demo_root), "--out", str(tmp_path / "m")]
    assert main([*args, "--hidden", "80"]) == 2
    assert "hidden 80 must be a multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
