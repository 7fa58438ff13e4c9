"""The probe measures steady training: released memory before it, a real optimizer step in it.

A simulated CUDA caching allocator (reservations persist until ``empty_cache``; the peak restarts
at the current reservation) and a stand-in engine (weights stay allocated; activations of b samples
live from forward to backward; the optimizer state appears at the first step that is not skipped)
drive the real :class:`Prober` and the real searches.
"""

import pytest
import torch

from dst_train.tune.autotune import Prober
from dst_train.tune.search import doubling_search, search

GiB = 2**30
CPU = torch.device("cpu")


class CachingAllocator:
    """The part of ``torch.cuda`` the probe uses, with the caching allocator's behaviour."""

    def __init__(self, capacity: int):
        self.capacity, self.allocated, self.reserved = capacity, 0, 0
        self.peak_reserved = self.peak_allocated = 0

    def malloc(self, n: int) -> None:
        if self.allocated + n > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)  # freed blocks stay cached
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        self.reserved = self.allocated

    def reset_peak_memory_stats(self, device=None):
        self.peak_reserved, self.peak_allocated = self.reserved, self.allocated

    def max_memory_reserved(self, device=None):
        return self.peak_reserved

    def memory_reserved(self, device=None):
        return self.reserved

    def max_memory_allocated(self, device=None):
        return self.peak_allocated


class Engine:
    """Weights 2 GiB; 1 GiB of activations per sample; Adam state 3 GiB from the first real
    step; the first ``overflows`` steps overflow (fp16) and are skipped."""

    def __init__(self, cuda: CachingAllocator, overflows: int = 0):
        self.cuda, self.overflows = cuda, overflows
        self.skipped_steps = self.steps = 0
        self.adam = False
        self.activations = 0
        cuda.malloc(2 * GiB)

    def __call__(self, input_ids):
        self.activations = input_ids.shape[0] * GiB
        self.cuda.malloc(self.activations)
        return {"loss": None}

    def backward(self, loss):
        self.cuda.free(self.activations)

    def step(self):
        self.steps += 1
        if self.steps <= self.overflows:
            self.skipped_steps += 1
        elif not self.adam:
            self.cuda.malloc(3 * GiB)
            self.adam = True

    def zero_grad(self):
        pass


def _prober(cuda, engine):
    return Prober(
        engine, 0, lambda items: {"input_ids": torch.zeros(len(items), 1)}, CPU, cuda=cuda
    )


@pytest.mark.parametrize("strategy", [search, doubling_search], ids=["ours", "doubling baseline"])
def test_a_big_probe_does_not_inflate_the_smaller_ones_after_it(strategy):
    # capacity 24 GiB, limit 0.9 x 24: weights 2 + Adam 3 + b x 1 <= 21.6 -> b = 16 is the best
    cuda = CachingAllocator(24 * GiB)
    prober = _prober(cuda, Engine(cuda))
    big = prober(18)  # 23 GiB: over the limit, and its blocks stay cached ...
    assert not big.fits(int(21.6 * GiB))
    assert prober(4).peak_bytes == 9 * GiB  # ... yet the next, smaller probe reads its own peak
    result = strategy(prober, int(21.6 * GiB), max_micro=64)
    assert result.micro_batch == 16


def test_the_probe_waits_for_a_real_optimizer_step():
    # fp16 at loss scale 2^16 with hysteresis: the first steps overflow and are skipped, and the
    # optimizer state does not exist yet; two steps would read 2 + b GiB
    cuda = CachingAllocator(64 * GiB)
    engine = Engine(cuda, overflows=3)
    probe = _prober(cuda, engine)(4)
    # stepped until one was real, then once more with the state: weights + Adam + activations
    assert engine.steps == 5 and engine.skipped_steps == 3
    assert probe.real_steps == 2 and probe.peak_bytes == (2 + 3 + 4) * GiB
    # without overflow: the usual two steps
    engine = Engine(cuda := CachingAllocator(64 * GiB))
    assert _prober(cuda, engine)(4).peak_bytes == 9 * GiB and engine.steps == 2


def test_a_probe_that_never_gets_a_real_step_stops_at_its_cap():
    # every step overflows (a model fp16 cannot train): the probe gives up after max_steps
    cuda = CachingAllocator(64 * GiB)
    engine = Engine(cuda, overflows=10**6)
    probe = _prober(cuda, engine)(2)
    assert engine.steps == probe.steps == 24 and probe.real_steps == 0


def test_a_long_probe_runs_every_step_asked_for():
    # the GPU bench's check after tuning: `steps` above the overflow wait's cap (24) still all run
    cuda = CachingAllocator(64 * GiB)
    engine = Engine(cuda)
    prober = _prober(cuda, engine)
    prober.steps = 40
    assert prober(2).real_steps == 40 and engine.steps == 40


