"""QLoRA for real on the CPU: bitsandbytes nf4 weights, DeepSpeed ZeRO-2 on 2 gloo ranks,
convert from the base + what trained, evaluate."""

import json
import subprocess
import sys

import pytest
import torch

from dst_train.config import ConfigError
from tests.conftest import tiny_run_config
from tests.engine.helpers import REPO, base_overrides, run_training

QLORA = ["model.lora=true", "model.qlora=true"]


def test_only_the_language_model_trunk_is_4bit_and_prepared(demo_root, tiny_family_dir):
    import bitsandbytes as bnb

    from dst_train.model.build import build_model, group_of, resolve_precision

    cfg = tiny_run_config(demo_root, tiny_family_dir, *QLORA, "model.cpu_dtype=bf16")
    model = build_model(cfg.model, cfg.head_config(), resolve_precision(cfg.model, None))
    hf = model.backbone.hf
    assert hf.is_loaded_in_4bit
    groups = model.backbone.module_groups()
    four_bit = {
        k: any(isinstance(m, bnb.nn.Linear4bit) for m in g.modules()) for k, g in groups.items()
    }
    # the skip list names full module paths: "vision_model" alone matched nothing in
    # transformers 5 and the tower and connector were quantized too
    assert four_bit == {"vision": False, "connector": False, "lm": True, "lm_head": False}
    # peft's preparation ran on the model that carries the 4-bit flag: the LM's norms (and every
    # other weight that is not 4-bit) are fp32, while the model was loaded in bf16
    norms = [p for n, p in groups["lm"].named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {group_of(n) for n in trainable} == {"lora", "heads", "connector"}


def test_qlora_under_zero3_or_without_pretrained_weights_is_refused(demo_root, tiny_model_dir):
    with pytest.raises(ConfigError, match="model.qlora=true cannot run under ZeRO-3"):
        tiny_run_config(demo_root, tiny_model_dir, *QLORA, "train.ds_config=ds_configs/zero3.json")
    with pytest.raises(ConfigError, match="model.qlora needs model.pretrained=true"):
        tiny_run_config(demo_root, tiny_model_dir, *QLORA, "model.pretrained=false")


def test_qlora_trains_on_two_ranks_converts_and_evaluates(demo_root, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import SmolVLMForConditionalGeneration

    out = tmp_path / "run"
    short = ["train.max_steps=4", "train.eval_every=0", "train.warmup_steps=1"]
    run_training([*base_overrides(demo_root, tiny_model_dir, out), *QLORA, *short])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 4 and losses[-1] < losses[0]

    hf = tmp_path / "hf"
    cmd = [sys.executable, "-m", "dst_train.cli", "convert", str(out), str(hf)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the frozen base comes from the pretrained folder in full precision, LoRA merged into it:
    # the trained projections moved, the untouched weights are the base's exactly
    merged = load_file(hf / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    q = "model.text_model.layers.0.self_attn.q_proj.weight"
    assert merged[q].dtype == torch.float32 and not torch.equal(merged[q], base[q])
    emb = "model.text_model.embed_tokens.weight"
    assert torch.equal(merged[emb], base[emb])
    SmolVLMForConditionalGeneration.from_pretrained(hf)  # a plain transformers folder

    cmd = [sys.executable, "-m", "dst_train.cli", "evaluate", str(hf), "--data", str(demo_root)]
    cmd += ["--out", str(tmp_path / "eval"), "--max-clips", "1", "--max-new-tokens", "2"]
    cmd += ["--device", "cpu", "--embedding-model", "minilm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["clips"] == 1
