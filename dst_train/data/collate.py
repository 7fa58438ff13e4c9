"""Batches: a torch Dataset over built samples, dynamic padding, length-grouped sampling.

A batch is a dict of tensors (B = micro-batch, T = longest sequence, D = frames in the batch)::

    input_ids (B, T)  attention_mask (B, T)  targets (B, T)  target_kind (B, T)
    decision_index (D, 2) — (row, position) of each frame's last token, in frame order
    speak (D,)  update (D,)  speak_weight (D,)  update_weight (D,)
    pixel_values (D, 3, S, S) uint8  or  frame_features (D, P, Dv) fp16

Frames are listed row-major (row 0's frames, then row 1's), which is the order of the image tokens
in ``input_ids`` — the model scatters frame embeddings into image-token slots in that order.
"""

from __future__ import annotations

import copy
import itertools
import random

import torch
from torch.utils.data import Dataset

from dst_train.data.sequence import IGNORE, Sample


class SampleDataset(Dataset):
    """Samples + where their frames come from (``FramePixels`` or ``FeatureCache``)."""

    def __init__(
        self,
        samples: list[Sample],
        frame_source,
        negative_frame_keep: float = 1.0,
        seed: int = 0,
    ):
        self.samples = samples
        self.source = frame_source
        self.keep = negative_frame_keep
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]

    def num_frames(self, i: int) -> int:
        return len(self.samples[i].frames)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        frames = self.source.load(s.frames_file, s.frames)
        rng = random.Random(hash((self.seed, self.epoch, i)))
        return {
            "sample": s,
            "frames": frames,
            "speak_weight": self._weights(s.speak, rng),
            "update_weight": self._weights(s.update, rng),
        }

    def _weights(self, labels: list[int], rng: random.Random) -> list[float]:
        """1 for positives; negatives kept with probability ``keep`` (ProAssist kept 10 %); 0
        where the label is unknown (-1, no DST annotation)."""
        return [
            0.0 if y < 0 else 1.0 if y == 1 or self.keep >= 1.0 or rng.random() < self.keep else 0.0
            for y in labels
        ]


def _stack_frames(parts: list[torch.Tensor], device: torch.device | None) -> torch.Tensor:
    """``torch.cat(parts)``, made on ``device`` when one is given: each sample's frames are
    copied into their slice of one tensor there. On a GPU this skips the host-side tensor — a
    fresh 0.43 GB of 8-bit pixels per step at micro-batch 14 × ~70 frames of 384 px (1.7 GB when
    they were fp32, whose page faults cost 2.4 s on the development machine, 0.12 s into a reused
    buffer) — and its second copy."""
    if device is None:
        return torch.cat(parts)
    first = parts[0]
    out = torch.empty(
        (sum(len(p) for p in parts), *first.shape[1:]), dtype=first.dtype, device=device
    )
    start = 0
    for p in parts:
        out[start : start + len(p)].copy_(p, non_blocking=True)  # pageable: safe to reuse after
        start += len(p)
    return out


