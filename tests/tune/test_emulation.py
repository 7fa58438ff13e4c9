"""Emulating the target card: the allocator gets what the card leaves after the CUDA context,
Turing kernels only when asked, the tuned config keeps the precision the target runs, and the
cache key holds everything that changes memory."""

import sys
import time
from types import SimpleNamespace

import pytest
import torch

from dst_train.config import load_config
from dst_train.tune.autotune import (
    apply_emulation,
    cache_key,
    emulate_target,
    measure_context,
    source_digest,
    tuned_config,
)
from dst_train.tune.memory import DEFAULT_CONTEXT_BYTES, nvml_process_bytes, outside_allocator

GiB = 2**30


class FakeCuda:
    """The part of ``torch.cuda`` emulation uses: a card of ``total`` bytes."""

    def __init__(self, total: int):
        self.total, self.share = total, None

    def is_available(self):
        return True

    def init(self):
        pass

    def get_device_properties(self, i):
        return SimpleNamespace(total_memory=self.total)

    def set_per_process_memory_fraction(self, share, i):
        self.share = share

    def memory_reserved(self, i):
        return 0


def test_the_allocator_gets_the_card_less_its_context():
    cuda = FakeCuda(80 * GiB)  # an 80 GB card planning for a 24 GB one
    done = emulate_target(24 * GiB, 0, cuda=cuda, context=(GiB // 4, "nvml"))
    assert cuda.share * cuda.total == 24 * GiB - GiB // 4
    assert done["context_bytes"] == GiB // 4 and done["context_source"] == "nvml"
    assert "dtype" not in done  # no Turing kernels unless asked


def test_without_nvml_the_documented_default_context_is_taken_off():
    cuda = FakeCuda(80 * GiB)
    assert measure_context(0, cuda) == (DEFAULT_CONTEXT_BYTES, "default")
    emulate_target(24 * GiB, 0, cuda=cuda)
    assert cuda.share * cuda.total == 24 * GiB - DEFAULT_CONTEXT_BYTES
    assert DEFAULT_CONTEXT_BYTES == GiB // 2  # the 0.5 GiB docs/autotune.md gives


def test_a_card_no_bigger_than_the_target_is_not_capped():
    cuda = FakeCuda(24 * GiB)
    done = emulate_target(24 * GiB, 0, cuda=cuda, context=(GiB // 2, "nvml"))
    assert cuda.share is None and "allocator_share" not in done


def test_turing_kernels_only_on_request_and_the_tuned_config_keeps_the_targets_precision():
    cfg = load_config(None, ["model.arch=smolvlm2-2.2b"])
    assert cfg.model.dtype == "auto"
    report = {"micro_batch": 4, "grad_accum": 2, "global_batch": 8}
    # an A100-class target (40 GB) on a bigger card: probes and tuned.yaml keep `auto`
    plain = emulate_target(40 * GiB, 0, cuda=FakeCuda(80 * GiB), context=(0, "nvml"))
    probe = load_config(None, ["model.arch=smolvlm2-2.2b"])
    apply_emulation(probe, plain)
    assert probe.model.dtype == "auto"
    tuned = tuned_config(cfg, {**report, "emulated": plain})
    assert (tuned.model.dtype, tuned.model.attention) == (cfg.model.dtype, cfg.model.attention)
    # a Titan RTX: fp16 + SDPA in the probes and in tuned.yaml (all a Turing card runs)
    turing = emulate_target(24 * GiB, 0, turing=True, cuda=FakeCuda(80 * GiB), context=(0, "x"))
    apply_emulation(probe, turing)
    assert (probe.model.dtype, probe.model.attention) == ("fp16", "sdpa")
    tuned = tuned_config(cfg, {**report, "emulated": turing})
    assert (tuned.model.dtype, tuned.model.attention) == ("fp16", "sdpa")
    assert (tuned.train.micro_batch_size, tuned.train.grad_accum) == (4, 2)
    assert cfg.model.dtype == "auto"  # the caller's config is untouched


@pytest.fixture(autouse=True)
def sdpa_flags():
    """SDPA's backend switches (process-wide; Turing emulation turns two off), restored after
    each test: the CPU's SDPA reads them too."""
    b = torch.backends.cuda
    saved = (b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.mem_efficient_sdp_enabled())
    yield b
    b.enable_flash_sdp(saved[0])
    b.enable_cudnn_sdp(saved[1])
    b.enable_mem_efficient_sdp(saved[2])


def test_an_emulated_turing_card_runs_the_attention_kernels_a_turing_card_has(sdpa_flags):
    # sm75 has neither PyTorch's FlashAttention nor cuDNN attention: SDPA runs the memory-efficient
    # kernel there, whose buffers differ, so a bigger card's probes must not pick the others
    b = sdpa_flags
    emulate_target(40 * GiB, 0, cuda=FakeCuda(80 * GiB), context=(0, "nvml"))
    assert b.flash_sdp_enabled() and b.cudnn_sdp_enabled()  # not asked: untouched
    done = emulate_target(24 * GiB, 0, turing=True, cuda=FakeCuda(80 * GiB), context=(0, "x"))
    assert not b.flash_sdp_enabled() and not b.cudnn_sdp_enabled()
    assert b.mem_efficient_sdp_enabled() and b.math_sdp_enabled()
    assert done["sdpa_backends"] == ["mem_efficient", "math"]


def test_the_cache_key_holds_every_memory_option():
    def key(*overrides, emulated=None, global_batch=8):
        cfg = load_config(None, ["model.arch=smolvlm2-2.2b", *overrides])
        return cache_key(cfg, 24, 0.9, 2, global_batch, emulated)

    base = key()
    assert key() == base
    assert key(global_batch=16) != base
    assert key("data.negative_frame_keep=0.5") != base  # frames per sample
    assert key("data.max_seq_len=2048") != base
    assert key("train.ds_config=ds_configs/zero3.json") != base
    assert key("model.gradient_checkpointing=true") != base
    assert key(emulated={"dtype": "fp16", "attention": "sdpa"}) != base
    # the measured context varies from run to run by a few MB: not part of the key
    assert key(emulated={"context_bytes": 1}) == key(emulated={"context_bytes": 2})


def test_the_cache_key_changes_with_dst_trains_own_code(tmp_path, monkeypatch):
    """A tuning cached before a change to our step (8-bit frames changed every peak) is not
    reused: the key holds a digest of the package's sources, not its unchanged version."""
    import dst_train.tune.autotune as autotune

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "frames.py").write_text("PIXEL_BYTES = 4\n")
    (tmp_path / "README.md").write_text("not code")
    before = source_digest(tmp_path)
    assert source_digest(tmp_path) == before
    (tmp_path / "README.md").write_text("still not code")
    assert source_digest(tmp_path) == before
    (tmp_path / "model" / "frames.py").write_text("PIXEL_BYTES = 1\n")
    assert source_digest(tmp_path) != before
    assert len(source_digest()) == 16  # the installed package's
    cfg = load_config(None, ["model.arch=smolvlm2-2.2b"])
    old = cache_key(cfg, 24, 0.9, 2, 8)
    monkeypatch.setattr(autotune, "source_digest", lambda: "changed")
    assert cache_key(cfg, 24, 0.9, 2, 8) != old


def test_a_peak_without_nvml_still_counts_a_context():
    # NVML's count beyond the allocator's reservation; the documented default when NVML has none
    assert outside_allocator(3 * GiB, 2 * GiB) == (GiB, "nvml")
    assert outside_allocator(GiB, 2 * GiB) == (0, "nvml")
    assert outside_allocator(None, 2 * GiB) == (DEFAULT_CONTEXT_BYTES, "default")


def test_nvml_counts_this_process_only(monkeypatch):
    # NVML lists every process on the GPU (the other rank of a 2-GPU box, a desktop): the context
    # is this process's entry; none (a container hiding the list, no NVML) reads as unknown
    import os

    listed = []
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: listed,
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    entry = lambda pid, used: SimpleNamespace(pid=pid, usedGpuMemory=used)  # noqa: E731
    listed += [entry(os.getpid() + 1, 5 * GiB), entry(os.getpid(), GiB), entry(1, 2 * GiB)]
    assert nvml_process_bytes(0) == GiB
    listed[1] = entry(os.getpid(), None)  # NVML without the process's usage
    assert nvml_process_bytes(0) is None
    del listed[1]
    assert nvml_process_bytes(0) is None
    nvml.nvmlInit = lambda: 1 / 0  # NVML itself failing is never a reason to fail
    assert nvml_process_bytes(0) is None


def _stand_in_for_cuda_memory(monkeypatch, reserved_peak, reserved, allocated_peak):
    """torch.cuda's memory calls as PeakMemory makes them, without a GPU (sizes in GiB)."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    reads = {
        "max_memory_reserved": reserved_peak,
        "memory_reserved": reserved,
        "max_memory_allocated": allocated_peak,
    }
    for name, gib in reads.items():
        monkeypatch.setattr(torch.cuda, name, lambda d, gib=gib: gib * GiB)


def test_a_gpu_peak_is_the_reserved_peak_plus_what_nvml_sees_beyond_it_on_that_gpu(monkeypatch):
    # the CUDA path of PeakMemory, with torch.cuda's memory calls stood in for (no GPU here)
    from dst_train.tune import memory

    asked = []
    monkeypatch.setattr(memory, "nvml_process_bytes", lambda i: asked.append(i) or 5 * GiB)
    _stand_in_for_cuda_memory(monkeypatch, reserved_peak=4, reserved=3, allocated_peak=2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    with memory.PeakMemory(torch.device("cuda", 2)) as m:
        pass
    assert m.peak_bytes == 4 * GiB + (5 - 3) * GiB and m.detail["outside_source"] == "nvml"
    for device in (torch.device("cuda", 0), torch.device("cuda")):  # no index: the current GPU
        with memory.PeakMemory(device):
            pass
    assert asked == [2, 0, 3]


def test_the_cpu_peak_catches_memory_freed_before_the_block_ends():
    # the probe's peak on CPU is sampled by a thread: a buffer freed before the block ends (an
    # activation) must still count. Fresh anonymous pages: memory the allocator kept from
    # earlier tests would not raise the RSS.
    import mmap

    import numpy as np

    from dst_train.tune import memory

    size = 256 * 2**20
    with memory.PeakMemory(torch.device("cpu")) as m:
        start = m._rss
        pages = mmap.mmap(-1, size)
        view = np.frombuffer(pages, dtype=np.uint8)
        view[:] = 1  # every page written, so resident
        time.sleep(0.2)  # ~100 sampling intervals
        del view
        pages.close()
    assert m.peak_bytes - start > 200 * 2**20 and m.detail == {"rss_peak": m.peak_bytes}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_error_inside_a_measured_block_is_raised_not_swallowed(monkeypatch, device):
    # an OOM inside a probe must reach the search, which reads it as "does not fit"
    from dst_train.tune import memory

    _stand_in_for_cuda_memory(monkeypatch, reserved_peak=1, reserved=1, allocated_peak=1)
    monkeypatch.setattr(memory, "nvml_process_bytes", lambda i: None)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        with memory.PeakMemory(
            torch.device(device, 0) if device == "cuda" else torch.device(device)
        ):
            raise torch.OutOfMemoryError("simulated")
