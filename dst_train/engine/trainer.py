"""The training loop on ``deepspeed.initialize`` (no HF Trainer).

One recipe, read top to bottom: distributed init → model → data → engine → resume → loop
(forward, ``engine.backward``, ``engine.step``) → periodic eval and checkpoints → final save, plot.
Launched by ``deepspeed``/``torchrun`` (one process per GPU, or per CPU worker with gloo) or plain
``python`` for a single process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from dst_train.config import RunConfig, save_config, to_dict
from dst_train.engine import checkpoint
from dst_train.engine.ds_config import build_ds_config, zero_stage
from dst_train.engine.metrics import LOSSES, LogWindow, MetricsLogger
from dst_train.engine.stop_request import StopRequest, StopRequested, host_group


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. fp16 overflow every step); the message says why."""


class OverflowGuard:
    """Counts optimizer steps skipped in a row for fp16 overflow; stops after ``limit``."""

    def __init__(self, limit: int, skipped_so_far: int = 0):
        self.limit, self.last, self.in_a_row = limit, skipped_so_far, 0

    def update(self, skipped_total: int, scale: float | None = None) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped_total > self.last else 0
        self.last = skipped_total
        if self.limit and self.in_a_row >= self.limit:
            raise TrainingStopped(
                f"{self.in_a_row} optimizer steps in a row were skipped for fp16 overflow (loss "
                f"scale {scale}): lower train.lr, use bf16 on GPUs that have it, or check the data "
                "for extreme values"
            )