def make_collate(pad_id: int, features: bool, frames_device: torch.device | None = None):
    """Collate for ``SampleDataset`` items; ``frames_device`` assembles the frames there (the
    training step's device) instead of on the host."""

    def collate(items: list[dict]) -> dict:
        width = max(len(it["sample"]) for it in items)
        batch = {
            k: torch.full((len(items), width), v, dtype=torch.long)
            for k, v in (
                ("input_ids", pad_id),
                ("attention_mask", 0),
                ("targets", IGNORE),
                ("target_kind", 0),
            )
        }
        dec, speak, update, sw, uw = [], [], [], [], []
        for row, it in enumerate(items):
            s = it["sample"]
            n = len(s)
            batch["input_ids"][row, :n] = torch.tensor(s.input_ids)
            batch["attention_mask"][row, :n] = 1
            batch["targets"][row, :n] = torch.tensor(s.targets)
            batch["target_kind"][row, :n] = torch.tensor(s.target_kind)
            dec += [(row, p) for p in s.decision_pos]
            speak += s.speak
            update += s.update
            sw += it["speak_weight"]
            uw += it["update_weight"]
        batch["decision_index"] = torch.tensor(dec, dtype=torch.long).view(-1, 2)
        batch["speak"] = torch.tensor(speak, dtype=torch.long)
        batch["update"] = torch.tensor(update, dtype=torch.long).clamp(min=0)
        batch["speak_weight"] = torch.tensor(sw)
        batch["update_weight"] = torch.tensor(uw)
        frames = _stack_frames([it["frames"] for it in items], frames_device)
        batch["frame_features" if features else "pixel_values"] = frames
        return batch

    return collate


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batch sampler (``DataLoader(batch_sampler=...)``): shuffled micro-batches of similar
    length, split across data-parallel ranks.

    Indices are shuffled per epoch, cut into windows of ``group`` micro-batches, sorted by length
    inside a window (less padding), cut into micro-batches, and the batches shuffled again. Every
    rank gets the same number of batches (the tail is wrapped), so no rank waits on a collective.
    ``skip`` batches are dropped from the start: the data position on resume.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        group: int = 50,
    ):
        self.lengths = lengths
        self.batch_size = batch_size
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.group = group
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self) -> list[list[int]]:
        out = self._all_batches()
        per_rank = -(-len(out) // self.world)  # ceil
        out += out[: per_rank * self.world - len(out)]  # wrap so all ranks step together
        return out[self.rank :: self.world]

    def _all_batches(self) -> list[list[int]]:
        """Every rank's batches of the epoch, shuffled, before the split between ranks."""
        rng = random.Random(self.seed * 100003 + self.epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        window = self.batch_size * self.group
        out = []
        for w in range(0, len(idx), window):
            chunk = sorted(idx[w : w + window], key=lambda i: self.lengths[i])
            out += [chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        return out

    def __iter__(self):
        yield from self.batches()[self.skip :]

    def __len__(self) -> int:
        return len(self.batches()) - self.skip

    def first_visits(self) -> int:
        """How many of this rank's batches of the epoch (from its first) are not the wrap's
        repeats: a mean over the split (the val loss) counts only those."""
        return len(range(self.rank, len(self._all_batches()), self.world))


class SampleOrder(torch.utils.data.Sampler):
    """A batch sampler's batches flattened into ``(epoch, sample index)`` keys, epoch after epoch
    from ``start(epoch, skip)``, without end. A DataLoader over it hands each sample to the next
    free worker, so one micro-batch's frames are decoded by all workers at once (handed the batch
    sampler itself, a loader gives a whole micro-batch to one worker: at 14 samples × ~70 frames
    and ~40 frames/s per core, ~25 s for a batch). One loader iterator then serves the whole
    run: its workers read the next epoch's first samples while the last batches of this one
    train, where an iterator per epoch restarted them and the epoch's first batch waited on a
    cold pipeline. The keys carry the epoch because every worker holds its own copy of the
    dataset (``EpochItems``)."""

    def __init__(self, batch_sampler):
        self.batches = copy.copy(batch_sampler)  # its own: the training loop walks the original
        self.epoch = self.skip = 0

    def start(self, epoch: int, skip: int) -> None:
        """Where the next iterator starts: ``skip`` batches into ``epoch``."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        for epoch in itertools.count(self.epoch):
            self.batches.set_epoch(epoch, self.skip if epoch == self.epoch else 0)
            for batch in self.batches:
                yield from ((epoch, i) for i in batch)


class EpochItems(torch.utils.data.Dataset):
    """``dataset`` read by ``SampleOrder``'s ``(epoch, index)`` keys: its ``epoch`` (which the
    negative-frame subsampling draws from) is set to the key's before each read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        self.dataset.epoch = epoch
        return self.dataset[i]
