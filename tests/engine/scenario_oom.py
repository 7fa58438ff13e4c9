"""Train with ``train.oom_retry`` while every forward of more than one sample raises an
out-of-memory error (what a too-large micro-batch does on a GPU) — on every rank, or with
``rank1`` as the 4th argument only on rank 1 (the other ranks' batches fit). Run with plain
`python` (one process) or torchrun. Prints one JSON object of findings per rank."""

import json
import sys
from pathlib import Path

import torch

from dst_train.config import load_config
from dst_train.engine import trainer
from dst_train.model.dst_model import DSTModel

demo_root, tiny, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
only_rank1 = sys.argv[4:] == ["rank1"]
real_forward = DSTModel.forward
calls = {"oom": 0}


def forward_with_a_memory_cap(self, *args, **kw):
    hit = not only_rank1 or torch.distributed.get_rank() == 1
    if hit and kw["input_ids"].shape[0] > 1:
        calls["oom"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory (simulated: micro-batch > 1)")
    return real_forward(self, *args, **kw)


DSTModel.forward = forward_with_a_memory_cap
real_setup = trainer.setup
seen = {}


def setup_and_keep(cfg):
    s = real_setup(cfg)
    seen["engine"] = s["engine"]
    return s


trainer.setup = setup_and_keep
cfg = load_config(
    None,
    [
        f"data.root={demo_root}",
        f"model.arch={tiny}",
        f"output_dir={out}",
        "train.micro_batch_size=2",
        "train.grad_accum=2",
        "train.max_steps=4",
        "train.oom_retry=true",
        "train.lr=0.003",
        "train.warmup_steps=1",
    ],
)
trainer.fit(cfg)
engine = seen["engine"]
rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
print(
    "RESULT "
    + json.dumps(
        {
            "rank": torch.distributed.get_rank(),
            "oom_calls": calls["oom"],
            "micro_batches": [r["micro_batch"] for r in rows if r["kind"] == "train"],
            "train_batch_size": engine.train_batch_size(),
            "accumulation": engine.gradient_accumulation_steps(),
            "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
            "global_steps": engine.global_steps,
            "losses": [r["loss"] for r in rows if r["kind"] == "train"],
        }
    )
)