# ----------------------------------------------------------------- setup
def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """Process group via DeepSpeed: nccl on GPUs, gloo on CPU. Returns (rank, world, device)."""
    import importlib

    import deepspeed

    # not `import deepspeed.comm.torch as m`: deepspeed.comm's namespace binds `torch` itself
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not cfg.train.cpu_shm_comm:
        # The CPU shared-memory all-reduce op is compiled on first use (~45 s); gloo alone is
        # enough for the CPU demo and tests. DeepSpeed looks the builder up here at init.
        ds_torch_comm.build_shm_op = lambda: None
    if "WORLD_SIZE" not in os.environ:  # plain `python`: a world of one (no mpi4py lookup)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        # a port nobody uses: a fixed one made two single-process jobs on one machine (a tune
        # beside a plain-python run, two test suites) fail with "address already in use"
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["WORLD_SIZE"] = "1"
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def finish_distributed() -> None:
    """Destroy the process group, if any, at the end of a job that ran to completion. Left to
    the interpreter's exit, gloo's worker threads can abort the process ("terminate called
    without an active exception", pytorch/pytorch#190489). Not after an exception: another rank
    may still be inside a collective, and destroying would wait for it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def write_result_line(result: dict) -> None:
    """``RESULT {json}`` on stdout for a parent process to read, in one write(2) after a newline:
    processes sharing the pipe (ranks) cannot cut it (``print`` writes the text and its newline
    apart, and another rank's line could land between them)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, ("\nRESULT " + json.dumps(result) + "\n").encode())


def exit_with_result(result: dict) -> None:
    """The end of a child process whose parent reads one ``RESULT {json}`` line of its stdout (the
    benchmarks' fresh-process probes): the line (:func:`write_result_line`), then
    ``os._exit(0)``. Nothing is left to do, and the interpreter's teardown is skipped: in it, a
    thread the libraries left running now and then aborted the process, the process group
    destroyed before or not ("terminate called without an active exception": a C++ thread never
    joined; exit -6), after the result was out: 3 times in about 90 throughput probes on the
    2-core development machine, once inside the full suite."""
    write_result_line(result)
    os._exit(0)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup(cfg: RunConfig):
    """Everything the loop needs, built in a fixed order; returns a namespace-like dict."""
    s = prepare(cfg)
    s["engine"] = make_engine(s, cfg, cfg.train.micro_batch_size, s["grad_accum"])
    return s


def make_engine(s: dict, cfg: RunConfig, micro: int, grad_accum: int):
    """A DeepSpeed engine over ``s["model"]`` at ``micro`` samples per micro-step and
    ``grad_accum`` micro-steps per optimizer step (the OOM safety net builds a second one)."""
    import deepspeed

    t = cfg.train
    world = s["world"]
    ds_config = dict(
        s["ds_config"],
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=micro * grad_accum * world,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=s["model"],
        model_parameters=param_groups(s["model"], t.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: lr_schedule(opt, t.warmup_steps, t.max_steps, t.min_lr_ratio),
    )
    return engine


def prepare(cfg: RunConfig):
    """Distributed init, resolved DeepSpeed config, model, datasets and loaders — everything but
    the engine (a benchmark hands the same pieces to another training stack)."""
    from dst_train.data.collate import LengthGroupedSampler, make_collate
    from dst_train.data.pipeline import make_dataset
    from dst_train.model.backbone import load_image_processor, load_tokenizer
    from dst_train.model.build import build_model, resolve_precision

    rank, world, device = init_distributed(cfg)
    seed_everything(cfg.seed)
    precision = resolve_precision(cfg.model)
    grad_accum = cfg.grad_accum(world)
    ds_config = run_ds_config(cfg, world, precision.dtype, device.type == "cuda")
    t = cfg.train
    hf_ds = None
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 — keep alive: weights built partitioned
    with init_device(device, cfg.model.pretrained, zero3=hf_ds is not None):
        model = build_model(cfg.model, cfg.head_config(), precision)
    tokenizer = load_tokenizer(cfg.model.arch)
    processor = load_image_processor(cfg.model.arch)
    train_ds = make_dataset(
        cfg, cfg.data.train_split, tokenizer, model.backbone, processor, seed=cfg.seed
    )
    val_ds = make_dataset(
        cfg, cfg.data.val_split, tokenizer, model.backbone, processor, seed=cfg.seed
    )
    collate = make_collate(tokenizer.pad_token_id, bool(cfg.data.feature_cache))
    # a training step's collate (in this process): on a GPU, frames are assembled there
    step_collate = make_collate(
        tokenizer.pad_token_id,
        bool(cfg.data.feature_cache),
        frames_device=device if device.type == "cuda" else None,
    )
    sampler = LengthGroupedSampler(train_ds.lengths(), t.micro_batch_size, world, rank, cfg.seed)
    loader = sample_loader(train_ds, sampler, cfg.data.num_workers)
    val_sampler = LengthGroupedSampler(val_ds.lengths(), t.micro_batch_size, world, rank, cfg.seed)
    val = val_loader(val_ds, val_sampler, collate, cfg.data.num_workers)
    return {
        "rank": rank,
        "world": world,
        "device": device,
        "model": model,
        "precision": precision,
        "ds_config": ds_config,
        "grad_accum": grad_accum,
        "train_ds": train_ds,
        "sampler": sampler,
        "loader": loader,
        "val_loader": val,
        "hf_ds": hf_ds,
        "tokenizer": tokenizer,
        "processor": processor,
        "collate": collate,
        "step_collate": step_collate,
    }


def run_ds_config(cfg: RunConfig, world: int, dtype, on_gpu: bool) -> dict:
    """The run's DeepSpeed config: the template of ``train.ds_config`` with every "auto" filled."""
    from dst_train.model.backbone import arch_config

    t = cfg.train
    ds_config = build_ds_config(
        t.ds_config,
        micro_batch=t.micro_batch_size,
        grad_accum=cfg.grad_accum(world),
        world_size=world,
        lr=t.lr,
        betas=t.betas,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        dtype=dtype,
        hidden_size=arch_config(cfg.model.arch).text_config.hidden_size,
        on_gpu=on_gpu,
        deepspeed_adam=t.deepspeed_adam,
    )
    if t.node_local_checkpoints:  # each node's first process saves the model states there too
        ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    return ds_config


def init_device(device: torch.device, pretrained: bool, zero3: bool):
    """The context to build the model in. Random weights are drawn where they will live:
    initialising 2 B parameters takes minutes on the CPU, a second on the GPU. Loaded weights
    are read on the CPU, and ZeRO-3 partitions at construction by itself."""
    if device.type == "cuda" and not pretrained and not zero3:
        return torch.device(device)
    return contextlib.nullcontext()


def die_with_launcher() -> None:
    """A worker started by a launcher (``LOCAL_RANK`` set: deepspeed, torchrun) is killed when
    its launcher dies, even by SIGKILL: torchrun starts workers in sessions of their own, so a
    kill of the launcher's process group would leave them training and writing checkpoints
    beside the run that resumes. Linux only (prctl PR_SET_PDEATHSIG); a no-op elsewhere and for
    a plain ``python`` run, whose parent is a shell that may exit (nohup)."""
    import ctypes
    import signal
    import sys

    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent or parent == 1:  # the launcher died before the call: follow it
        os._exit(1)


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy (every rank the same: ranks differ by data)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)  # numpy takes [0, 2**32); a config seed is in [0, 2**31 - 1]
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases and norm weights (1-D tensors).

    The real shape decides: under ZeRO-3 every parameter is a partitioned 1-D (empty) tensor
    with its true shape in ``ds_shape``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_schedule(optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak lr, then cosine decay to ``peak × min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------ loop
def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _one(item):
    return item


def sample_loader(dataset, sampler, num_workers: int) -> torch.utils.data.DataLoader:
    """The train loader: single samples in ``sampler``'s order, epoch after epoch
    (``SampleOrder``), uncollated, so a micro-batch is read by every worker at once and the OOM
    safety net can split it (``batches_forever`` regroups them). The workers keep about two
    micro-batches' samples in flight between them. The loader's own generator (seeded by the
    start epoch in ``batches_forever``): creating its iterator (once a run, and again after a
    resume) must not draw from the global RNG dropout uses. The workers leave the stop signals
    to their rank (``stop_request.loader_worker_init``)."""
    from torch.utils.data import DataLoader

    from dst_train.data.collate import EpochItems, SampleOrder
    from dst_train.engine.stop_request import loader_worker_init

    return DataLoader(
        EpochItems(dataset),
        sampler=SampleOrder(sampler),
        batch_size=None,
        collate_fn=_one,
        num_workers=num_workers,
        prefetch_factor=max(2, -(-2 * sampler.batch_size // num_workers)) if num_workers else None,
        generator=torch.Generator(),
        worker_init_fn=loader_worker_init,
    )


def val_loader(dataset, sampler, collate, num_workers: int) -> torch.utils.data.DataLoader:
    """The val-loss loader: ``sampler``'s batches (``LengthGroupedSampler``), collated in the
    workers, which leave the stop signals to their rank as the train loader's do."""
    from torch.utils.data import DataLoader

    from dst_train.engine.stop_request import loader_worker_init

    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        worker_init_fn=loader_worker_init,
    )


def batches_forever(loader, sampler, epoch: int, skip: int):
    """Yield (epoch, index in epoch, list of samples) across epochs, starting ``skip`` batches
    into ``epoch``: ``sampler``'s batches, their samples read through ``loader``
    (``sample_loader``), whose one iterator runs across the epochs."""
    loader.sampler.start(epoch, skip)
    if loader.generator is not None:  # worker seeds depend on the start epoch, not on the step
        loader.generator.manual_seed(hash((sampler.seed, epoch)) % 2**63)
    samples = iter(loader)
    while True:
        sampler.set_epoch(epoch, skip)
        for i, batch in enumerate(sampler, start=skip):
            yield epoch, i, [next(samples) for _ in batch]
        epoch, skip = epoch + 1, 0


def fit(cfg: RunConfig) -> dict:
    """Train as configured; returns the final metrics (rank 0 also writes them to disk), or, for
    a run a signal stopped, the step saved and ``"stopped"``: the signal (stop_request.py)."""
    s = setup(cfg)
    # the engine leaves `s`: when the OOM safety net rebuilds it, nothing may keep the old one
    # (and its optimizer state) alive
    rank, world, engine, device = s["rank"], s["world"], s.pop("engine"), s["device"]
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "ds_config.json").write_text(json.dumps(s["ds_config"], indent=2))
    barrier = torch.distributed.barrier
    barrier()
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    writer = checkpoint.is_writer(rank, local_rank, cfg.train.node_local_checkpoints)

    def save(engine, state: dict) -> Path:  # every rank calls it
        step, keep = state["step"], cfg.train.keep_last
        return checkpoint.save(
            engine, ckpt_dir, step, state, config_text, keep, rank, barrier, writer
        )

    flags = host_group(device, world)  # the stop and OOM flags travel over the CPU
    stop = StopRequest(world, flags)  # its handlers are installed for the loop only

    def val_loss(engine) -> dict:  # every rank; a signal cuts it short (StopRequested)
        return evaluate(engine, s["val_loader"], device, cfg.train.eval_batches, stop)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    tag = resume_tag(cfg, ckpt_dir)
    if tag is not None:
        state = checkpoint.load(engine, tag[0], tag[1], rank)
        if state["step"] >= cfg.train.max_steps:
            # a rerun of a finished run: nothing to train, and no second final val pass and
            # metrics line (a save of the complete step would be kept as it is)
            if rank == 0:
                print(f"{tag[0] / tag[1]}: already at step {state['step']}; nothing to do")
            return {"step": state["step"]}
    log = MetricsLogger(
        out_dir,
        rank == 0,
        cfg.train.tensorboard,
        start_step=state["step"],
        total=cfg.train.max_steps,
        resumed=tag is not None,
    )
    stream = batches_forever(s["loader"], s["sampler"], state["epoch"], state["batch_in_epoch"])
    t = cfg.train
    guard = OverflowGuard(t.max_skipped_in_a_row, engine.skipped_steps)
    oom_net = MicroBatchRunner(
        engine,
        s["step_collate"],
        device,
        t.oom_retry,
        t.micro_batch_size,
        s["grad_accum"],
        rank,
        world,
        rebuild=lambda micro, accum: make_engine(s, cfg, micro, accum),
        scratch=out_dir / OOM_SCRATCH,
        zero_stage=zero_stage(s["ds_config"]),
        stop=stop,
        flags=flags,
    )
    del engine  # the safety net may replace it: always use oom_net.engine from here on
    oom_net.engine.train()
    since_log = LogWindow()  # the steps since the last metrics line
    with stop:  # from here a signal saves and stops (stop_request.py)
        while state["step"] < t.max_steps:
            # where this step starts: a stop inside it saves this state and this RNG
            before, rng = dict(state), checkpoint.rng_state()
            window = []  # this optimizer step's micro-batches (replayed if the safety net halves)
            for _ in range(s["grad_accum"]):
                epoch, index, items = next(stream)
                window.append(items)
                state.update(epoch=epoch, batch_in_epoch=index + 1)
            try:
                # losses…, tokens, samples; fetching the window drew nothing from the RNG
                sums = oom_net.run_window(window, state["step"] + 1, rng)
            except StopRequested as why:
                checkpoint.set_rng_state(rng)
                during = f"step {before['step'] + 1}"
                return stop_here(save, oom_net.engine, before, str(why), during, log, rank)
            engine = oom_net.engine
            state["step"] += 1
            since_log.add(sums)
            guard.update(engine.skipped_steps, loss_scale(engine))
            if state["step"] % t.log_every == 0 or state["step"] == t.max_steps:
                # the loop's only wait for the device: the sums are read back to be logged
                reduce = functools.partial(all_reduce_sum, device=device)
                row = since_log.line(reduce, micro_steps=s["grad_accum"] * world)
                row.update(
                    lr=engine.get_lr()[0],
                    loss_scale=loss_scale(engine),
                    skipped_steps=engine.skipped_steps,
                    peak_mem_gib=peak_memory_gib(device),
                    micro_batch=oom_net.current_micro,
                    epoch=state["epoch"],
                )
                log.train(state["step"], row)
            if t.eval_every and state["step"] % t.eval_every == 0 and state["step"] < t.max_steps:
                try:
                    with since_log.paused():
                        log.eval(state["step"], val_loss(engine))
                except StopRequested as why:  # the step is done: it is the one saved
                    during = f"the val loss after step {state['step']}"
                    return stop_here(save, engine, state, str(why), during, log, rank)
            if t.save_every and state["step"] % t.save_every == 0 and state["step"] < t.max_steps:
                with since_log.paused():
                    save(engine, state)
        engine = oom_net.engine
        try:
            final = val_loss(engine)
        except StopRequested as why:  # trained to the end: saved, without the final val loss
            during = f"the final val loss after step {state['step']}"
            return stop_here(save, engine, state, str(why), during, log, rank)
        log.eval(state["step"], final)
        save(engine, state)
    log.close()
    return {"step": state["step"], **final}


def stop_here(save, engine, done: dict, why: str, during: str, log, rank: int) -> dict:
    """The end of a run a signal stopped (every rank): ``done``, the state after the last
    completed optimizer step, saved by ``save(engine, done)`` (nothing when no step ran), the
    metrics closed. ``why``: the signal; ``during``: what it cut short."""
    t0 = time.perf_counter()
    folder = save(engine, done) if done["step"] > 0 else None
    log.close()
    if rank == 0:
        seconds = time.perf_counter() - t0
        where = f"saved {folder} in {seconds:.1f} s" if folder else "nothing to save"
        print(
            f"stopped by {why} during {during}: {where}; run the same command to resume from there",
            flush=True,
        )
    return {"step": done["step"], "stopped": why}


OOM_SCRATCH = ".oom_replay"  # in output_dir: the engine state the safety net rebuilds from


class MicroBatchRunner:
    """Runs one optimizer step's micro-batches through the engine, with the OOM safety net.

    With ``oom_retry``, a CUDA out-of-memory error halves the micro-batch and replays the step:
    each loader batch is then split into chunks of the smaller size, and DeepSpeed's accumulation
    grows so the samples per optimizer step stay the same. DeepSpeed cannot be reset mid-window
    (``zero_grad`` leaves ZeRO's reduced-gradient buffers, bucket state and micro-step counter
    behind: a replay after an OOM in a later micro-batch trained on stale gradients, and one after
    an OOM in backward crashed inside DeepSpeed), so the engine is rebuilt: its state — untouched,
    since the optimizer step has not run — goes to a scratch checkpoint, a new engine at the
    smaller micro-batch loads it, and the window's RNG state is restored. The replayed step is
    then a clean step at the smaller micro-batch (tested to fp32 round-off at every position).

    Before every micro-step the ranks agree whether a signal asked the run to stop (``stop``,
    stop_request.py); if so :class:`StopRequested` leaves the window half done.

    Which OOMs can be replayed: on one rank, any in forward or backward. On several ranks, one in
    forward under ZeRO-0/1/2 (no collectives run in forward): the ranks agree after each forward
    (one 1-element all-reduce) and rebuild together. An OOM in backward on several ranks (the
    others may be inside a gradient collective this rank will never join), in forward under ZeRO-3
    (parameter all-gathers), or in the optimizer step (parameters half updated) cannot be: the
    rank prints what happened and how to resume, and exits at once; the launcher then stops the
    others (a hang is never the outcome)."""

    def __init__(
        self,
        engine,
        collate,
        device,
        oom_retry: bool,
        micro: int,
        grad_accum: int,
        rank: int,
        world: int = 1,
        rebuild=None,
        scratch: Path | None = None,
        zero_stage: int = 2,
        stop: StopRequest | None = None,
        flags=None,
    ):
        self.engine, self.collate, self.device = engine, collate, device
        self.stop = stop
        self.oom_retry, self.micro, self.grad_accum = oom_retry, micro, grad_accum
        self.rank, self.world, self.zero_stage = rank, world, zero_stage
        self.rebuild, self.scratch = rebuild, scratch
        self.agree = oom_retry and world > 1 and zero_stage < 3
        # the group the OOM flag travels in, as a CPU tensor: stop_request.host_group (None:
        # the default group, which must then be gloo)
        self.flags = flags
        self.chunk = micro  # samples per engine micro-step
        self.phase = "forward"

    @property
    def current_micro(self) -> int:
        """Samples per engine micro-step now (the configured micro-batch until an OOM halves it)."""
        return self.chunk

    def run_window(
        self, window: list[list], step: int = 0, rng: dict | None = None
    ) -> torch.Tensor:
        """Forward/backward/step over every micro-batch of optimizer step ``step``; returns the
        summed losses, tokens and samples ((len(LOSSES) + 2,) float64, on the run's device).
        ``rng``: the RNG state of the window's start, if the caller has it (a replay after an
        OOM restores it)."""
        rng = rng if rng is not None else checkpoint.rng_state()
        while True:
            try:
                return self._run(window)
            except torch.OutOfMemoryError as e:
                if not self.oom_retry:
                    raise
                what = str(e).splitlines()[0] if str(e) else "out of memory"
            # outside the except block: the traceback, and with it the failed step's
            # activations, is gone before the engine is rebuilt
            self._recover(what, step)
            checkpoint.set_rng_state(rng)  # the replay draws the same dropout masks

    def _run(self, window: list[list]) -> torch.Tensor:
        # The losses are summed where they are (on the GPU): reading one back (.item()) would
        # make the host wait for the micro-step's last kernel, and the GPU would then idle
        # while the host collates and copies the next micro-batch. The caller reads the sums
        # once, when it logs them.
        losses = torch.zeros(len(LOSSES), dtype=torch.float64, device=self.device)
        tokens = samples = 0
        for items in window:
            parts = range(0, len(items), self.chunk)
            for c in parts:
                why = self.stop and self.stop.agreed()  # every rank, before every micro-step
                if why:
                    raise StopRequested(why)
                self.phase = "forward"
                out, batch = self._forward(items[c : c + self.chunk])
                self.phase = "backward"
                self.engine.backward(out["loss"])
                self.phase = "step"
                self.engine.step()
                losses += torch.stack([out[k].detach() for k in LOSSES]).double() / len(parts)
                tokens += int(batch["attention_mask"].sum())  # the host's copy of the batch
                samples += batch["input_ids"].shape[0]
        counts = torch.tensor([tokens, samples], dtype=torch.float64, device=self.device)
        return torch.cat([losses, counts])

    def _forward(self, items: list[dict]) -> tuple[dict, dict]:
        """Collate (on a GPU it allocates there: ``step_collate``) and the engine's forward;
        raises OutOfMemoryError on every rank when any rank ran out. Returns (outputs, batch)."""
        try:
            batch = self.collate(items)
            out, failed = self.engine(**to_device(batch, self.device)), False
        except torch.OutOfMemoryError:
            if not self.agree:
                raise
            out, batch, failed = None, None, True
        if self.agree:
            flag = torch.tensor([float(failed)])  # on the host: no wait for the forward's kernels
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.flags)
            if flag.item():
                raise torch.OutOfMemoryError(
                    "CUDA out of memory in this micro-batch's forward on "
                    + ("this rank" if failed else "another rank")
                )
        return out, batch

    def _recover(self, what: str, step: int) -> None:
        where = f"{what} (in the {self.phase} of step {step}, rank {self.rank})"
        if self.chunk < 2:
            raise TrainingStopped(f"{where} with one sample per micro-batch: nothing left to halve")
        several = self.world > 1 and (self.phase == "backward" or self.zero_stage == 3)
        if self.phase == "step" or several or self.rebuild is None:
            self._stop(where)
        old_micro, self.chunk = self.chunk, self.chunk // 2
        accum = self.grad_accum * math.ceil(self.micro / self.chunk)
        self._rebuild_engine(self.chunk, accum)
        if self.rank == 0:
            print(
                f"out of memory: micro-batch {old_micro} -> {self.chunk}, accumulation {accum} "
                f"(the same samples per step); replaying step {step}",
                flush=True,
            )

    def _rebuild_engine(self, micro: int, accum: int) -> None:
        import gc
        import shutil

        tag = "state"
        self.engine.save_checkpoint(str(self.scratch), tag=tag, save_latest=False)
        module = self.engine.module
        self.engine.destroy()  # removes its gradient hooks from the parameters ...
        # ... but not its forward hooks on the module, which would keep the old engine (and its
        # optimizer state) alive and run on every forward of the new one
        for name in (
            "module_forward_pre_hook",
            "module_forward_post_hook",
            "first_dataloader_check",
        ):
            handle = getattr(self.engine, name, None)
            if handle is not None:
                handle.remove()
        self.engine = None
        for p in module.parameters():  # what a backward cut short left on them
            p.grad = None
            if hasattr(p, "grad_accum"):
                p.grad_accum = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.engine = self.rebuild(micro, accum)
        self.engine.load_checkpoint(
            str(self.scratch), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        self.engine.train()
        torch.distributed.barrier()
        if self.rank == 0:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _stop(self, where: str) -> None:
        message = (
            f"{where}: this cannot be replayed in place"
            + (
                " (the optimizer step had started)"
                if self.phase == "step"
                else " (the other ranks may be inside a collective this rank will not join)"
            )
            + ". Run the same command to resume from the last checkpoint; if it runs out of "
            "memory here again, lower train.micro_batch_size (the rest of that epoch is then "
            "batched anew) or see docs/training.md (memory guide)."
        )
        if self.world == 1:
            raise TrainingStopped(message)
        print(f"training stopped: {message}", file=sys.stderr, flush=True)
        os._exit(1)  # the launcher stops the other ranks; waiting for them could hang


def resume_tag(cfg: RunConfig, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoints folder, tag) to resume from, or None to start fresh."""
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        tag = checkpoint.agreed_latest_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    folder = Path(cfg.train.resume)
    if not (folder / checkpoint.COMPLETE).is_file():
        raise FileNotFoundError(f"{folder}: not a complete dst-train checkpoint")
    return folder.parent, folder.name


@torch.no_grad()
def evaluate(engine, loader, device, max_batches: int, stop: StopRequest | None = None) -> dict:
    """Mean of every loss over the val split (or its first ``max_batches``), all ranks summed.
    With ``stop``, the ranks agree before each batch whether a signal cut the pass short
    (:class:`StopRequested`). It draws nothing from the global RNG (no dropout in eval mode, the
    val batches are fixed), so a stop during it saves the RNG of the next step's start."""
    engine.eval()
    sums = torch.zeros(len(LOSSES) + 1, dtype=torch.float64, device=device)  # read once, at the end
    loader.batch_sampler.set_epoch(0)
    # the ranks step through as many batches each (ZeRO-3's forward is a collective): the last
    # ones of a rank may repeat batches to even them out, and run, but count for nothing
    counted = loader.batch_sampler.first_visits()
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        why = stop and stop.agreed()
        if why:
            engine.train()
            raise StopRequested(why)
        out = engine(**to_device(batch, device))
        if i < counted:
            sums[:-1] += torch.stack([out[k] for k in LOSSES]).double()
            sums[-1] += 1
    engine.train()
    sums = all_reduce_sum(sums, device)
    n = max(sums[-1].item(), 1)
    return {f"val_{k}": sums[i].item() / n for i, k in enumerate(LOSSES)}


def all_reduce_sum(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    y = x.to(device)
    torch.distributed.all_reduce(y)
    return y.cpu()


def loss_scale(engine) -> float | None:
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
