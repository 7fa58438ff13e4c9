import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dst_train.config import ConfigError, RunConfig, load_config
from dst_train.engine.ds_config import build_ds_config
from dst_train.engine.trainer import OverflowGuard, TrainingStopped, lr_schedule

REPO = Path(__file__).resolve().parents[2]
KW = dict(
    micro_batch=4,
    grad_accum=3,
    world_size=2,
    lr=1e-4,
    betas=(0.9, 0.95),
    weight_decay=0.01,
    grad_clip=1.0,
    hidden_size=2048,
)


@pytest.mark.parametrize("name", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_shipped_ds_configs_resolve(name):
    cfg = build_ds_config(f"ds_configs/{name}.json", dtype="fp16", on_gpu=True, **KW)
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    # torch's AdamW by default: DeepSpeed's FusedAdam compiles a CUDA op (needs nvcc) at first use
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    ops = build_ds_config(
        f"ds_configs/{name}.json", dtype="fp16", on_gpu=True, deepspeed_adam=True, **KW
    )
    assert ops["optimizer"]["params"]["torch_adam"] is False  # the opt-in
    assert ops["zero_force_ds_cpu_optimizer"] is True
    z = cfg["zero_optimization"]
    assert z["reduce_bucket_size"] == 2048 * 2048
    if "zero3" in name:
        assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
        assert z["stage3_param_persistence_threshold"] == 20480
        assert z["stage3_prefetch_bucket_size"] == int(0.9 * 2048 * 2048)
    else:
        assert z["allgather_bucket_size"] == 2048 * 2048
    if "offload" in name:
        assert z["offload_optimizer"]["device"] == "cpu"
    cpu = build_ds_config(f"ds_configs/{name}.json", dtype="bf16", on_gpu=False, **KW)
    assert cpu["bf16"]["enabled"] and cpu["optimizer"]["params"]["torch_adam"] is True


def test_a_templates_own_values_are_kept_and_a_batch_that_differs_is_an_error():
    template = {"gradient_clipping": 0.3, "optimizer": {"params": {"lr": 5e-5}}}
    cfg = build_ds_config(template, dtype="fp32", on_gpu=False, **KW)
    assert cfg["gradient_clipping"] == 0.3 and cfg["optimizer"]["params"]["lr"] == 5e-5
    same = build_ds_config({"train_batch_size": 24}, dtype="fp32", on_gpu=False, **KW)
    assert same["train_batch_size"] == 24
    with pytest.raises(ValueError, match=r"sets train_micro_batch_size_per_gpu = 8, but this run"):
        build_ds_config({"train_micro_batch_size_per_gpu": 8}, dtype="fp32", on_gpu=False, **KW)


def test_unresolved_auto_is_an_error():
    with pytest.raises(ValueError, match="unresolved 'auto'"):
        build_ds_config({"mystery": "auto"}, dtype="fp32", on_gpu=False, **KW)


def test_global_batch_is_kept_by_accumulation():
    cfg = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=4"])
    assert cfg.grad_accum(world_size=2) == 4
    assert cfg.grad_accum(world_size=8) == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.grad_accum(world_size=3)
    assert load_config(None, ["train.grad_accum=5"]).grad_accum(4) == 5


def test_lr_schedule_warmup_then_cosine():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, warmup=4, total=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def test_overflow_guard_stops_after_a_streak_only():
    guard = OverflowGuard(limit=3)
    for total in (1, 1, 2, 3):  # a skip, a good step, then two skips
        guard.update(total)
    with pytest.raises(TrainingStopped, match="3 optimizer steps in a row"):
        guard.update(4, scale=1.0)


def test_config_loading_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["train.max_steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="tokens_per_frame must be a perfect square"):
        load_config(None, ["model.tokens_per_frame=3"])
    cfg = load_config(None, ["train.betas=[0.8, 0.9]", "model.lora=true", "train.lr=1e-3"])
    assert cfg.train.betas == (0.8, 0.9) and cfg.model.lora is True and cfg.train.lr == 1e-3


def test_the_configuration_reference_is_the_config_module_and_lists_every_option():
    """docs/configuration.md is written from config.py (``make docs``): a changed default or
    comment that is not written into it fails here, so what users read is what runs."""
    import dataclasses

    from dst_train.config import SECTIONS, RunConfig, load_config, reference

    text = reference()
    assert (REPO / "docs" / "configuration.md").read_text(encoding="utf-8") == text, "make docs"
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    defaults, keys = RunConfig(), []
    for prefix, cls in SECTIONS:
        for f in dataclasses.fields(cls):
            if f.name in {p for p, _ in SECTIONS}:
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            section = getattr(defaults, prefix) if prefix else defaults
            cell = rows[key].split(" | ")[2].strip("`")  # the default, written as YAML reads it
            assert json.loads(cell) == json.loads(json.dumps(getattr(section, f.name))), key
            assert load_config(None, [f"{key}={cell}"]) == defaults, key
            assert rows[key].split(" | ")[3].strip(" |"), f"{key} has no meaning written"
            keys.append(key)
    assert sorted(rows) == sorted(keys) and len(keys) >= 60


@pytest.mark.parametrize(
    "path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_run_config_is_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    if not cfg.model.arch.startswith("runs/"):  # demo.yaml's model folder is made by make demo
        # a named architecture: nothing to find on disk (it launched nowhere before: "no model
        # folder there")
        assert [p for p in cfg.path_problems() if p.startswith("model.arch")] == []
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")  # each starts with a comment on how to launch it
    build_ds_config(cfg.train.ds_config, dtype="fp16", on_gpu=True, **KW)


def test_resolved_config_round_trips(tmp_path):
    from dst_train.config import save_config

    cfg = load_config(None, ["train.max_steps=7", "model.lora=true"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    json.dumps(cfg.train.__dict__)  # JSON-serialisable for logs


def test_missing_inputs_are_all_named_before_anything_is_built(
    demo_root, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from dst_train.cli import main

    good = [f"data.root={demo_root}", f"model.arch={tiny_model_dir}"]
    assert load_config(None, good).path_problems() == []
    assert load_config(None, ["data.root=x", "model.arch=org/some-hub-model"]).path_problems() == [
        "data.root=x: x: not a dataset root (no prepared/ folder)"  # a hub name is not checked
    ]
    for named in ("smolvlm2-2.2b", "qwen2.5-vl-7b", "tiny"):  # architectures dst-train ships
        assert load_config(None, [*good[:1], f"model.arch={named}"]).path_problems() == []
    local_parent = f"model.arch={tmp_path.name}/no-model"  # ./<tmp dir>/no-model, not a hub id
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(None, [*good[:1], local_parent]).path_problems() == [
        f"{local_parent}: no model folder there (no config.json)"
    ]
    bad = [
        f"data.root={demo_root}",
        "data.val_split=dev",
        f"model.arch={tmp_path}/no-model",
        "train.ds_config=ds_configs/zero9.json",
        f"data.feature_cache={tmp_path}/no-cache",
        f"train.resume={tmp_path}",  # a folder, but no COMPLETE in it
    ]
    problems = load_config(None, bad).path_problems()
    assert [p.split("=")[0].split(":")[0] for p in problems] == [
        "data.root",
        "model.arch",
        "train.ds_config",
        "data.feature_cache",
        "train.resume",
    ]
    assert "split 'dev'" in problems[0]
    demo_yaml = str(REPO / "launch/configs/demo.yaml")
    assert main(["train", "--config", demo_yaml, *bad, f"output_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: missing inputs:") and all(p in err for p in problems)
    assert not (tmp_path / "run").exists()


ZERO3_DECAY_SCRIPT = """
import json, sys
from dst_train.config import load_config
from dst_train.engine.trainer import param_groups, prepare
cfg = load_config(None, sys.argv[1:])
s = prepare(cfg)  # a world of one (gloo); ZeRO-3 builds the weights partitioned
model = s["model"]
# matrices are partitioned (an empty 1-D tensor with the true shape in ds_shape); small
# tensors under the persistence threshold stay whole
assert any(p.numel() == 0 and len(p.ds_shape) == 2 for p in model.parameters()), "not partitioned"
decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
print(json.dumps(sorted(n for n, p in model.named_parameters() if id(p) in decayed)))
"""


def test_zero3_decays_the_same_parameters_as_zero2(demo_root, tiny_model_dir, tmp_path):
    # under ZeRO-3 every parameter is a 1-D partition: choosing by p.ndim decayed none

    from dst_train.engine.trainer import param_groups
    from dst_train.model.build import Precision, build_model
    from tests.conftest import tiny_run_config
    from tests.engine.helpers import free_port

    args = [f"data.root={demo_root}", f"model.arch={tiny_model_dir}", f"output_dir={tmp_path}"]
    cfg = tiny_run_config(demo_root, tiny_model_dir)
    model = build_model(cfg.model, cfg.head_config(), Precision("fp32", "sdpa"))
    decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    zero2 = sorted(n for n, p in model.named_parameters() if id(p) in decayed)
    # matrices only: no bias, no norm weight (1-D) — and the model has both kinds trainable
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.dim() >= 2 and not n.endswith(".bias") for n, p in trainable if n in zero2)
    assert any(p.dim() == 1 and not n.endswith(".bias") for n, p in trainable)
    assert all(n in zero2 for n, p in trainable if p.dim() >= 2)
    env = {**os.environ, "MASTER_PORT": free_port()}
    proc = _python(ZERO3_DECAY_SCRIPT, env, *args, "train.ds_config=ds_configs/zero3.json")
    zero3 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(zero2) > 5 and zero3 == zero2


BAD_OVERRIDES = [
    ("model.dtype=fp8", "model.dtype must be auto|fp16|bf16|fp32, got 'fp8'"),
    ("model.cpu_dtype=fp16", "model.cpu_dtype must be fp32|bf16"),
    ("model.attention=flash", "model.attention must be auto|sdpa|eager|flash_attention_2"),
    ("train.betas=[0.9]", "train.betas: expected 2 values, got [0.9]"),
    ("train.betas=[0.9, 0.99, 0.9]", "train.betas: expected 2 values"),
    ("train.betas=[0.9, 1.5]", "train.betas must be two numbers in [0, 1)"),
    # 1 is the open end: a beta of 1 keeps its first running average for ever (Adam's bias
    # correction then divides by 0)
    ("train.betas=[1, 0.95]", "train.betas must be two numbers in [0, 1)"),
    ("train.lr=.nan", "train.lr: expected a finite number in [0, 2147483647], got nan"),
    ("train.lr=-1", "train.lr: expected a finite number in [0, 2147483647], got -1"),
    ("train.lr=0", "train.lr must be a positive number"),
    ("seed=1e400", "seed: expected int, got '1e400'"),
    ("model.lora_dropout=1.5", "model.lora_dropout must be in [0, 1], got 1.5"),
    ("train={1: 2}", "unknown key(s) ['1']"),
    ("data.span_policy=fix", "data.span_policy must be error|repair|clip, got 'fix'"),
    # (0, 1]: keeping no negative frame would train "speak" on positives alone
    ("data.negative_frame_keep=0", "data.negative_frame_keep must be in (0, 1]"),
    ("data.negative_frame_keep=1.5", "data.negative_frame_keep must be in (0, 1]"),
    ("loss.decision_loss=mse", "loss.decision_loss must be focal|bce"),
    ("loss.focal_alpha=1.5", "loss.focal_alpha must be in [0, 1], got 1.5"),
    ("train.min_lr_ratio=1.01", "train.min_lr_ratio must be in [0, 1], got 1.01"),
    ("model.qlora=true", "model.qlora needs model.lora=true"),
    ("train.resume=", "train.resume must be auto, never or a checkpoint folder"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_option_is_an_error_line_before_anything_starts(override, message, capsys):
    from dst_train.cli import main

    # data.root does not exist either: the config's own problems are reported first, and no
    # process group or model is made (main returns; nothing was initialised)
    assert main(["train", "--config", "/dev/null", "data.root=/nowhere", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_the_ends_of_the_unit_ranges_are_valid_options():
    from dst_train.config import load_config

    for end in (0, 1):  # [0, 1] is closed: a constant lr (ratio 1), no dropout, alpha 0 or 1
        keys = ("train.min_lr_ratio", "loss.focal_alpha", "model.lora_dropout")
        cfg = load_config(None, [f"{k}={end}" for k in keys])
        assert (cfg.train.min_lr_ratio, cfg.loss.focal_alpha, cfg.model.lora_dropout) == (end,) * 3
    # negative frames kept: (0, 1], all of them at 1
    assert load_config(None, ["data.negative_frame_keep=1"]).data.negative_frame_keep == 1
    assert load_config(None, ["data.negative_frame_keep=1e-6"]).data.negative_frame_keep == 1e-6
    # Adam's betas take [0, 1): 0 keeps no running average (a plain, RMSprop-like step)
    assert load_config(None, ["train.betas=[0, 0]"]).train.betas == (0, 0)


def test_an_optional_option_takes_null_or_a_value_of_its_type():
    """The loader's ``X | None`` fields (none in RunConfig today; a recipe's own config may
    have them): null is None, a value is coerced to X, anything else is named."""
    import dataclasses

    from dst_train.config import ConfigError, load_config

    @dataclasses.dataclass
    class Recipe:
        limit: int | None = 5

    assert load_config(None, ["limit=null"], cls=Recipe).limit is None
    assert load_config(None, ["limit=7"], cls=Recipe).limit == 7
    with pytest.raises(ConfigError, match=r"config\.limit: expected int, got 'many'"):
        load_config(None, ["limit=many"], cls=Recipe)


def test_the_lowest_value_of_each_count_option_is_valid_and_one_less_is_named():
    """0 is "all frames at once" for model.vision_chunk_frames; the sizes start at 1."""
    from dst_train.config import ConfigError, load_config

    lowest = {"model.vision_chunk_frames": 0, "model.tokens_per_frame": 1,
              "train.micro_batch_size": 1, "train.grad_accum": 1, "train.max_steps": 1}  # fmt: skip
    cfg = load_config(None, [f"{k}={v}" for k, v in lowest.items()])
    assert (cfg.model.vision_chunk_frames, cfg.train.micro_batch_size) == (0, 1)
    for key, value in lowest.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={value - 1}"])


def test_config_files_that_are_not_utf8_or_not_yaml_are_error_lines(tmp_path, capsys):
    from dst_train.cli import main

    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: [\n")
    for path, message in ((latin, "not UTF-8 (byte 15)"), (broken, "invalid YAML")):
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and message in err, err


def test_a_config_file_or_override_of_the_wrong_shape_is_named(tmp_path):
    """What YAML reads but a run config cannot be: each is a ConfigError naming the file (or the
    override) and the key, never a TypeError from the dataclasses."""
    from dst_train.config import ConfigError, load_config

    shapes = {
        "- lr: 1\n": "top level must be a mapping",
        "train: 5\n": ".train: expected a mapping for TrainConfig, got 5",
        "train: {betas: 0.9}\n": ".train.betas: expected a list, got 0.9",
    }
    for i, (text, message) in enumerate(shapes.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value).startswith(str(path)) and message in str(e.value), e.value
    for path, why in ((tmp_path / "absent.yaml", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(ConfigError, match=f"{path}: cannot read config: {why}"):
            load_config(path)
    with pytest.raises(ConfigError, match="override 'train.lr.x': 'lr' is not a section"):
        load_config(None, ["train.lr=0.1", "train.lr.x=1"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert load_config(empty) == load_config(None)  # an empty file is every default


def test_a_recipes_mapping_option_takes_a_mapping_and_its_any_option_anything():
    """The loader's ``dict`` and ``Any`` fields (none in RunConfig; a recipe's own config may
    have them)."""
    import dataclasses
    from typing import Any

    from dst_train.config import ConfigError, load_config

    @dataclasses.dataclass
    class Recipe:
        extra: dict = dataclasses.field(default_factory=dict)
        anything: Any = None

    got = load_config(None, ["extra={a: 1}", "anything=[1, x]"], cls=Recipe)
    assert got.extra == {"a": 1} and got.anything == [1, "x"]
    with pytest.raises(ConfigError, match=r"config\.extra: expected a mapping, got 3"):
        load_config(None, ["extra=3"], cls=Recipe)


def test_a_single_process_run_does_not_need_a_fixed_port(tmp_path):
    # two plain-python jobs on one machine (a tune beside a run, two test suites) used to
    # collide on one fixed port: hold the old port and start a world of one anyway
    import socket

    script = (
        "import importlib\n"
        "from dst_train.config import load_config\n"
        "from dst_train.engine.trainer import init_distributed\n"
        "print('RESULT', init_distributed(load_config(None, []))[:2])\n"
        "builder = importlib.import_module('deepspeed.comm.torch').build_shm_op\n"
        "print('SHM', builder.__module__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK")}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 29511))
        held.listen()
        proc = _python(script, env)
    assert "RESULT (0, 1)" in proc.stdout
    # on CPU without train.cpu_shm_comm DeepSpeed's shared-memory op (~45 s to compile) is
    # replaced by ours, which builds nothing
    assert "SHM dst_train.engine.trainer" in proc.stdout


PDEATHSIG = (
    "import ctypes, signal\n"
    "from dst_train.engine.trainer import die_with_launcher\n"
    "die_with_launcher()\n"
    "sig = ctypes.c_int(-1)\n"
    "ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG\n"
    "print('PDEATHSIG', sig.value, int(signal.SIGKILL))\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("launched", [True, False])
def test_only_a_launched_worker_dies_with_its_parent(launched):
    """A worker a launcher started (LOCAL_RANK set) is tied to it; a plain ``python`` run, whose
    parent is a shell that may exit (nohup), is not."""
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    if launched:
        env["LOCAL_RANK"] = "0"
    proc = _python(PDEATHSIG, env)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PDEATHSIG"))
    _, got, sigkill = line.split()
    assert int(got) == (int(sigkill) if launched else 0)


def test_peak_memory_is_in_gib_on_either_device(monkeypatch):
    from dst_train.engine.trainer import peak_memory_gib

    rss = peak_memory_gib(torch.device("cpu"))  # this process's peak resident set
    assert 0.05 < rss < 64
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    assert peak_memory_gib(torch.device("cuda", 0)) == 3.0


def _python(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -c script args`` in the repository; asserts it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_training_loop_stops_on_a_streak_of_overflowing_steps(
    demo_root, tiny_model_dir, tmp_path, monkeypatch, world_of_one
):
    """Every loss inf (what fp16 overflow gives DeepSpeed's check): DeepSpeed skips each step,
    and the loop's guard stops the run after ``max_skipped_in_a_row`` of them, saying why,
    without saving the untrained weights as a checkpoint."""
    from dst_train.engine.trainer import fit
    from dst_train.model.dst_model import DSTModel
    from tests.conftest import tiny_run_config

    real = DSTModel.forward

    def overflowing(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(DSTModel, "forward", overflowing)
    out = tmp_path / "run"
    cfg = tiny_run_config(
        demo_root, tiny_model_dir, f"output_dir={out}", "train.tensorboard=false",
        "train.max_steps=10", "train.max_skipped_in_a_row=3", "train.log_every=1",
    )  # fmt: skip
    with pytest.raises(TrainingStopped, match="3 optimizer steps in a row were skipped"):
        fit(cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if "skipped_steps" in r] == [1, 2]
    assert not list(out.glob("checkpoints/step_*"))


def test_a_run_evaluates_each_step_once_and_a_rerun_says_it_is_done(
    demo_root, tiny_model_dir, tmp_path, world_of_one, capsys
):
    """Val loss and save every step: the last step's val loss comes once, from the end of the
    run (not also from the periodic ones), and every step is saved. A single-process rerun of
    the finished run prints where it stands (rank 0's line) and trains, logs and saves
    nothing."""
    from dst_train.engine.trainer import fit
    from tests.conftest import tiny_run_config

    out = tmp_path / "run"
    cfg = tiny_run_config(
        demo_root, tiny_model_dir, f"output_dir={out}", "train.tensorboard=false",
        "train.max_steps=2", "train.eval_batches=1", "train.eval_every=1", "train.save_every=1",
    )  # fmt: skip
    assert fit(cfg)["step"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [1, 2]
    capsys.readouterr()  # the first run's lines
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002"]
    before = {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")}
    log = (out / "metrics.jsonl").read_text()
    assert fit(cfg) == {"step": 2}
    said = capsys.readouterr().out
    assert said == f"{ckpts / 'step_00000002'}: already at step 2; nothing to do\n"
    assert (out / "metrics.jsonl").read_text() == log
    assert {p: p.stat().st_mtime_ns for p in ckpts.rglob("*")} == before


def test_train_resume_auto_never_or_a_folder(tmp_path):
    from dst_train.engine.checkpoint import COMPLETE, LATEST
    from dst_train.engine.trainer import resume_tag

    ckpt = tmp_path / "checkpoints"
    for tag in ("step_2", "step_4", "step_6"):
        (ckpt / tag).mkdir(parents=True)
    for tag in ("step_2", "step_4"):  # step_6: a save a crash cut short
        (ckpt / tag / COMPLETE).write_text("")
    (ckpt / LATEST).write_text("step_6")
    cfg = RunConfig()
    assert cfg.train.resume == "auto" and resume_tag(cfg, ckpt) == (ckpt, "step_4")
    cfg.train.resume = "never"
    assert resume_tag(cfg, ckpt) is None
    cfg.train.resume = str(ckpt / "step_2")
    assert resume_tag(cfg, tmp_path / "elsewhere") == (ckpt, "step_2")
    cfg.train.resume = str(ckpt / "step_6")
    with pytest.raises(FileNotFoundError, match="step_6: not a complete dst-train checkpoint"):
        resume_tag(cfg, ckpt)
    cfg.train.resume = "auto"
    assert resume_tag(cfg, tmp_path / "empty") is None


def _take(stream, n):
    out = []
    for _ in range(n):
        epoch, index, items = next(stream)
        out.append(
            (
                epoch,
                index,
                [(it["sample"].source, it["speak_weight"], it["frames"]) for it in items],
            )
        )
    return out


def test_loader_workers_give_the_same_batches_across_epochs_and_resumes(
    demo_root, tiny_model_dir, tmp_path, world_of_one
):
    """data.num_workers=2 reaches the train loader, and its batches — samples, the negative-frame
    subsampling's weights, decoded frames — equal the main process's, in every epoch and after
    a resume mid-epoch."""
    from dst_train.engine.trainer import batches_forever, prepare, sample_loader
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(
        demo_root, tiny_model_dir, f"output_dir={tmp_path}", "data.num_workers=2",
        "data.negative_frame_keep=0.5", "train.micro_batch_size=2",
    )  # fmt: skip
    s = prepare(cfg)
    assert s["loader"].num_workers == s["val_loader"].num_workers == 2
    per_epoch = len(s["sampler"])
    assert per_epoch >= 2
    workers = _take(batches_forever(s["loader"], s["sampler"], 0, 0), 2 * per_epoch)
    main_process = sample_loader(s["train_ds"], s["sampler"], num_workers=0)
    alone = _take(batches_forever(main_process, s["sampler"], 0, 0), 2 * per_epoch)
    resumed = _take(batches_forever(s["loader"], s["sampler"], 1, 1), per_epoch - 1)
    for got, want in ((workers, alone), (resumed, alone[per_epoch + 1 :])):
        assert [(e, i) for e, i, _ in got] == [(e, i) for e, i, _ in want]
        for (_, _, a), (_, _, b) in zip(got, want, strict=True):
            assert [(src, w) for src, w, _ in a] == [(src, w) for src, w, _ in b]
            assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b, strict=True))
    weights = [w for _, _, items in alone for _, ws, _ in items for w in ws]
    assert 0.0 in weights and 1.0 in weights  # the subsampling ran
    drawn = [{src: w for _, _, items in alone[e * per_epoch : (e + 1) * per_epoch]
              for src, w, _ in items} for e in (0, 1)]  # fmt: skip
    assert drawn[0].keys() == drawn[1].keys() and drawn[0] != drawn[1]  # redrawn each epoch


class _WorkerTagged(torch.utils.data.Dataset):
    """A dataset whose items say which loader worker read them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        time.sleep(0.05)  # a frame decode's worth: every worker gets work before any runs dry
        return i, info.id if info else -1


def test_a_micro_batch_is_read_by_several_workers():
    """With the batch sampler handed to the DataLoader, one worker read a whole micro-batch
    (14 samples × ~70 frames, one core, ~25 s on the gpu-bench data): the train loader hands
    out single samples, and batches_forever regroups them into the sampler's batches."""
    from dst_train.data.collate import LengthGroupedSampler
    from dst_train.engine.trainer import batches_forever, sample_loader

    sampler = LengthGroupedSampler([5] * 12, batch_size=4, seed=3)
    loader = sample_loader(_WorkerTagged(12), sampler, num_workers=2)
    got = list(itertools.islice(batches_forever(loader, sampler, 0, 0), 3))
    assert [[i for i, _ in items] for _, _, items in got] == sampler.batches()
    assert [(e, i) for e, i, _ in got] == [(0, 0), (0, 1), (0, 2)]
    assert all(len({w for _, w in items}) == 2 for _, _, items in got)


class _ProcessTagged(torch.utils.data.Dataset):
    """A dataset whose items say which process read them."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[int, int]:
        import os

        return i, os.getpid()


def test_the_train_loaders_workers_live_across_epochs():
    """One loader iterator for the whole run: its workers read on across the epoch boundary
    (they restarted every epoch, and each epoch's first batch then waited for a cold pipeline:
    21 % of the GPU bench's time at 2 batches an epoch), and each epoch's batches are still the
    sampler's batches of that epoch."""
    from dst_train.data.collate import LengthGroupedSampler
    from dst_train.engine.trainer import batches_forever, sample_loader

    sampler = LengthGroupedSampler([5] * 12, batch_size=4, seed=3)
    loader = sample_loader(_ProcessTagged(), sampler, num_workers=2)
    got = list(itertools.islice(batches_forever(loader, sampler, 1, 2), 7))
    assert [(e, i) for e, i, _ in got] == [(1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    want = []
    for epoch, skip in ((1, 2), (2, 0), (3, 0)):
        sampler.set_epoch(epoch, skip)
        want += list(sampler)
    assert [[i for i, _ in items] for _, _, items in got] == want
    assert len({pid for _, _, items in got for _, pid in items}) == 2


class _SignalsSeen(torch.utils.data.Dataset):
    """Items say which loader worker read them and whether it had the stop signals blocked."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        import signal

        info = torch.utils.data.get_worker_info()
        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        time.sleep(0.05)  # a frame decode's worth: every worker gets work before any runs dry
        return torch.tensor([i, info.id if info else -1, int(blocked)])


def test_the_val_loader_reads_in_the_workers_and_they_leave_the_stop_signals_to_their_rank():
    """data.num_workers serves the val pass too (it read every frame in the training process),
    and its workers, like the train loader's, leave SIGTERM/SIGUSR1 to their rank: one killed by
    a scheduler's signal during a val pass made the rank fail before it could save."""
    from dst_train.data.collate import LengthGroupedSampler
    from dst_train.engine.trainer import val_loader

    sampler = LengthGroupedSampler([5] * 8, batch_size=2, seed=3)
    loader = val_loader(_SignalsSeen(), sampler, torch.stack, num_workers=2)
    loader.batch_sampler.set_epoch(0)
    got = [batch.tolist() for batch in loader]
    assert [[i for i, _, _ in b] for b in got] == sampler.batches()  # in the sampler's order
    assert {w for b in got for _, w, _ in b} == {0, 1}  # read by both workers
    assert all(blocked for b in got for _, _, blocked in b)


def test_a_cpu_run_takes_torchs_adamw_even_when_deepspeeds_is_asked_for(
    demo_root, tiny_model_dir, tmp_path, world_of_one
):
    """train.deepspeed_adam=true picks DeepSpeed's FusedAdam on a GPU; it is a CUDA kernel, so a
    CPU run (the tests, the demo) resolves its DeepSpeed config for the CPU: torch's AdamW."""
    from dst_train.engine.trainer import prepare
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(
        demo_root, tiny_model_dir, f"output_dir={tmp_path}", "train.deepspeed_adam=true"
    )
    ds_config = prepare(cfg)["ds_config"]
    assert ds_config["optimizer"]["params"]["torch_adam"] is True
    assert ds_config["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("micro, workers", [(1, 3), (2, 2), (3, 2), (8, 2), (8, 3), (16, 4)])
def test_the_train_loaders_workers_keep_two_micro_batches_in_flight(micro, workers):
    """Each worker prefetches enough samples that together they hold two micro-batches, and not
    a round more (every sample in flight holds its decoded frames in RAM); torch's default of 2
    per worker is the floor."""
    from dst_train.engine.trainer import sample_loader

    loader = sample_loader([0] * 64, SimpleNamespace(batch_size=micro), workers)
    ahead = loader.prefetch_factor
    assert isinstance(ahead, int) and ahead >= 2 and ahead * workers >= 2 * micro
    assert ahead == 2 or (ahead - 1) * workers < 2 * micro
    assert sample_loader([0], SimpleNamespace(batch_size=micro), 0).prefetch_factor is None


def test_a_stopped_run_says_what_it_saved_in_how_long_and_how_to_resume(capsys):
    """The last line of a run a signal stopped (rank 0 only): the checkpoint and the seconds the
    save took, or that no step had run (nothing is saved then); the metrics are closed."""
    import re

    from dst_train.engine.trainer import stop_here

    saved, closed = [], []
    log = SimpleNamespace(close=lambda: closed.append(True))

    def save(engine, state):
        saved.append(state["step"])
        return Path("ckpt/step_00000003")

    got = stop_here(save, None, {"step": 3}, "SIGTERM", "step 4", log, 0)
    assert got == {"step": 3, "stopped": "SIGTERM"} and saved == [3] and closed == [True]
    line = capsys.readouterr().out
    said = re.fullmatch(
        r"stopped by SIGTERM during step 4: saved ckpt/step_00000003 in (\d+\.\d) s; "
        r"run the same command to resume from there\n",
        line,
    )
    assert said and float(said[1]) < 60, line  # seconds since the save began
    assert stop_here(save, None, {"step": 0}, "SIGINT", "step 1", log, 0)["step"] == 0
    assert saved == [3] and capsys.readouterr().out == (
        "stopped by SIGINT during step 1: nothing to save; run the same command to resume "
        "from there\n"
    )
    stop_here(save, None, {"step": 3}, "SIGTERM", "step 4", log, 1)  # the other ranks: silent
    assert saved == [3, 3] and capsys.readouterr().out == "" and len(closed) == 3


def test_val_loss_is_the_mean_over_the_batches_evaluated(
    demo_root, tiny_model_dir, tmp_path, world_of_one
):
    from dst_train.engine.trainer import LOSSES, evaluate, prepare, to_device
    from tests.conftest import tiny_run_config

    # the train split as "val": several batches of one sample
    cfg = tiny_run_config(
        demo_root, tiny_model_dir, f"output_dir={tmp_path}", "data.val_split=train"
    )
    s = prepare(cfg)
    model, loader = s["model"], s["val_loader"]
    model.eval()
    loader.batch_sampler.set_epoch(0)
    with torch.no_grad():
        per_batch = [model(**to_device(b, s["device"])) for b in loader]
    assert len(per_batch) >= 2
    for n in (1, 2, 0):  # the first batch, the first 2; 0 = all of them
        got = evaluate(model, loader, s["device"], max_batches=n)
        rows = per_batch[:n] if n else per_batch
        for k in LOSSES:
            want = sum(o[k].item() for o in rows) / len(rows)
            assert got[f"val_{k}"] == pytest.approx(want, rel=1e-6), (n, k)


def test_a_max_seq_len_below_the_system_prompt_is_an_error_line(
    demo_root, tiny_model_dir, tmp_path
):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "WORLD_SIZE", "RANK")}
    cmd = [sys.executable, "-m", "dst_train.cli", "train", "--config", "launch/configs/demo.yaml"]
    cmd += [f"data.root={demo_root}"]
    cmd += [f"model.arch={tiny_model_dir}", f"output_dir={tmp_path}", "data.max_seq_len=50"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/prepared/train.jsonl:" in last
    assert "the system prompt alone is" in last and "raise data.max_seq_len" in last


def test_random_weights_are_drawn_on_the_gpu_unless_loaded_or_partitioned():
    import contextlib

    from dst_train.engine.trainer import init_device

    gpu = torch.device("cuda", 1)  # a device object: no GPU needed to build one
    assert init_device(gpu, pretrained=False, zero3=False) == gpu
    for ctx in (
        init_device(gpu, pretrained=True, zero3=False),  # read from disk on the CPU
        init_device(gpu, pretrained=False, zero3=True),  # ZeRO-3 places the shards itself
        init_device(torch.device("cpu"), pretrained=False, zero3=False),
    ):
        assert isinstance(ctx, contextlib.nullcontext)


@pytest.mark.parametrize(
    "parents, exits",
    [
        ((1234, 1234), False),  # the launcher is alive after the prctl call
        ((1234, 1), True),  # it died between reading the parent and the call: reparented
        ((1, 1), True),  # it had died before: this process already belongs to init
    ],
)
def test_a_worker_whose_launcher_died_before_the_prctl_call_exits(monkeypatch, parents, exits):
    # PR_SET_PDEATHSIG only fires for a parent that dies after the call; the race before it is
    # closed by comparing the parent before and after
    import ctypes

    from dst_train.engine import trainer

    monkeypatch.setenv("LOCAL_RANK", "0")
    calls = iter(parents)
    monkeypatch.setattr(trainer.os, "getppid", lambda: next(calls))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **kw: SimpleNamespace(prctl=lambda *a: 0))

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(trainer.os, "_exit", exit_)
    if exits:
        with pytest.raises(SystemExit):
            trainer.die_with_launcher()
    else:
        trainer.die_with_launcher()


def test_a_rank_that_does_not_log_writes_nothing_and_closes_quietly(tmp_path):
    from dst_train.engine.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, False, True, start_step=0, total=10, resumed=False)
    log.train(1, {"loss": 1.0, "lr": 1e-3})
    log.eval(1, {"val_loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "world, zero, phase, replayed",
    [
        (1, 2, "forward", True),
        (1, 3, "backward", True),  # one rank: nothing else is inside a collective
        (2, 2, "forward", True),  # no collectives in forward under ZeRO-0/1/2
        (2, 2, "backward", False),  # the others may be inside a gradient all-reduce
        (2, 3, "forward", False),  # ZeRO-3 all-gathers parameters in forward
        (1, 2, "step", False),  # parameters half updated
    ],
)
def test_which_out_of_memory_errors_the_safety_net_replays(world, zero, phase, replayed):
    from dst_train.engine.trainer import MicroBatchRunner

    class Stopped(Exception):
        pass

    def stop(where):
        raise Stopped(where)

    rebuilt = []
    runner = MicroBatchRunner(None, None, None, True, 4, 1, 0, world, rebuild=1, zero_stage=zero)
    runner._rebuild_engine = lambda micro, accum: rebuilt.append((micro, accum))
    runner._stop, runner.phase = stop, phase
    if replayed:
        runner._recover("CUDA out of memory", step=7)
        assert rebuilt == [(2, 2)]  # half the micro-batch, twice the accumulation
    else:
        with pytest.raises(Stopped, match=f"in the {phase} of step 7"):
            runner._recover("CUDA out of memory", step=7)
        assert rebuilt == []


@pytest.mark.parametrize("keep", [1, 2, 0])
def test_keep_last_leaves_the_newest_complete_checkpoints(tmp_path, keep):
    from dst_train.engine import checkpoint
    from tests.engine.helpers import FolderEngine

    ckpt = tmp_path / "checkpoints"
    for step in range(1, 6):
        checkpoint.save(FolderEngine(), ckpt, step, {"step": step}, "", keep, 0, lambda: None)
        assert checkpoint.latest_tag(ckpt) == checkpoint.tag_of(step)
    want = [checkpoint.tag_of(s) for s in range(1, 6)][-keep if keep else 0 :]
    assert checkpoint.complete_tags(ckpt) == want  # 0 keeps every one


@pytest.mark.parametrize("stuck", ["a shard", "every file", "the marker"])
def test_an_old_checkpoint_that_cannot_be_removed_is_named_and_never_half_counted(
    tmp_path, monkeypatch, capsys, stuck
):
    """Pruning is housekeeping after the new checkpoint is saved: a file it cannot remove (an
    NFS handle another process holds, a permission) must not end the run, and what is left of
    the folder must not count as a checkpoint unless it is whole, whichever files stayed; the
    next save tries again."""
    import os
    import shutil

    from dst_train.engine import checkpoint
    from tests.engine.helpers import FolderEngine

    ckpt, unlink, rmtree = tmp_path / "checkpoints", os.unlink, shutil.rmtree
    held = {"on": True}
    name = {"a shard": "model_states.pt", "the marker": checkpoint.COMPLETE}.get(stuck)

    def unlink_but(path, *args, **kwargs):
        if held["on"] and str(path).endswith(name):
            raise PermissionError(13, "held open", str(path))
        return unlink(path, *args, **kwargs)

    def rmtree_nothing(path, *args, **kwargs):  # ignore_errors: no file went, no error raised
        return None if held["on"] else rmtree(path, *args, **kwargs)

    def save(step):
        checkpoint.save(FolderEngine(), ckpt, step, {"step": step}, "", 1, 0, lambda: None)

    save(1)
    if name:
        monkeypatch.setattr(os, "unlink", unlink_but)
    else:
        monkeypatch.setattr(shutil, "rmtree", rmtree_nothing)
    save(2)  # saved; step 1 left in part, or whole when its marker stayed
    assert checkpoint.latest_tag(ckpt) == checkpoint.tag_of(2)
    whole = [1, 2] if stuck == "the marker" else [2]
    assert checkpoint.complete_tags(ckpt) == [checkpoint.tag_of(s) for s in whole]
    assert f"{ckpt / checkpoint.tag_of(1)}: not removed" in capsys.readouterr().err
    held["on"] = False
    save(3)
    assert sorted(p.name for p in ckpt.glob("step_*")) == [checkpoint.tag_of(3)]


class _CountsReads(torch.Tensor):
    """Stands in for a tensor on the GPU: counts every read back to the host. Each read makes
    the host wait for every kernel queued before it, and the GPU then idles while the host
    prepares the next batch."""

    reads = 0
    READS = frozenset(
        (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
         torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__)
    )  # fmt: skip

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.READS:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs)


class _LossEngine:
    """Stands in for the DeepSpeed engine: loss k of every micro-batch is k + 1, on the
    "device" (tensors that count their reads)."""

    def __init__(self):
        self.steps = 0

    def __call__(self, **batch):
        from dst_train.engine.trainer import LOSSES

        return {k: torch.tensor(i + 1.0).as_subclass(_CountsReads) for i, k in enumerate(LOSSES)}

    def backward(self, loss):
        pass

    def step(self):
        self.steps += 1

    def eval(self):
        pass

    def train(self):
        pass


def _two_samples(items: list) -> dict:
    return {
        "input_ids": torch.zeros(len(items), 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 0]] * len(items)),
    }


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_a_training_step_reads_nothing_back_from_the_device(micro_batches):
    from dst_train.engine.trainer import LOSSES, MicroBatchRunner

    engine = _LossEngine()
    runner = MicroBatchRunner(engine, _two_samples, torch.device("cpu"), False, 2, 1, 0)
    _CountsReads.reads = 0
    sums = runner.run_window([[0, 1]] * micro_batches)
    assert _CountsReads.reads == 0  # the caller reads the sums once, to log them
    assert engine.steps == micro_batches
    losses = [micro_batches * (i + 1.0) for i in range(len(LOSSES))]
    tokens, samples = 4 * micro_batches, 2 * micro_batches
    assert sums.as_subclass(torch.Tensor).tolist() == [*losses, tokens, samples]


class _Batches(list):
    """A val loader of ``n`` batches (what ``evaluate`` needs of one)."""

    @property
    def batch_sampler(self):
        return SimpleNamespace(set_epoch=lambda epoch: None, first_visits=lambda: len(self))


def _val_reads(rank: int, port: int, root: str) -> None:
    from dst_train.engine.trainer import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=1)
    got = {}
    for n in (1, 5):
        _CountsReads.reads = 0
        val = evaluate(_LossEngine(), _Batches([_two_samples([0])] * n), torch.device("cpu"), 0)
        got[n] = (_CountsReads.reads, val)
    Path(root, "reads.json").write_text(json.dumps(got))
    torch.distributed.destroy_process_group()


def test_the_val_loss_reads_back_from_the_device_once_however_many_batches(tmp_path):
    from dst_train.engine.trainer import LOSSES, free_port

    torch.multiprocessing.spawn(_val_reads, args=(int(free_port()), str(tmp_path)), nprocs=1)
    got = json.loads((tmp_path / "reads.json").read_text())
    assert got["1"][0] == got["5"][0]  # at the end of the pass, not per batch
    for n in ("1", "5"):
        assert got[n][1] == {f"val_{k}": i + 1.0 for i, k in enumerate(LOSSES)}


class _OomOnceEngine(_LossEngine):
    """A stand-in engine on the "meta" device (the GPU's stand-in: nothing on it can be read or
    sent over gloo) whose first forward runs out of memory when ``oom``; it can be rebuilt the
    way the safety net rebuilds DeepSpeed's."""

    def __init__(self, oom: bool):
        super().__init__()
        self.oom, self.module = oom, torch.nn.Linear(1, 1)

    def __call__(self, **batch):
        from dst_train.engine.trainer import LOSSES

        if self.oom:
            self.oom = False
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {k: torch.tensor(i + 1.0, device="meta") for i, k in enumerate(LOSSES)}

    def save_checkpoint(self, *args, **kwargs):
        pass

    def load_checkpoint(self, *args, **kwargs):
        pass

    def destroy(self):
        pass


def _agree_on_an_oom(rank: int, port: int, root: str) -> None:
    from dst_train.engine.stop_request import host_group
    from dst_train.engine.trainer import MicroBatchRunner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    built = []

    def rebuild(micro, accum):
        built.append((micro, accum))
        return _OomOnceEngine(oom=False)

    meta = torch.device("meta")
    engine = _OomOnceEngine(oom=rank == 1)
    scratch = Path(root, "scratch")
    runner = MicroBatchRunner(engine, _two_samples, meta, True, 2, 1, rank, 2, rebuild, scratch)
    runner.flags = host_group(meta, 2)  # as fit() hands it over: a gloo group of its own
    assert runner.flags is not None and torch.distributed.get_backend(runner.flags) == "gloo"
    assert host_group(torch.device("cpu"), 2) is None  # a CPU run's default group is gloo
    sums = runner.run_window([[0, 1]])  # rank 1 runs out in the forward; rank 0 does not
    said = {"built": built, "micro": runner.current_micro, "steps": runner.engine.steps}
    said["sums_on"] = str(sums.device)
    Path(root, f"rank{rank}.json").write_text(json.dumps(said))
    torch.distributed.destroy_process_group()


def test_without_oom_retry_or_below_two_samples_an_oom_is_not_replayed():
    """train.oom_retry=false: the CUDA OOM itself reaches the caller, nothing rebuilt. At one
    sample per micro-batch there is nothing to halve: the run stops, naming the step."""
    from dst_train.engine.trainer import MicroBatchRunner, TrainingStopped

    def rebuild(micro, accum):
        raise AssertionError("rebuilt")

    meta = torch.device("meta")
    runner = MicroBatchRunner(_OomOnceEngine(oom=True), _two_samples, meta, False, 2, 1, 0)
    runner.rebuild = rebuild
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        runner.run_window([[0, 1]])
    runner = MicroBatchRunner(_OomOnceEngine(oom=True), _two_samples, meta, True, 1, 1, 0)
    runner.rebuild = rebuild
    with pytest.raises(TrainingStopped, match="in the forward of step 3, rank 0.* one sample per"):
        runner.run_window([[0]], step=3)


@pytest.mark.parametrize("oom_retry, world, zero", [(False, 2, 2), (True, 2, 3), (True, 1, 2)])
def test_the_ranks_agree_on_nothing_after_a_forward_they_could_not_replay(
    oom_retry, world, zero, monkeypatch
):
    """The OOM flag's all-reduce after every forward is for a replay on several ranks: without
    train.oom_retry, on one rank, or under ZeRO-3 (never replayed) there is none."""
    from dst_train.engine.trainer import MicroBatchRunner

    reduced = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **kw: reduced.append(a))
    runner = MicroBatchRunner(
        _LossEngine(), _two_samples, torch.device("cpu"), oom_retry, 2, 1, 0, world,
        rebuild=lambda micro, accum: None, zero_stage=zero,
    )  # fmt: skip
    assert runner.run_window([[0, 1]])[-1].item() == 2 and reduced == []  # the two samples


def test_the_ranks_of_a_gpu_run_agree_on_an_oom_over_the_cpu(tmp_path):
    # The flag the ranks all-reduce after each forward (train.oom_retry) is a CPU tensor, sent
    # over gloo: one on the GPU would be read after every kernel queued before it, so the host
    # would wait for every forward. "meta" stands in for the GPU, as in test_stop_signal.py.
    from dst_train.engine.trainer import free_port

    args = (int(free_port()), str(tmp_path))
    torch.multiprocessing.spawn(_agree_on_an_oom, args=args, nprocs=2)
    for r in (0, 1):  # both halved the micro-batch and replayed the step in 2 micro-steps
        said = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert said == {"built": [[1, 2]], "micro": 1, "steps": 2, "sums_on": "meta"}


def test_a_metrics_lines_rates_cover_every_step_since_the_previous_line():
    """With train.log_every > 1 the host no longer waits for the GPU at the steps between two
    lines, so one step's own time says little (its kernels may still be queued, or it may pay
    for earlier steps'): the rates are the window's tokens over the window's time, val passes
    and saves left out; the losses are the logged step's."""
    from dst_train.engine.metrics import LogWindow
    from dst_train.engine.trainer import LOSSES

    now = [100.0]
    window = LogWindow(clock=lambda: now[0])
    for step, tokens in enumerate((10, 20, 30), start=1):
        now[0] += 1.0 if step < 3 else 4.0  # step 3 waited for the queued work of 1 and 2
        window.add(torch.tensor([float(step)] * len(LOSSES) + [tokens, 2.0], dtype=torch.float64))
        if step == 1:
            with window.paused():  # a val pass and a save after step 1
                now[0] += 50.0
    row = window.line(lambda x: x, micro_steps=1)  # the all-reduce of a run of one rank
    assert row == {
        **{k: 3.0 for k in LOSSES},  # step 3's
        "tokens_per_s": 60 / 6.0,
        "samples_per_s": 6 / 6.0,
        "step_time_s": 6.0 / 3,
    }
    now[0] += 2.0  # the next line's window starts empty, at the previous line
    window.add(torch.tensor([1.0] * len(LOSSES) + [8.0, 2.0], dtype=torch.float64))
    second = window.line(lambda x: x, micro_steps=1)
    assert (second["tokens_per_s"], second["step_time_s"]) == (4.0, 2.0)  # 1 step in 2 s


def test_the_progress_bar_and_the_log_follow_the_steps_from_a_resumed_start(tmp_path):
    from dst_train.engine.metrics import LOSSES, MetricsLogger

    log = MetricsLogger(tmp_path, True, False, start_step=3, total=10, resumed=False)
    for step in (5, 7):  # log_every 2 from step 3
        log.train(step, {**dict.fromkeys(LOSSES, 1.0), "lr": 1e-3})
        assert log.bar.n == step
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 5), ("train", 7)]


class _MeanEngine(_LossEngine):
    """Every loss of a batch is the mean of its input ids (so batches differ)."""

    def __call__(self, **batch):
        from dst_train.engine.trainer import LOSSES

        return {k: batch["input_ids"].double().mean() for k in LOSSES}


def _val_loss_of_ranks(rank: int, world: int, port: int, root: str) -> None:
    from dst_train.data.collate import LengthGroupedSampler
    from dst_train.engine.trainer import evaluate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    items = [torch.tensor([i]) for i in range(7)]  # 7 batches of one: rank 1 of 2 wraps one
    sampler = LengthGroupedSampler([1] * len(items), 1, world, rank, seed=5)
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=sampler, collate_fn=lambda b: {"input_ids": torch.stack(b)}
    )
    val = evaluate(_MeanEngine(), loader, torch.device("cpu"), max_batches=0)
    Path(root, f"world{world}_rank{rank}.json").write_text(json.dumps(val))
    torch.distributed.destroy_process_group()


def test_the_val_loss_on_two_ranks_is_the_val_loss_on_one():
    """Each rank must step through as many val batches as the others, so the sampler repeats
    batches from the start to even the ranks out; those repeats take no part in the mean."""
    import tempfile

    from dst_train.engine.trainer import free_port

    with tempfile.TemporaryDirectory() as root:
        for world in (1, 2):
            args = (world, int(free_port()), root)
            torch.multiprocessing.spawn(_val_loss_of_ranks, args=args, nprocs=world)
        got = {p.stem: json.loads(p.read_text()) for p in Path(root).glob("*.json")}
    assert got["world1_rank0"]["val_loss"] == pytest.approx(3.0)  # the mean of 0..6
    assert got["world2_rank0"] == got["world2_rank1"] == got["world1_rank0"]


def test_a_resume_on_a_gpu_restores_the_cuda_generators_and_a_cpu_checkpoint_leaves_them(
    monkeypatch,
):
    # dropout on a GPU draws from the CUDA generators: a resume that left them at their seed would
    # draw other masks than the uninterrupted run. torch.cuda's generator calls are stood in for.
    from dst_train.engine import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0-state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = checkpoint.rng_state()
    assert state["cuda"] == ["gpu0-state"]
    checkpoint.set_rng_state(state)
    assert restored == [["gpu0-state"]]
    checkpoint.set_rng_state(state | {"cuda": None})  # a CPU run's checkpoint resumed on a GPU
    assert restored == [["gpu0-state"]]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checkpoint.set_rng_state(state)  # a GPU run's checkpoint resumed on CPU
    assert restored == [["gpu0-state"]] and checkpoint.rng_state()["cuda"] is None
