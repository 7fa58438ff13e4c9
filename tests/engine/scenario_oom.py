"""Train with ``train.oom_retry`` and one simulated CUDA out-of-memory error at a chosen place.

    python scenario_oom.py DEMO TINY OUT WINDOW:MICRO:PHASE:RANKS [...] [key=value ...]

One short run per WINDOW:MICRO:PHASE:RANKS (in OUT/<that spec>), one after the other in this
process (the imports and process group are paid once). In each, the OOM hits the MICRO-th
micro-batch (from 0) of optimizer step WINDOW (from 1), in PHASE ``collate`` (assembling the
micro-batch raises: on a GPU it allocates the frames there), ``forward`` (the model's
forward raises), ``backward`` (a gradient hook half-way down the language model raises: the
later layers' gradients have already reached DeepSpeed) or ``step`` (the optimizer step at the
accumulation boundary raises before it runs), on RANKS ``all`` or one rank number. Afterwards
every micro-batch has one sample, so nothing raises again. Run with plain `python` (one
process) or torchrun. Rank 0 saves each run's final trainable weights to OUT/<spec>/final.pt;
each rank prints one ``RESULT {json}`` line per run."""

import gc
import json
import sys
import weakref
from pathlib import Path

import torch

from dst_train.config import load_config
from dst_train.engine import trainer
from dst_train.model.dst_model import DSTModel

demo_root, tiny, out_root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
specs = [a for a in sys.argv[4:] if "=" not in a]
extra = [a for a in sys.argv[4:] if "=" in a]
GRAD_ACCUM = 2
calls, where = {}, {}


def hit_here() -> bool:
    return where["ranks"] == "all" or torch.distributed.get_rank() == int(where["ranks"])


def raise_oom(*_):
    calls["oom"] += 1
    raise torch.OutOfMemoryError(f"CUDA out of memory (simulated, {where['phase']})")


real_forward = DSTModel.forward


def forward_with_an_oom(self, *args, **kw):
    if kw["input_ids"].shape[0] > 1:
        index, calls["big"] = calls["big"], calls["big"] + 1
        if index == where["target"] and hit_here():
            if where["phase"] == "forward":
                raise_oom()
            calls["armed"] = where["phase"]
    return real_forward(self, *args, **kw)


def middle_layer_hook(module, inputs, output):
    if calls["armed"] == "backward":
        calls["armed"] = False
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.register_hook(raise_oom)  # fires mid-backward


DSTModel.forward = forward_with_an_oom
real_runner_init = trainer.MicroBatchRunner.__init__


def runner_with_an_oom_in_collate(self, engine, collate, *args, **kw):
    def collate_with_an_oom(items):
        if len(items) > 1 and where["phase"] == "collate":
            index, calls["big_collate"] = calls["big_collate"], calls["big_collate"] + 1
            if index == where["target"] and hit_here():
                raise_oom()
        return collate(items)

    real_runner_init(self, engine, collate_with_an_oom, *args, **kw)


trainer.MicroBatchRunner.__init__ = runner_with_an_oom_in_collate
real_make_engine = trainer.make_engine
engines = []  # weak references: the replaced engine must be freed, with its optimizer state
current = {}


def make_engine_and_watch(s, cfg, micro, grad_accum):
    engine = real_make_engine(s, cfg, micro, grad_accum)
    current["engine"] = engine
    if not engines:
        layers = s["model"].backbone.hf.model.text_model.layers
        layers[len(layers) // 2].register_forward_hook(middle_layer_hook)
    real_step = engine.step

    def step_with_an_oom(*a, **kw):
        if calls["armed"] == "step" and engine.is_gradient_accumulation_boundary():
            calls["armed"] = False
            raise_oom()
        return real_step(*a, **kw)

    engine.step = step_with_an_oom
    engines.append(weakref.ref(engine))
    return engine


trainer.make_engine = make_engine_and_watch
for spec in specs:
    window, micro, phase, ranks = spec.split(":")
    # the OOM's place, as an index among the two-sample forwards
    where.update(target=(int(window) - 1) * GRAD_ACCUM + int(micro), phase=phase, ranks=ranks)
    calls.update(big=0, big_collate=0, oom=0, armed=False)
    engines.clear()
    out = out_root / spec.replace(":", "_")
    cfg = load_config(
        None,
        [
            f"data.root={demo_root}",
            f"model.arch={tiny}",
            f"output_dir={out}",
            "train.micro_batch_size=2",
            f"train.grad_accum={GRAD_ACCUM}",
            "train.max_steps=3",
            "train.oom_retry=true",
            "train.lr=0.003",
            "train.warmup_steps=1",
            "train.eval_batches=1",
            *extra,
        ],
    )
    trainer.fit(cfg)
    engine = current.pop("engine")
    gc.collect()
    rank = torch.distributed.get_rank()
    if rank == 0:
        trained = engine.module.named_parameters()
        weights = {n: p.detach().clone() for n, p in trained if p.requires_grad}
        torch.save(weights, out / "final.pt")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    result = {
        "spec": spec,
        "rank": rank,
        "oom_calls": calls["oom"],
        "engines_built": len(engines),
        "engines_alive": sum(ref() is not None for ref in engines),
        "micro_batches": [r["micro_batch"] for r in rows if r["kind"] == "train"],
        "train_batch_size": engine.train_batch_size(),
        "accumulation": engine.gradient_accumulation_steps(),
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "global_steps": engine.global_steps,
        "losses": [r["loss"] for r in rows if r["kind"] == "train"],
    }
    trainer.write_result_line(result)
