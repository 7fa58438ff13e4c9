import pytest
import torch

from dst_train.config import ModelConfig
from dst_train.data.collate import make_collate
from dst_train.data.pipeline import make_dataset
from dst_train.model.backbone import (
    check_tokens_per_frame,
    load_image_processor,
    load_tokenizer,
    pool_patches,
)
from dst_train.model.build import (
    Precision,
    build_model,
    group_of,
    parameter_counts,
    resolve_precision,
)
from dst_train.model.dst_model import DSTModel
from dst_train.model.frames import backbone_cache_key, build_feature_cache
from dst_train.model.info import model_info
from dst_train.model.precision import DTYPES
from tests.conftest import tiny_run_config

FP32 = Precision("fp32", "sdpa")

GIB = 2**30  # the table's unit, written out here: imported, a wrong unit would cancel out


def _setup(demo_root, tiny_model_dir, *overrides, n=2, precision=FP32):
    cfg = tiny_run_config(demo_root, tiny_model_dir, *overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.head_config(), precision)
    tok = load_tokenizer(cfg.model.arch)
    proc = load_image_processor(cfg.model.arch)
    ds = make_dataset(cfg, "train", tok, model.backbone, proc)
    ds.samples = ds.samples[:n]
    batch = make_collate(tok.pad_token_id, bool(cfg.data.feature_cache))([ds[i] for i in range(n)])
    return cfg, model, batch


