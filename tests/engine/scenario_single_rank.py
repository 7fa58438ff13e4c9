"""Run inside one plain `python` process (a world of one): checkpoint crash-safety, conversion
round trip, and ZeRO-3 partitioned construction. Prints one JSON object of findings."""

import json
import sys
from pathlib import Path

import torch

from dst_train.config import load_config
from dst_train.engine import checkpoint
from dst_train.engine.trainer import batches_forever, setup, to_device

demo_root, tiny, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = load_config(
    None,
    [
        f"data.root={demo_root}",
        f"model.arch={tiny}",
        f"output_dir={out}",
        "train.micro_batch_size=1",
        "train.lr=0.003",
        "train.warmup_steps=1",
        "data.max_seq_len=2048",
    ],
)
found = {}
s = setup(cfg)
engine, device = s["engine"], s["device"]
batch = to_device(s["collate"](next(batches_forever(s["loader"], s["sampler"], 0, 0))[2]), device)
for _ in range(2):
    engine.backward(engine(**batch)["loss"])
    engine.step()
ckpt = out / "checkpoints"
barrier = torch.distributed.barrier
checkpoint.save(
    engine, ckpt, 2, {"step": 2, "epoch": 0, "batch_in_epoch": 2}, "x: 1\n", 2, 0, barrier
)

real_save = engine.save_checkpoint


def crashing_save(save_dir, tag, **kw):
    (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
    (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    raise RuntimeError("disk full (simulated)")


engine.save_checkpoint = crashing_save
try:
    checkpoint.save(engine, ckpt, 4, {"step": 4}, "x: 1\n", 2, 0, barrier)
except RuntimeError as e:
    found["crash"] = str(e)
engine.save_checkpoint = real_save
found["latest_after_crash"] = checkpoint.latest_tag(ckpt)
found["partial_left"] = (ckpt / "step_00000004").is_dir()
found["resumed_state"] = checkpoint.load(engine, ckpt, checkpoint.latest_tag(ckpt), 0)
# a crash after DeepSpeed wrote the shards (here: at the RNG file) leaves the pointer file itself
# on the previous checkpoint: DeepSpeed must not write its own "latest" (tools read it as it is)
real_rng_state = checkpoint.rng_state


def failing_rng_state():
    raise RuntimeError("disk full (simulated)")


checkpoint.rng_state = failing_rng_state
try:
    checkpoint.save(engine, ckpt, 3, {"step": 3}, "x: 1\n", 2, 0, barrier)
except RuntimeError:
    found["late_partial_left"] = (ckpt / "step_00000003" / "mp_rank_00_model_states.pt").is_file()
checkpoint.rng_state = real_rng_state
found["latest_file_after_late_crash"] = (ckpt / checkpoint.LATEST).read_text()
# the real save at step 4 cleans the partial folder and completes
(Path(cfg.output_dir) / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
import yaml  # noqa: E402

from dst_train.config import to_dict  # noqa: E402

checkpoint.save(
    engine,
    ckpt,
    4,
    {"step": 4, "epoch": 0, "batch_in_epoch": 4},
    yaml.safe_dump(to_dict(cfg)),
    2,
    0,
    barrier,
)
found["latest_after_good_save"] = checkpoint.latest_tag(ckpt)
found["late_partial_removed"] = not (ckpt / "step_00000003").exists()

# convert and compare with the live model
from dst_train.engine.convert import convert  # noqa: E402
from dst_train.model.dst_model import DSTModel  # noqa: E402

report = convert(out, out / "hf")
live = engine.module
live.eval()
loaded = DSTModel.from_pretrained(out / "hf")
loaded.eval()
with torch.no_grad():
    a, b = live(**batch), loaded(**batch)
found["max_abs_diff"] = {
    k: (a[k] - b[k]).abs().max().item()
    for k in ("speak_logits", "update_logits", "loss", "response_loss")
}
from transformers import SmolVLMForConditionalGeneration  # noqa: E402

plain = SmolVLMForConditionalGeneration.from_pretrained(out / "hf")
found["plain_transformers_params"] = sum(p.numel() for p in plain.parameters())
found["convert_report_keys"] = sorted(report)
print("RESULT " + json.dumps(found))