def test_a_long_probe_stops_at_its_deadline_and_says_how_far_it_got():
    # a lease's check after tuning: 100 steps may not fit its minutes; the steps that ran are
    # the result (the clock is the wall clock's stand-in: each step takes 1 s)
    cuda = CachingAllocator(64 * GiB)
    engine = Engine(cuda, overflows=2)
    prober = _prober(cuda, engine)
    prober.steps, prober.clock = 100, lambda: float(engine.steps)
    prober.stop_at = 10.0
    probe = prober(2)
    assert engine.steps == 10 and probe.steps == 10 and probe.real_steps == 8
    assert not probe.oom and probe.peak_bytes == (2 + 3 + 2) * GiB
    prober.stop_at = None  # no deadline: every step asked for
    assert prober(2).steps == 100 and engine.steps == 110


class Overflowing:
    """A real DeepSpeed engine whose first ``k`` losses are inf: DeepSpeed's own overflow check
    then skips those steps (as fp16 at loss scale 2^16 does), and creates no Adam state."""

    def __init__(self, engine, k: int):
        self.engine, self.k, self.calls = engine, k, 0

    def __call__(self, **batch):
        out = self.engine(**batch)
        self.calls += 1
        if self.calls <= self.k:
            out["loss"] = out["loss"] * float("inf")
        return out

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_on_a_real_deepspeed_engine_the_probe_waits_for_the_optimizer_state(
    demo_root, tiny_model_dir, tmp_path, world_of_one
):
    from dst_train.data.collate import make_collate
    from dst_train.engine.trainer import setup
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(
        demo_root, tiny_model_dir, f"output_dir={tmp_path}", "train.tensorboard=false"
    )
    s = setup(cfg)
    engine = Overflowing(s["engine"], k=3)
    collate = make_collate(s["tokenizer"].pad_token_id, False)
    probe = Prober(engine, s["train_ds"][0], collate, CPU)(2)
    adam = s["engine"].optimizer.optimizer.state
    assert s["engine"].skipped_steps == 3  # DeepSpeed skipped the overflowing steps ...
    assert adam and probe.real_steps == 2  # ... and the probe went on until state existed
    assert engine.calls == 5  # 3 skipped, the first real one, one more with the state


class WideEngine(Engine):
    """``Engine`` with ``per_sample`` GiB of activations per sample."""

    def __init__(self, cuda, per_sample: int):
        super().__init__(cuda)
        self.per_sample = per_sample

    def __call__(self, input_ids):
        self.activations = input_ids.shape[0] * self.per_sample * GiB
        self.cuda.malloc(self.activations)
        return {"loss": None}


def _rank_probes(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo ranks: rank 1's samples need twice the memory of rank 0's."""
    import json
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cuda = CachingAllocator(16 * GiB)
    prober = _prober(cuda, WideEngine(cuda, per_sample=1 + rank))
    found = {b: prober(b) for b in (2, 6)}  # rank 1 needs 2+3+12 GiB for 6: out of memory
    result = search(prober, 16 * GiB, max_micro=16)
    # a long probe whose deadline passes on rank 0 after 3 steps and on rank 1 after 5: both stop
    # after the 3rd (a rank stepping on alone would wait forever in a gradient collective)
    engine = prober.engine
    start = engine.steps
    prober.steps, prober.stop_at = 100, 3.0 + 2 * rank
    prober.clock = lambda: float(engine.steps - start)
    long = prober(1)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        peaks = {b: p.peak_bytes for b, p in found.items()}
        oom = {b: p.oom for b, p in found.items()}
        json.dump({"peaks": peaks, "oom": oom, "best": result.micro_batch, "steps": long.steps}, f)
    torch.distributed.destroy_process_group()


def test_every_rank_gets_the_largest_peak_and_any_rank_out_of_memory(tmp_path):
    """Ranks see different samples' memory (sequence lengths differ per rank): a micro-batch fits
    only if it fits on every rank, so each probe is the max over ranks and all ranks choose the
    same size."""
    import json

    from tests.engine.helpers import free_port

    torch.multiprocessing.spawn(_rank_probes, args=(int(free_port()), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["peaks"]["2"] == (2 + 3 + 2 * 2) * GiB  # rank 1's peak, on both
    assert ranks[0]["oom"] == {"2": False, "6": True}  # rank 0 alone fits 6
    assert ranks[0]["best"] == 5  # 2 + 3 + 2 × 5 = 15 GiB on rank 1: the most both fit
    assert ranks[0]["steps"] == 3  # both stopped at the first rank's deadline
