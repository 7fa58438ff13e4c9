"""``make-tiny-model`` shape options: the LM size asked for, and a clear refusal otherwise."""

import json

import pytest

from dst_train.cli import main


def test_tiny_model_has_the_asked_lm_shape(demo_root, tmp_path):
    out = tmp_path / "models" / "m"  # a folder whose parent does not exist yet
    args = ["make-tiny-model", "--data", str(demo_root), "--out", str(out)]
    assert main([*args, "--hidden", "96", "--layers", "3"]) == 0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (96, 3)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (6, 3)
    # untied LM head and embeddings, as in SmolVLM2-2.2B: the tiny model takes the path the
    # real model takes through LoRA, ZeRO and convert
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_tiny_model_refuses_a_hidden_size_heads_cannot_split(demo_root, tmp_path, capsys):
    args = ["make-tiny-model", "--data", str(demo_root), "--out", str(tmp_path / "m")]
    assert main([*args, "--hidden", "80"]) == 2
    assert "hidden 80 must be a multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "hidden, layers, ok", [(32, 1, True), (32, 0, False), (16, 1, False), (48, 2, False)]
)
def test_tiny_shape_bounds(hidden, layers, ok):
    """The smallest LM that splits into heads: hidden 32 (2 heads of 16, 1 key/value head) and
    one layer; below that, or a hidden size that is not a multiple of 32, is refused."""
    from dst_train.model.smolvlm import check_tiny_shape

    if ok:
        check_tiny_shape(hidden, layers)
    else:
        with pytest.raises(ValueError, match=f"hidden {hidden} must be a multiple of 32"):
            check_tiny_shape(hidden, layers)


@pytest.mark.parametrize("arch", ["smolvlm2-256m", "qwen2.5-vl-3b"])
def test_arch_folder_has_the_real_shapes_and_a_working_tokenizer(demo_root, tmp_path, arch):
    """`make-tiny-model --arch`: the named architecture offline — real vocabulary size, the image
    token where the config says, text round-trips, and the parameter count of the real model."""
    from dst_train.config import ModelConfig
    from dst_train.model.backbone import (
        arch_config,
        family_of,
        load_image_processor,
        load_tokenizer,
    )
    from dst_train.model.info import model_info

    out = tmp_path / "models" / "m"  # a folder whose parent does not exist yet
    args = ["make-tiny-model", "--data", str(demo_root), "--out", str(out)]
    assert main([*args, "--arch", arch]) == 0
    assert not list(out.glob("*.safetensors"))  # random init: model.pretrained=false
    config, real, fam = arch_config(str(out)), arch_config(arch), family_of(arch)
    tok = load_tokenizer(str(out))
    assert len(tok) == config.text_config.vocab_size == real.text_config.vocab_size
    assert tok.convert_tokens_to_ids(fam.CHAT.image) == config.image_token_id
    assert config.text_config.pad_token_id == tok.pad_token_id
    text = "pick up the red screwdriver and tighten the wheel"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < 1024  # encoding never produces the filler tokens
    assert load_image_processor(str(out)).image_size == fam.frame_size(real)
    ours = model_info(ModelConfig(arch=str(out), pretrained=False))["parameters"]
    assert ours == model_info(ModelConfig(arch=arch, pretrained=False))["parameters"]
    assert main([*args, "--arch", arch]) == 0  # the same command again rewrites the folder
    assert arch_config(str(out)).to_dict() == config.to_dict()


def test_arch_folder_refuses_an_unknown_architecture(demo_root, tmp_path, capsys):
    args = ["make-tiny-model", "--data", str(demo_root), "--out", str(tmp_path / "m")]
    assert main([*args, "--arch", "smolvlm9-1t"]) == 2
    assert "unknown architecture 'smolvlm9-1t'" in capsys.readouterr().err


def test_the_tiny_tokenizer_learns_the_datas_own_turns(demo_root):
    # the demo's sequences are mostly turns: a tokenizer trained without them (node names and
    # states only) spends ~3 tokens a word on them, one trained on them ~1.3 (measured)
    from dst_train.data.dataset import SPLITS, load_split
    from dst_train.model.tiny import demo_corpus, train_tokenizer

    turns = [
        t.content
        for split in SPLITS
        for clip in load_split(demo_root, split)
        for t in clip.clip.conversation
        if t.role != "frames"
    ]
    tok = train_tokenizer(demo_corpus(demo_root))
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in turns)
    assert tokens / sum(len(t.split()) for t in turns) < 2.0
