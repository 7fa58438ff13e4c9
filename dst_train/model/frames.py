"""Frame inputs of a sample: pixels (online path) or cached pooled vision features.

With a frozen vision tower, ``build_feature_cache`` runs it once over every frame a dataset uses
and stores the *pooled* outputs (before the trainable connector) in Arrow, fp16, one file per
frames file. Training then reads features instead of pixels and never runs the vision tower —
the output is the same as the online path up to fp16 rounding (tests/model/test_model.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dst_train.atomic_io import write_text_atomic
from dst_train.data.proassist import DataFormatError, FrameReader
from dst_train.ranks import Ranks


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` runs of a sorted-or-not index list, in order."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class FramePixels:
    """Reads frames lazily and turns them into ``(N, 3, S, S)`` uint8 pixel tensors (the
    processor's ``pixels``: sized, not normalized — the backbone normalizes on its device)."""

    def __init__(self, root: str | Path, image_processor):
        self.root = Path(root)
        self.processor = image_processor
        self._readers: dict[str, FrameReader] = {}

    def reader(self, frames_file: str) -> FrameReader:
        if frames_file not in self._readers:
            self._readers[frames_file] = FrameReader(self.root / frames_file)
        return self._readers[frames_file]

    def load(self, frames_file: str, frames: list[int]) -> torch.Tensor:
        reader = self.reader(frames_file)
        images = [img for a, b in _runs(frames) for img in reader.images(a, b)]
        return self.processor.pixels(images)


def cache_key(arch_config: dict, tokens_per_frame: int, image_size: int) -> str:
    """Features depend on the vision weights' architecture, k and the input size."""
    blob = json.dumps(
        {"vision": arch_config, "k": tokens_per_frame, "size": image_size}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FeatureCache:
    """Arrow files of pooled vision features: ``DIR/<frames_file>.arrow`` + ``DIR/cache.json``."""

    def __init__(self, cache_dir: str | Path, expect_key: str | None = None):
        from datasets import Dataset

        self.dir = Path(cache_dir)
        info_path = self.dir / "cache.json"
        if not info_path.is_file():
            raise DataFormatError(
                f"{self.dir}: not a feature cache (no cache.json); build one with "
                "`dst-train cache-features`"
            )
        self.info = read_index(info_path, "rebuild it with `dst-train cache-features`")
        if expect_key is not None and self.info["key"] != expect_key:
            raise DataFormatError(
                f"{self.dir}: feature cache was built for another model or "
                f"tokens_per_frame (key {self.info['key']} != {expect_key})"
            )
        self._Dataset = Dataset
        self._files: dict[str, object] = {}

    def load(self, frames_file: str, frames: list[int]) -> torch.Tensor:
        """``(N, P, Dv)`` fp16 features of ``frames``."""
        if frames_file not in self._files:
            path = self.dir / (frames_file + ".arrow")
            if not path.is_file():
                raise DataFormatError(f"{path}: no cached features for {frames_file}")
            self._files[frames_file] = self._Dataset.from_file(str(path)).with_format("numpy")
        ds = self._files[frames_file]
        parts = []
        for a, b in _runs(frames):
            if b > ds.num_rows:
                raise DataFormatError(
                    f"{self.dir / frames_file}.arrow: frames [{a}, {b}) past its {ds.num_rows} rows"
                )
            parts.append(np.asarray(ds[a:b]["features"], dtype=np.float16))
        if not parts:
            shape = self.info["shape"]
            return torch.zeros(0, *shape, dtype=torch.float16)
        return torch.from_numpy(np.concatenate(parts))


CACHE_INDEX = "cache.json"  # written last: its presence means the cache is complete
BUILDING = "building.json"  # the key of a build in progress (a rerun resumes it)


def build_feature_cache(
    backbone,
    root: str | Path,
    frames_files: list[str],
    out: str | Path,
    image_processor,
    key: str,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    ranks: Ranks | None = None,
) -> list[int]:
    """Run the vision tower + pooling over every frame of ``frames_files`` into ``out``; returns
    how many videos each of ``ranks`` computed (one process, or one per GPU: each takes every
    world-th video).

    Each video's file appears whole (written aside, then renamed), and ``cache.json`` last, once
    every video is there. A build cut short leaves ``building.json`` (the key) and the videos it
    finished: the same command computes only the others. A folder holding another key's
    features is refused (DataFormatError naming it)."""
    ranks = ranks or Ranks()
    out = Path(out)
    _check_cache_folder(out, key)  # every rank: each raises, none waits for the others
    ranks.barrier()
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / BUILDING, json.dumps({"key": key}))
        (out / CACHE_INDEX).unlink(missing_ok=True)  # complete again only when every video is
    ranks.barrier()
    source = FramePixels(root, image_processor)
    backbone.use_frame_processor(image_processor)
    videos = sorted(set(frames_files))
    todo = [f for f in ranks.share(videos) if not _cache_file(out, f).is_file()]
    for frames_file in tqdm(todo, desc="caching features", unit="video", disable=not ranks.main):
        path = _cache_file(out, frames_file)
        _cache_video(backbone, source, frames_file, path, batch_size, device)
    computed = ranks.gather(len(todo))
    if ranks.main:
        cached = (p for f in videos if (p := _cache_file(out, f)).is_file())  # not a 0-frame one
        shape = next(map(_cached_shape, cached), ())
        index = {"key": key, "shape": list(shape), "videos": len(videos)}
        write_text_atomic(out / CACHE_INDEX, json.dumps(index))
        (out / BUILDING).unlink()
    ranks.barrier()
    return computed


def _check_cache_folder(out: Path, key: str) -> None:
    """DataFormatError naming ``out`` if it holds (or was building) another key's features."""
    for name in (CACHE_INDEX, BUILDING):
        path = out / name
        if not path.is_file():
            continue
        found = read_index(path, "remove the folder or choose another --out")["key"]
        if found != key:
            raise DataFormatError(
                f"{out}: holds the features of another model or tokens_per_frame (key {found}, "
                f"this one's {key}, in {name}); remove it or choose another --out"
            )


def read_index(path: Path, remedy: str) -> dict:
    """``cache.json`` or ``building.json``: a JSON object with a ``key``; DataFormatError naming
    ``path`` (and saying ``remedy``) if it is not one (torn, edited by hand)."""
    try:
        index = json.loads(path.read_text())
        index["key"]  # raises unless an object with a key
    except (ValueError, TypeError, KeyError) as e:  # bad JSON, not an object, no key
        raise DataFormatError(
            f"{path}: not a feature cache's index ({type(e).__name__}: {e}); {remedy}"
        ) from None
    return index


def _cache_file(out: Path, frames_file: str) -> Path:
    return out / (frames_file + ".arrow")


@torch.no_grad()
def _cache_video(backbone, source, frames_file: str, path: Path, batch_size: int, device) -> None:
    """One video's pooled features (fp16) into ``path``, which appears only when complete."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.features import Array2D, Features

    reader = source.reader(frames_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".arrow.tmp")
    writer = None
    for a in range(0, len(reader), batch_size):
        px = source.load(frames_file, list(range(a, min(a + batch_size, len(reader)))))
        feats = backbone.frame_features(px.to(device)).to(torch.float16).cpu().numpy()
        if writer is None:
            features = Features({"features": Array2D(shape=feats.shape[1:], dtype="float16")})
            writer = ArrowWriter(path=str(tmp), features=features)
        for row in feats:
            writer.write({"features": row})
    if writer is not None:
        writer.finalize()
        writer.close()
        tmp.replace(path)  # a crash mid-file never leaves a truncated cache file


def _cached_shape(path: Path) -> tuple[int, ...]:
    """(P, Dv) of a cached video's features."""
    from datasets import Dataset

    return tuple(Dataset.from_file(str(path)).features["features"].shape)


def backbone_cache_key(backbone, image_size: int) -> str:
    return cache_key(backbone.cache_identity(), backbone.tokens_per_frame, image_size)


def cache_dataset_features(
    cfg, out: str | Path, batch_size: int = 64, ranks: Ranks | None = None
) -> list[int]:
    """Build the model of run config ``cfg`` and cache the features of every frames file its
    dataset uses (all prepared files under ``cfg.data.root``), each of ``ranks`` on its own GPU
    when there are GPUs; returns the videos each rank computed (``build_feature_cache``)."""
    from dst_train.data.dataset import DatasetPaths
    from dst_train.data.proassist import read_prepared
    from dst_train.model.backbone import load_image_processor
    from dst_train.model.build import build_model, resolve_precision

    if not cfg.model.freeze_vision:
        raise ValueError("a feature cache needs a frozen vision tower (model.freeze_vision=true)")
    ranks = ranks or Ranks()
    device = ranks.device("auto")
    model = build_model(cfg.model, cfg.head_config(), resolve_precision(cfg.model)).to(device)
    model.eval()
    processor = load_image_processor(cfg.model.arch)
    paths = DatasetPaths.from_root(cfg.data.root)
    files = [c.frames_file for p in paths.prepared for c in read_prepared(p)]
    key = backbone_cache_key(model.backbone, processor.image_size)
    return build_feature_cache(
        model.backbone, cfg.data.root, files, out, processor, key, batch_size, device, ranks
    )
