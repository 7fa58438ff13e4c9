"""Train, stop the run with a signal at a chosen place, then run the same config again.

    python scenario_stop.py DEMO TINY OUT STEP:MICRO:RANKS [...] [key=value ...]

First an uninterrupted run (OUT/reference). Then, per spec, in OUT/<spec>: a run whose process
sends itself SIGTERM during the MICRO-th training forward (from 0) of optimizer step STEP (from
1) on RANKS (``all`` or one rank number), as a scheduler's or a user's ``kill`` would; then the
same config again, which resumes. Three micro-batches per optimizer step, LoRA dropout on (every
random draw matters). Run with plain ``python`` or torchrun. Rank 0 saves each run's final
trainable weights to ``final.pt``; each rank prints one ``RESULT {json}`` line per spec."""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from dst_train.config import load_config
from dst_train.engine import trainer
from dst_train.model.dst_model import DSTModel

demo_root, tiny, out_root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
specs = [a for a in sys.argv[4:] if "=" not in a]
extra = [a for a in sys.argv[4:] if "=" in a]
GRAD_ACCUM = 3
where = {"target": None, "ranks": "all", "forwards": 0}
real_forward = DSTModel.forward


def forward_with_a_signal(self, *args, **kw):
    if self.training:  # not the val loss's forwards
        index, where["forwards"] = where["forwards"], where["forwards"] + 1
        rank = torch.distributed.get_rank()
        if index == where["target"] and where["ranks"] in ("all", str(rank)):
            os.kill(os.getpid(), signal.SIGTERM)
    return real_forward(self, *args, **kw)


DSTModel.forward = forward_with_a_signal
current = {}
real_make_engine = trainer.make_engine


def make_engine_and_keep(*args):
    current["engine"] = real_make_engine(*args)
    return current["engine"]


trainer.make_engine = make_engine_and_keep


def run(out: Path) -> dict:
    cfg = load_config(
        None,
        [
            f"data.root={demo_root}",
            f"model.arch={tiny}",
            f"output_dir={out}",
            "model.lora=true",
            "model.lora_r=4",
            "model.lora_dropout=0.3",
            "train.micro_batch_size=1",
            f"train.grad_accum={GRAD_ACCUM}",
            "train.max_steps=5",
            "train.lr=0.003",
            "train.warmup_steps=1",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.tensorboard=false",
            *extra,
        ],
    )
    where["forwards"] = 0
    return trainer.fit(cfg)


def final_weights(out: Path) -> None:
    if torch.distributed.get_rank() == 0:
        trained = current.pop("engine").module.named_parameters()
        torch.save({n: p.detach().clone() for n, p in trained if p.requires_grad}, out / "final.pt")


for spec in ["reference", *specs]:
    out = out_root / spec.replace(":", "_")
    if spec == "reference":
        where["target"] = None
    else:
        step, micro, ranks = spec.split(":")
        where.update(target=(int(step) - 1) * GRAD_ACCUM + int(micro), ranks=ranks)
    first = run(out)
    where["target"] = None
    resumed = run(out) if first.get("stopped") else first
    final_weights(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "spec": spec,
        "rank": torch.distributed.get_rank(),
        "first": {k: v for k, v in first.items() if k in ("step", "stopped")},
        "resumed_step": resumed["step"],
        "steps": [r["step"] for r in rows if r["kind"] == "train"],
        "losses": [r["loss"] for r in rows if r["kind"] == "train"],
        "val_steps": [r["step"] for r in rows if r["kind"] == "eval"],
        "checkpoints": sorted(p.name for p in (out / "checkpoints").glob("step_*")),
        "handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }
    trainer.write_result_line(result)