def test_forward_returns_every_loss_and_grads_reach_the_heads(demo_root, tiny_family_dir):
    _, model, batch = _setup(demo_root, tiny_family_dir)
    out = model(**batch)
    for name in ("speak_loss", "update_loss", "response_loss", "dst_loss"):
        assert out[name].dtype == torch.float32 and out[name].item() > 0
    assert out["loss"].item() == pytest.approx(
        sum(out[k].item() for k in ("speak_loss", "update_loss", "response_loss", "dst_loss")),
        rel=1e-6,
    )
    assert out["speak_logits"].shape == batch["speak"].shape
    out["loss"].backward()
    for head in (model.speak_head, model.update_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    groups = model.backbone.module_groups()
    conn = list(groups["connector"].parameters())
    assert conn and all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn)
    vision = list(groups["vision"].parameters())
    assert vision and all(p.grad is None for p in vision)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_model_gives_the_fp32_losses(demo_root, tiny_family_dir, dtype):
    """What a GPU run builds (fp16 on a Titan RTX, bf16 on newer cards): the whole model, heads
    included, in half precision, fed the collator's 8-bit pixels. The losses are still fp32 and
    within rounding of the fp32 model's; the backward pass reaches the heads."""
    _, ref_model, batch = _setup(demo_root, tiny_family_dir)
    ref = ref_model(**batch)
    _, model, _ = _setup(demo_root, tiny_family_dir, precision=Precision(dtype, "sdpa"))
    assert {p.dtype for p in model.parameters()} == {DTYPES[dtype]}
    out = model(**batch)
    assert out["speak_logits"].dtype == DTYPES[dtype]
    for name in ("speak_loss", "update_loss", "response_loss", "dst_loss"):
        assert out[name].dtype == torch.float32
        assert out[name].item() == pytest.approx(ref[name].item(), rel=0.02), name
    out["loss"].backward()
    grads = [p.grad for head in (model.speak_head, model.update_head) for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_loss_weights_and_bce_option(demo_root, tiny_model_dir):
    _, model, batch = _setup(
        demo_root, tiny_model_dir, "loss.dst_weight=0", "loss.decision_loss=bce"
    )
    out = model(**batch)
    assert out["loss"].item() == pytest.approx(
        out["speak_loss"].item() + out["update_loss"].item() + out["response_loss"].item(), rel=1e-6
    )
    # heads start at the 5 % prior, so plain BCE on mostly-negative frames starts small
    assert out["speak_loss"].item() < 0.5


def _trainable(model):
    return {g: c["trainable"] for g, c in parameter_counts(model).items()}


def test_freeze_and_lora_change_exactly_the_trainable_parts(tiny_family_dir):
    def build(**kw):
        return build_model(ModelConfig(arch=str(tiny_family_dir), **kw), tiny_head(), FP32)

    counts = parameter_counts(build())
    assert all(counts[g]["total"] > 0 for g in ("vision", "connector", "lm", "lm_head", "heads"))
    t = _trainable(build())  # default: vision frozen, everything else trains
    assert t["vision"] == 0 and t["connector"] == counts["connector"]["total"]
    assert t["lm"] == counts["lm"]["total"] and t["heads"] == counts["heads"]["total"]
    t = _trainable(build(freeze_vision=False, freeze_connector=True, freeze_lm=True))
    assert t["vision"] == counts["vision"]["total"] and t["connector"] == 0
    assert t["lm"] == 0 and t["lm_head"] == 0 and t["heads"] > 0
    model = build(lora=True, lora_r=4)
    t = _trainable(model)
    assert t["lm"] == 0 and t["lm_head"] == 0 and t["vision"] == 0
    assert t["lora"] > 0 and t["connector"] == counts["connector"]["total"] and t["heads"] > 0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {group_of(n) for n in names} == {"lora", "connector", "heads"}
    groups = model.backbone.module_groups()  # the groups the flags act on = the counted ones
    for name in ("vision", "connector"):
        assert sum(p.numel() for p in groups[name].parameters()) == counts[name]["total"]
    named = {id(p): n for n, p in model.named_parameters()}
    assert all(id(p) in named for p in groups["vision"].parameters())  # the model's own tensors


def tiny_head():
    from dst_train.model.dst_model import HeadConfig

    return HeadConfig()


def test_gradient_checkpointing_gives_the_same_loss(demo_root, tiny_family_dir):
    _, plain, batch = _setup(demo_root, tiny_family_dir)
    _, ckpt, _ = _setup(
        demo_root,
        tiny_family_dir,
        "model.gradient_checkpointing=true",
        "model.gradient_checkpointing_reentrant=true",
    )
    ckpt.train()
    a, b = plain(**batch)["loss"], ckpt(**batch)["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    b.backward()
    assert ckpt.backbone.language_model.layers[0].mlp.up_proj.weight.grad is not None


def test_the_training_and_val_forward_keep_no_kv_cache(demo_root, tiny_family_dir):
    # a cache in the val pass (no grad) would hold every layer's keys and values of the whole
    # micro-batch: ~0.8 GB a sample of 4096 tokens for smolvlm2-2.2b in fp16, on top of the
    # tuned size's peak
    _, model, batch = _setup(demo_root, tiny_family_dir)
    seen = []
    lm = model.backbone.language_model
    lm.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs["use_cache"], out.past_key_values)),
        with_kwargs=True,
    )
    model(**batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert seen == [(False, None), (False, None)]


def test_cached_features_equal_the_online_path(demo_root, tiny_family_dir, tmp_path):
    cfg, model, batch = _setup(demo_root, tiny_family_dir, "model.tokens_per_frame=1")
    proc = load_image_processor(cfg.model.arch)
    files = [
        s.frames_file
        for s in make_dataset(
            cfg, "train", load_tokenizer(cfg.model.arch), model.backbone, proc
        ).samples[:2]
    ]
    key = backbone_cache_key(model.backbone, proc.image_size)
    build_feature_cache(
        model.backbone, demo_root, files, tmp_path / "cache", proc, key, batch_size=16
    )
    _, _, cached = _setup(demo_root, tiny_family_dir, f"data.feature_cache={tmp_path / 'cache'}")
    assert "pixel_values" not in cached and cached["frame_features"].dtype == torch.float16
    online = model(**batch)
    vision = model.backbone.vision
    calls = []
    handle = vision.register_forward_hook(lambda *a: calls.append(1))
    offline = model(**cached)
    handle.remove()
    assert calls == []  # the vision tower never ran
    for k in ("speak_logits", "update_logits"):
        torch.testing.assert_close(online[k], offline[k], rtol=1e-3, atol=1e-3)
    for k in ("loss", "response_loss", "dst_loss"):
        assert online[k].item() == pytest.approx(offline[k].item(), rel=1e-3)


def test_cache_built_for_another_model_is_refused(demo_root, tiny_model_dir, tmp_path):
    cfg, model, _ = _setup(demo_root, tiny_model_dir)
    proc = load_image_processor(cfg.model.arch)
    build_feature_cache(model.backbone, demo_root, [], tmp_path / "c", proc, "other-key")
    with pytest.raises(Exception, match="built for another model"):
        _setup(demo_root, tiny_model_dir, f"data.feature_cache={tmp_path / 'c'}")


def test_tokens_per_frame_pooling():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    assert torch.equal(pool_patches(x, 4, 4), x)
    pooled = pool_patches(x, 4, 2)
    assert pooled.shape == (2, 4, 3)
    assert torch.allclose(pooled[0, 0], x[0, [0, 1, 4, 5]].mean(0))
    assert check_tokens_per_frame(9, 27, 3) == 9
    with pytest.raises(ValueError, match="perfect square"):
        check_tokens_per_frame(2, 27, 3)
    with pytest.raises(ValueError, match="at most 81 tokens"):
        check_tokens_per_frame(100, 27, 3)


def test_save_and_load_roundtrip(demo_root, tiny_family_dir, tmp_path):
    _, model, batch = _setup(demo_root, tiny_family_dir)
    with torch.no_grad():
        model.speak_head.net[-1].bias.fill_(0.3)
    model.backbone.hf.save_pretrained(tmp_path)
    model.save_heads(tmp_path)
    loaded = DSTModel.from_pretrained(tmp_path)
    model.eval()
    loaded.eval()
    a, b = model(**batch), loaded(**batch)
    for k in ("loss", "speak_logits", "update_logits"):
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(FileNotFoundError, match="not a dst-train model folder"):
        DSTModel.from_pretrained(tiny_family_dir)
    # a heads file that lacks a head's weight, or has one the model does not: refused by name
    from safetensors.torch import load_file, save_file

    from dst_train.model.dst_model import HEADS_FILE

    heads = load_file(str(tmp_path / HEADS_FILE))
    lost = next(k for k in heads if k.startswith("update_head."))
    without = {k: v for k, v in heads.items() if k != lost}
    extra = {**heads, "extra_head.weight": torch.ones(1)}
    for broken, name in ((without, lost), (extra, "extra_head.weight")):
        save_file(broken, str(tmp_path / HEADS_FILE))
        with pytest.raises(ValueError, match=f"{HEADS_FILE}: missing .*{name}"):
            DSTModel.from_pretrained(tmp_path)
    # so is a backbone checkpoint that lacks a weight (transformers would leave it random)
    save_file(heads, str(tmp_path / HEADS_FILE))
    weights = load_file(str(tmp_path / "model.safetensors"))
    lost = next(k for k in weights if "layers.0.mlp" in k)
    save_file({k: v for k, v in weights.items() if k != lost}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="checkpoint lacks 1 weights"):
        DSTModel.from_pretrained(tmp_path)


def test_pretrained_weights_come_from_the_hub_id_of_a_named_arch_or_a_folder_that_has_them(
    tiny_model_dir, tmp_path, monkeypatch
):
    import shutil

    from dst_train.model import smolvlm
    from dst_train.model.backbone import load_hf_model, model_source

    asked = []

    def from_pretrained(source, **kw):  # the hub is not reachable here: record, then stop
        asked.append(source)
        raise OSError("offline")

    monkeypatch.setattr(smolvlm.model_class(), "from_pretrained", from_pretrained)
    with pytest.raises(OSError, match="offline"):
        load_hf_model("smolvlm2-256m", True, torch.float32, "sdpa")
    assert asked == ["HuggingFaceTB/SmolVLM2-256M-Video-Instruct"]
    # and so do its tokenizer and processor files; a folder is its own source
    assert model_source("smolvlm2-256m") == asked[0]
    assert model_source(str(tmp_path)) == str(tmp_path)
    # a model folder with its config but no weights is named before transformers is asked
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no weights"):
        load_hf_model(str(tmp_path), True, torch.float32, "sdpa")
    assert len(asked) == 1


def test_a_named_models_files_that_cannot_be_had_say_how_to_get_them(monkeypatch):
    """Offline and not in the hub cache: the weights, tokenizer and processor of a named
    architecture are each a ModelUnavailable naming the hub id and the download command
    (transformers' own OSError, a traceback on every rank, said only "couldn't connect")."""
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    from dst_train.model import smolvlm
    from dst_train.model.backbone import (
        ModelUnavailable,
        load_hf_model,
        load_image_processor,
        load_tokenizer,
    )

    def unreachable(*args, **kw):  # what transformers raises without a network or cache
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore")

    for owner in (smolvlm.model_class(), AutoTokenizer, SmolVLMImageProcessorPil):
        monkeypatch.setattr(owner, "from_pretrained", unreachable)
    hub = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
    loads = {
        "weights": lambda: load_hf_model("smolvlm2-256m", True, torch.float32, "sdpa"),
        "tokenizer": lambda: load_tokenizer("smolvlm2-256m"),
        "image processor": lambda: load_image_processor("smolvlm2-256m"),
    }
    for what, load in loads.items():
        with pytest.raises(ModelUnavailable) as e:
            load()
        assert str(e.value).startswith(
            f"model.arch=smolvlm2-256m: cannot load its {what} from {hub} (We couldn't connect "
            "to 'https://huggingface.co' to load the files). A node without a network reads them "
            "from the Hugging Face cache: download the model once where there is one "
            f"(`huggingface-cli download {hub}`"
        ), e.value
    with pytest.raises(OSError, match="couldn't connect") as e:  # a hub id of the user's own
        load_tokenizer("someone/their-model")
    assert not isinstance(e.value, ModelUnavailable)


def test_training_a_named_model_offline_without_its_files_is_an_error_line(demo_root, tmp_path):
    """The real path, offline (HF_HUB_OFFLINE) with an empty hub cache: a shipped config's
    launch ends with one error line and exit 2, before a step or a file is written."""
    import os
    import subprocess
    import sys

    from tests.engine.helpers import REPO

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("LOCAL_RANK", None)
    argv = ["train", "--config", str(REPO / "launch/configs/smolvlm2-256m.yaml"),
            f"data.root={demo_root}", f"output_dir={tmp_path}/run"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "dst_train.cli", *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: model.arch=smolvlm2-256m: cannot load its weights from")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_real_architectures_build_on_meta_with_the_right_size():
    info = model_info(ModelConfig(arch="smolvlm2-2.2b"))
    assert info["parameters"]["all"]["total"] == pytest.approx(2.25e9, rel=0.005)
    assert info["native_tokens_per_image"] == 81 and info["lm_hidden"] == 2048
    small = model_info(ModelConfig(arch="smolvlm2-256m", tokens_per_frame=4))
    assert small["parameters"]["all"]["total"] == pytest.approx(0.256e9, rel=0.01)
    assert small["native_tokens_per_image"] == 64
    rows = {r["strategy"]: r["gpu_gib"] for r in info["memory"]}
    assert rows["zero0"] > rows["zero2"] > rows["zero2+offload"] > rows["zero3+offload"]


def test_model_info_prints_the_numbers_of_its_json(capsys):
    """The table a user reads: a row for each part that has parameters and for the whole model,
    a row for each ZeRO strategy, the same numbers as ``--json``."""
    import json

    from dst_train.cli import main

    assert main(["model-info", "--arch", "smolvlm2-256m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["model-info", "--arch", "smolvlm2-256m"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.strip()}
    parts = info["parameters"]
    assert parts["lora"]["total"] == 0 and "lora" not in rows  # no LoRA: no row
    for part, c in parts.items():
        if c["total"]:
            assert rows[part] == [f"{c['total']:,}", f"{c['trainable']:,}"], part
    for r in info["memory"]:
        assert rows[r["strategy"]] == [f"{r['gpu_gib']:.2f}", f"{r['cpu_gib']:.2f}"]


def test_precision_of_this_machine_is_cpu_safe():
    assert resolve_precision(ModelConfig(), capability=None).dtype == "fp32"
    assert resolve_precision(ModelConfig(), capability=(7, 5)).dtype == "fp16"


def test_cache_features_command_builds_the_cache_training_reads(
    demo_root, tiny_model_dir, tmp_path
):
    from dst_train.cli import main

    paths = [f"data.root={demo_root}", f"model.arch={tiny_model_dir}"]
    out = tmp_path / "cache"
    # the run's own config may already name the cache it is about to build
    args = ["cache-features", "--config", "/dev/null", "--out", str(out), "--batch-size", "5"]
    assert main([*args, *paths, f"data.feature_cache={out}"]) == 0
    _, model, online = _setup(demo_root, tiny_model_dir)
    _, _, cached = _setup(demo_root, tiny_model_dir, f"data.feature_cache={out}")
    assert "pixel_values" not in cached  # read from the cache the command wrote (key checked)
    for k in ("speak_logits", "update_logits"):
        torch.testing.assert_close(model(**online)[k], model(**cached)[k], rtol=1e-3, atol=1e-3)


def test_cache_features_refuses_a_trained_vision_tower(demo_root, tiny_model_dir, tmp_path, capsys):
    from dst_train.cli import main

    args = ["cache-features", "--config", "/dev/null", "--out", str(tmp_path / "c")]
    paths = [f"data.root={demo_root}", f"model.arch={tiny_model_dir}"]
    assert main([*args, *paths, "model.freeze_vision=false"]) == 2
    assert "error: a feature cache needs a frozen vision tower" in capsys.readouterr().err
    assert main([*args, "data.root=/nowhere", f"model.arch={tiny_model_dir}"]) == 2
    assert "error: missing inputs:\n  data.root=/nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("gpus, per_node", [(1, 1), (2, 2), (8, 8), (8, 4), (16, 2)])
def test_memory_table_equals_deepspeeds_estimators_when_everything_trains(gpus, per_node):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from dst_train.model.info import model_state_memory

    p, layer, nodes = 2_246_788_978, 100_925_440, gpus // per_node
    rows = model_state_memory(p, 0, gpus, "fp16", largest_layer=layer, gpus_per_node=per_node)
    rows = {r.strategy: r for r in rows}
    for offload, name in ((False, "zero2"), (True, "zero2+offload")):
        cpu, gpu = estimate_zero2_model_states_mem_needs(p, per_node, nodes, cpu_offload=offload)
        assert rows[name].gpu_gib == pytest.approx(gpu / GIB, rel=1e-6), name
        if offload:
            assert rows[name].cpu_gib == pytest.approx(cpu / GIB, rel=1e-6), name
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(p, layer, per_node, nodes, False)
    assert rows["zero3"].gpu_gib == pytest.approx(gpu / GIB, rel=1e-6)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(p, layer, per_node, nodes, True, True)
    assert rows["zero3+offload"].gpu_gib == pytest.approx(gpu / GIB, rel=1e-6)
    assert rows["zero3+offload"].cpu_gib == pytest.approx(cpu / GIB, rel=1e-6)
    # ZeRO-0 keeps everything on each GPU; ZeRO-1 partitions the fp32 gradient and Adam state
    assert rows["zero0"].gpu_gib == pytest.approx(20 * p / GIB)
    assert rows["zero1"].gpu_gib == pytest.approx((4 + 16 / gpus) * p / GIB)


def test_memory_table_partly_frozen_by_hand():
    from dst_train.model.info import model_state_memory

    t, f, n = GIB, 3 * GIB, 4  # 1 Gi trainable, 3 Gi frozen parameters, 4 GPUs
    rows = {r.strategy: r for r in model_state_memory(t, f, n, "fp16", largest_layer=GIB // 8)}
    # 16-bit weights of all 4 Gi params = 8 GiB; 18 B per trainable param = 18 GiB in all
    assert rows["zero0"].gpu_gib == pytest.approx(8 + 18)
    assert rows["zero1"].gpu_gib == pytest.approx(8 + 2 + 16 / 4)
    assert rows["zero2"].gpu_gib == pytest.approx(8 + 18 / 4)  # frozen weights stay whole
    assert rows["zero2+offload"].gpu_gib == pytest.approx(8)
    assert rows["zero2+offload"].cpu_gib == pytest.approx(1.5 * 16)
    # 4 B x the largest layer gathered + partitions of 2 B per frozen, 18 B per trainable
    assert rows["zero3"].gpu_gib == pytest.approx(0.5 + (6 + 18) / 4)
    assert rows["zero3+offload"].cpu_gib == pytest.approx(1.5 * 18 + 6)
    # without offload the model states are all on the GPUs
    assert [rows[s].cpu_gib for s in ("zero0", "zero1", "zero2", "zero3")] == [0, 0, 0, 0]
    fp32 = {r.strategy: r for r in model_state_memory(t, f, n, "fp32")}
    assert fp32["zero2"].gpu_gib == pytest.approx(16 + 12 / 4)  # 4 B weights, 4 + 8 per trainable


def test_memory_table_counts_qlora_weights_in_4_bits(tiny_family_dir):
    """QLoRA: the LM trunk's frozen linear weights at nf4 + block scales (0.516 B), everything
    else as before; LoRA's own (trainable) linear layers stay 16-bit; no ZeRO-3 rows."""

    lora = ModelConfig(arch=str(tiny_family_dir), lora=True, lora_r=4, pretrained=False)
    plain = model_info(lora)
    quant = model_info(ModelConfig(**{**lora.__dict__, "qlora": True}))
    # the tiny LM: 2 layers of q, o (64×64), k, v (64×32) and gate, up, down (64×128)
    q = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert quant["quantized_params"] == q and plain["quantized_params"] == 0
    saved = (2 - (0.5 + 1 / 64 + 4 / 16384)) * q / GIB  # bytes per weight: 2 → 0.516
    rows = {r["strategy"]: r["gpu_gib"] for r in quant["memory"]}
    assert set(rows) == {"zero0", "zero1", "zero2", "zero2+offload"}
    for r in plain["memory"]:
        if r["strategy"] in rows:
            assert rows[r["strategy"]] == pytest.approx(r["gpu_gib"] - saved, rel=1e-9)


def test_step_flops_count_each_weight_as_it_is_used(tiny_family_dir):
    """MFU's numerator: 6 FLOPs per trained weight per token, 4 per frozen LM weight (forward
    + input gradient), 2 per frozen tower weight per patch, none for embedding tables; ZeRO-3's
    empty local tensors count at full size."""
    from dst_train.model.info import step_flops

    def build(**kw):
        return build_model(ModelConfig(arch=str(tiny_family_dir), **kw), tiny_head(), FP32)

    model = build()  # vision frozen, the rest trains
    named = dict(model.named_parameters())
    embed = sum(p.numel() for n, p in named.items() if "embed_tokens" in n)
    c = parameter_counts(model)
    per_token = c["lm"]["total"] + c["lm_head"]["total"] + c["heads"]["total"] - embed
    assert step_flops(model, 10, 0, 1) == 6 * 10 * per_token  # text only: all trained
    patches = model.backbone.grid**2  # per frame: 4×4 (SmolVLM), 8×8 (Qwen)
    vision = c["vision"]["total"] - sum(
        p.numel() for n, p in named.items() if "position_embedding" in n
    )
    frames_only = step_flops(model, 0, 3, 1)
    assert frames_only == 2 * 3 * patches * vision + 6 * 3 * c["connector"]["total"]
    frozen = build(freeze_lm=True, freeze_connector=True)  # the LM now counts 4, not 6
    lm = c["lm"]["total"] + c["lm_head"]["total"] - embed
    assert step_flops(frozen, 10, 0, 1) == 10 * (4 * lm + 6 * c["heads"]["total"])
    for p in model.parameters():  # ZeRO-3: the local tensor is empty, ds_numel the full size
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert step_flops(model, 10, 0, 1) == 6 * 10 * per_token


def test_image_tokens_and_frame_embeddings_must_pair_up(tiny_family_dir):
    """Each image token takes the next frame embedding: a count that differs is an error, never
    a silent shift of every later frame; text without image tokens needs no frames."""
    model = build_model(ModelConfig(arch=str(tiny_family_dir)), tiny_head(), FP32)
    image, hidden = model.backbone.image_token_id, model.backbone.hidden_size
    ids = torch.tensor([[5, image, 6, image, 7]])
    frames = torch.arange(2 * hidden, dtype=torch.float32).view(2, 1, hidden)
    embeds = model.embed(ids, frames)
    assert torch.equal(embeds[0, [1, 3]], frames[:, 0])  # in order
    assert torch.equal(embeds[0, [0, 2, 4]], model.backbone.embed_tokens(ids)[0, [0, 2, 4]])
    with pytest.raises(ValueError, match="2 image tokens but 3 frame embeddings"):
        model.embed(ids, torch.zeros(3, 1, hidden))
    for none in (None, torch.zeros(0, 1, hidden)):
        with pytest.raises(ValueError, match="2 image tokens but no frames given"):
            model.embed(ids, none)
    text = torch.tensor([[5, 6, 7]])
    assert torch.equal(model.embed(text, None), model.backbone.embed_tokens(text))
