"""From a run config to a torch Dataset: clips → labels → samples → frames source."""

from __future__ import annotations

from pathlib import Path

from dst_train.data.collate import SampleDataset
from dst_train.data.dataset import DatasetPaths, dst_path, load_split
from dst_train.data.dst_tree import load_dst_tsv
from dst_train.data.sequence import Sample, SequenceBuilder


def build_samples(
    root: str | Path, split: str, builder: SequenceBuilder, span_policy: str = "repair"
) -> list[Sample]:
    paths = DatasetPaths.from_root(root)
    trees = {}
    samples = []
    for labels in load_split(root, split, span_policy):
        uid = labels.clip.video_uid
        if uid not in trees:
            tsv = dst_path(paths.dst_dir, uid) if paths.dst_dir else None
            trees[uid] = load_dst_tsv(tsv, span_policy) if tsv and tsv.is_file() else None
        samples += builder.build(labels, trees[uid])
    return samples


def make_dataset(
    cfg, split: str, tokenizer, backbone, image_processor, seed: int = 0
) -> SampleDataset:
    """The dataset of ``split`` for run config ``cfg``: pixels, or cached features when
    ``cfg.data.feature_cache`` is set (checked against the model it was built for). With pixels,
    ``backbone`` is set to normalize them as ``image_processor`` does (they travel in 8 bits)."""
    from dst_train.model.frames import FeatureCache, FramePixels, backbone_cache_key

    builder = SequenceBuilder(
        tokenizer,
        backbone.chat,
        backbone.image_token_id,
        backbone.tokens_per_frame,
        cfg.data.max_seq_len,
    )
    samples = build_samples(cfg.data.root, split, builder, cfg.data.span_policy)
    if cfg.data.feature_cache:
        key = backbone_cache_key(backbone, image_processor.image_size)
        source = FeatureCache(cfg.data.feature_cache, expect_key=key)
    else:
        source = FramePixels(cfg.data.root, image_processor)
        backbone.use_frame_processor(image_processor)
    keep = cfg.data.negative_frame_keep if split == cfg.data.train_split else 1.0
    return SampleDataset(samples, source, negative_frame_keep=keep, seed=seed)
