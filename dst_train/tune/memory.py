"""Peak memory of a block of work: the CUDA allocator's peaks plus what NVML sees outside them
(CUDA context, NCCL buffers), or the process RSS on CPU (sampled by a thread)."""

from __future__ import annotations

import os
import threading
import time

import torch

# CUDA context (driver, kernels, cuBLAS workspace) a process holds outside PyTorch's allocator,
# used when NVML cannot say (no NVML, or a container hiding the process list). Order of size
# of a torch 2.x process on a recent driver; the measured value is used whenever there is one.
DEFAULT_CONTEXT_BYTES = 2**29


def outside_allocator(nvml: int | None, reserved_now: int) -> tuple[int, str]:
    """(bytes the process holds on the GPU beyond the allocator's reservation, source): NVML's
    count less the reservation, or :data:`DEFAULT_CONTEXT_BYTES` when NVML has none."""
    if nvml:
        return max(0, nvml - reserved_now), "nvml"
    return DEFAULT_CONTEXT_BYTES, "default"


def nvml_process_bytes(device_index: int) -> int | None:
    """GPU memory NVML attributes to this process (None when NVML or the process entry is
    missing, e.g. inside some containers)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory)
    except Exception:  # noqa: BLE001 — NVML is an extra source, never a reason to fail
        return None
    return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (and the parts in
    ``m.detail``). GPU: ``max_memory_reserved`` + (NVML process usage − reserved now), so the
    context and communication buffers count. CPU: peak RSS sampled every ``interval`` s.

    On entry the caching allocator's free blocks are released before the peak is reset:
    ``reset_peak_memory_stats`` restarts the peak at the current *reservation*, so without the
    release a block cached by earlier work (a bigger probe) would read as this block's peak.
    ``cuda`` is the memory API (``torch.cuda``; tests pass a simulated caching allocator)."""

    def __init__(self, device: torch.device, interval: float = 0.002, cuda=None):
        self.device = device
        self.interval = interval
        self.cuda = cuda if cuda is not None else (torch.cuda if device.type == "cuda" else None)
        self.peak_bytes = 0
        self.detail: dict = {}

    def __enter__(self):
        if self.cuda is not None:
            import gc

            gc.collect()  # tensors of earlier work that only a cycle still holds
            self.cuda.synchronize(self.device)
            self.cuda.empty_cache()
            self.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            self._proc = psutil.Process()
            self._stop = threading.Event()
            self._rss = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._rss = max(self._rss, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.cuda is not None:
            cuda = self.cuda
            cuda.synchronize(self.device)
            reserved_peak = cuda.max_memory_reserved(self.device)
            outside, source = 0, "none"  # a simulated allocator (tests) has no context
            if cuda is torch.cuda:
                index = self.device.index
                nvml = nvml_process_bytes(cuda.current_device() if index is None else index)
                outside, source = outside_allocator(nvml, cuda.memory_reserved(self.device))
            self.peak_bytes = reserved_peak + outside
            self.detail = {
                "allocated_peak": cuda.max_memory_allocated(self.device),
                "reserved_peak": reserved_peak,
                "outside_allocator": outside,
                "outside_source": source,
            }
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._rss
            self.detail = {"rss_peak": self._rss}
        return False
