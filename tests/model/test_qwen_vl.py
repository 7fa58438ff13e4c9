"""The Qwen2.5-VL backbone against Qwen's own code: the patch layout of its image processor, the
tokens of its vision tower, pooling to k tokens, and the shipped 3B/7B shapes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dst_train.config import ModelConfig
from dst_train.model.backbone import arch_config, load_hf_model, make_backbone
from dst_train.model.info import model_info
from dst_train.model.qwen_vl import QwenFrames


@pytest.fixture(scope="module")
def hf(tiny_qwen_dir):
    return load_hf_model(str(tiny_qwen_dir), True, torch.float32, "sdpa").eval()


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    return QwenFrames(64)(images), images


def test_patches_equal_qwens_own_image_processor(hf, frames, tiny_qwen_dir):
    """Same frames through Qwen's processor, configured by the model folder's own
    preprocessor_config.json (fixed size: min = max pixels; the tiny tower's 8-px patches), and
    ours."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    pixels, images = frames
    grey = Image.fromarray(np.asarray(images[0])[..., 0], mode="L")  # converted to RGB by both
    images, pixels = [*images, grey], torch.cat([pixels, QwenFrames(64)([grey])])
    reference = Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen_dir)(
        images=images, return_tensors="pt"
    )
    patches, grid = make_backbone(hf, 1).patches(pixels)
    assert torch.equal(grid, reference["image_grid_thw"])
    torch.testing.assert_close(patches, reference["pixel_values"])


@torch.no_grad()
def test_native_k_gives_the_vision_towers_own_tokens(hf, frames):
    """k = (G/2)² pools nothing: our tower-then-merger split, with the windows undone, gives
    exactly what ``model.visual`` returns (the tiny tower's windows hold 2×2 merge blocks, so
    window order is not row-major order)."""
    pixels, _ = frames
    backbone = make_backbone(hf, tokens_per_frame=16)
    ours = backbone.project_frames(backbone.frame_features(pixels))  # (3, 16, H)
    patches, grid = backbone.patches(pixels)
    theirs = hf.model.visual(hidden_states=patches, grid_thw=grid).pooler_output
    assert ours.shape == (3, 16, backbone.hidden_size)
    assert backbone.shape().merge == 2  # the autotuner's feature-cache estimate: 4k patches
    torch.testing.assert_close(ours.reshape(-1, ours.shape[-1]), theirs)


@torch.no_grad()
def test_pooled_patches_are_means_of_the_merge_blocks(hf, frames):
    """k = 4 on an 8×8 patch grid: pooled patch (r, c) is the mean of the 2×2 patches of native
    merge block (r, c); the merger then gets 2×2 blocks of pooled patches, in order."""
    pixels, _ = frames
    native = make_backbone(hf, 16).frame_features(pixels)  # (3, 16 blocks × 4 patches, D)
    d = native.shape[-1]
    means = native.view(3, 4, 4, 4, d).mean(3)  # (3, block row, block col, D)
    pooled = make_backbone(hf, 4).frame_features(pixels).view(3, 2, 2, 2, 2, d)
    for i, j, a, b in np.ndindex(2, 2, 2, 2):
        torch.testing.assert_close(pooled[:, i, j, a, b], means[:, 2 * i + a, 2 * j + b])
    assert (
        make_backbone(hf, 1).project_frames(make_backbone(hf, 1).frame_features(pixels)).shape[1]
        == 1
    )


def test_frame_processor_round_trips_through_its_folder(tmp_path):
    QwenFrames(336, patch_size=8).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert raw["min_pixels"] == raw["max_pixels"] == 336 * 336  # what Qwen's processor reads
    from dst_train.model.qwen_vl import load_frame_processor

    assert load_frame_processor(str(tmp_path)).image_size == 336
    assert load_frame_processor(str(tmp_path)).tower["patch_size"] == raw["patch_size"] == 8
    (tmp_path / "bare").mkdir()
    assert load_frame_processor(str(tmp_path / "bare")).image_size == 448  # the default


@pytest.mark.parametrize(
    "arch, total, hidden",
    [("qwen2.5-vl-3b", 3_754_622_976, 2048), ("qwen2.5-vl-7b", 8_292_166_656, 3584)],
)
def test_shipped_configs_have_the_published_sizes(arch, total, hidden):
    """Parameter counts of the hub models (3.75B and 8.29B on their model pages); our heads add
    two linear layers of H + 1."""
    info = model_info(ModelConfig(arch=arch, pretrained=False))
    counts = info["parameters"]
    assert counts["all"]["total"] - counts["heads"]["total"] == total
    assert counts["heads"]["total"] == 2 * (hidden + 1)
    assert info["family"] == "qwen2_5_vl" and info["native_tokens_per_image"] == 256
    assert arch_config(arch).image_token_id == 151655


def test_model_info_for_the_7b_works_offline_as_json(capsys):
    from dst_train.cli import main

    assert main(["model-info", "--arch", "qwen2.5-vl-7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["strategy"]: r for r in info["memory"]}
    assert info["lm_hidden"] == 3584 and info["vocab_size"] == 152064
    # full fine-tune of 8.3B: ZeRO-2 on 2 GPUs does not fit 24 GB; ZeRO-3 + offload does
    assert rows["zero2"]["gpu_gib"] > 24 and rows["zero3+offload"]["gpu_gib"] < 4
