"""A LoRA run converts two ways — merged into the weights, or base + adapter — and both give the
same outputs; the merged backbone loads with plain transformers."""

import torch

from dst_train.data.collate import make_collate
from dst_train.data.pipeline import make_dataset
from dst_train.engine.convert import convert
from dst_train.model.backbone import load_image_processor, load_tokenizer
from dst_train.model.dst_model import DSTModel
from tests.conftest import tiny_run_config
from tests.engine.helpers import base_overrides, run_training


def test_lora_run_converts_merged_or_as_adapter(demo_root, tiny_family_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    run_training(
        [
            *base_overrides(demo_root, tiny_family_dir, out),
            "model.lora=true",
            "model.lora_r=4",
            "train.max_steps=3",
            "train.eval_every=0",
        ],
        launcher="python",
        nproc=1,
    )
    from dst_train.cli import main

    merged = DSTModel.from_pretrained(convert(out, tmp_path / "merged")["out"])
    assert main(["convert", str(out), str(tmp_path / "adapter"), "--keep-adapter"]) == 0
    assert (tmp_path / "adapter" / "lora_adapter" / "adapter_config.json").is_file()
    base = DSTModel.from_pretrained(tmp_path / "adapter")
    base.backbone.set_language_model(
        PeftModel.from_pretrained(
            base.backbone.language_model, tmp_path / "adapter" / "lora_adapter"
        )
    )
    cfg = tiny_run_config(demo_root, tiny_family_dir)
    tok = load_tokenizer(cfg.model.arch)
    ds = make_dataset(cfg, "train", tok, merged.backbone, load_image_processor(cfg.model.arch))
    batch = make_collate(tok.pad_token_id, False)([ds[0]])
    merged.eval()
    base.eval()
    with torch.no_grad():
        a, b = merged(**batch), base(**batch)
    for k in ("loss", "speak_logits", "update_logits", "dst_loss"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # the adapter really changed the LM: the untouched tiny model differs
    plain = DSTModel.from_pretrained(tmp_path / "adapter")
    plain.eval()
    with torch.no_grad():
        c = plain(**batch)
    assert (a["response_loss"] - c["response_loss"]).abs() > 1e-4
    assert not (tmp_path / "merged" / "lora_adapter").exists()


def _dtypes(path) -> set:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_convert_dtype_option_sets_the_saved_weights(demo_root, tiny_model_dir, tmp_path):
    from dst_train.cli import main

    out = tmp_path / "run"
    run_training(
        [*base_overrides(demo_root, tiny_model_dir, out), "train.max_steps=1"],
        launcher="python",
        nproc=1,
    )
    for dtype, name in (("fp32", "F32"), ("bf16", "BF16"), ("fp16", "F16")):
        folder = tmp_path / dtype
        assert main(["convert", str(out), str(folder), "--dtype", dtype]) == 0
        assert _dtypes(folder / "model.safetensors") == {name}
