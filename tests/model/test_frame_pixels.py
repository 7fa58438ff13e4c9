"""Frames travel as 8-bit pixels and are normalized by the model, on its device.

A frame reader (``FramePixels``) hands out ``(N, 3, S, S)`` uint8 pixels — a quarter of the bytes
of the fp32 pixels the family's processor makes — and the backbone maps them through a per-channel
table of what that processor makes of each 8-bit value. So the vision tower sees exactly the
processor's pixels (bit for bit), however a frame was sized, and no fp32 copy of a batch's frames
is made on the host, moved to the GPU or held there for the whole step.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from dst_train.model.backbone import (
    load_hf_model,
    load_image_processor,
    make_backbone,
    normalize_pixels,
    pixel_table,
)
from dst_train.model.frames import FramePixels


def _frames(size: int, n: int = 3) -> list:
    """RGB frames of ``size``² with every 8-bit value in every channel, plus noise."""
    rng = np.random.default_rng(0)
    ramp = (np.arange(size * size) % 256).reshape(size, size).astype(np.uint8)
    first = np.stack([ramp, ramp[::-1], ramp.T], axis=-1)
    rest = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n - 1)]
    return [Image.fromarray(a) for a in (first, *rest)]


def _odd_frames(size: int) -> list:
    """Frames the processor must resize or convert: not square, smaller, larger, grey, RGBA."""
    rng = np.random.default_rng(1)
    shapes = [(size // 2, size + 7, 3), (size * 2, size, 3), (size - 5, size - 5, 3)]
    images = [Image.fromarray(rng.integers(0, 256, s, dtype=np.uint8)) for s in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L"))
    images.append(Image.fromarray(rng.integers(0, 256, (size, size, 4), dtype=np.uint8)))
    return [im.convert("RGB") if k < 3 else im for k, im in enumerate(images)]


@pytest.mark.parametrize("odd", [False, True], ids=["frame-size", "resized"])
def test_pixels_through_the_table_equal_the_processor_bit_for_bit(tiny_family_dir, odd):
    proc = load_image_processor(str(tiny_family_dir))
    s = proc.image_size
    images = _odd_frames(s) if odd else _frames(s)
    pixels = proc.pixels(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(images), 3, s, s)
    reference = proc(images)  # the family's own float pipeline
    assert torch.equal(normalize_pixels(pixels, pixel_table(proc)), reference)
    assert proc.pixels([]).shape == proc([]).shape == (0, 3, s, s)  # N may be 0


def test_a_hub_smolvlm_processor_gives_the_whole_frame_not_a_tile(tmp_path):
    """SmolVLM2's published processors split an image into tiles (``do_image_splitting``, size
    4 × the tower's input) plus a global view; a frame is one image of the tower's size, the
    whole of it (a tile would show the frame's corner)."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    from dst_train.model.smolvlm import load_frame_processor

    s = 32
    hub = SmolVLMImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 4 * s}, max_image_size={"longest_edge": s}
    )
    hub.save_pretrained(tmp_path)
    proc = load_frame_processor(str(tmp_path))
    frame = np.zeros((s, 2 * s, 3), np.uint8)
    frame[:, :s] = (255, 0, 0)  # left half red, right half blue
    frame[:, s:] = (0, 0, 255)
    for pixels in (proc.pixels([Image.fromarray(frame)]), proc([Image.fromarray(frame)])):
        assert pixels.shape == (1, 3, s, s)
        left, right = pixels[0, :, s // 2, 1], pixels[0, :, s // 2, s - 2]
        assert left[0] > left[2] and right[2] > right[0]  # both halves, squeezed into one


def test_the_table_follows_the_processors_mean_and_std(tiny_model_dir):
    proc = load_image_processor(str(tiny_model_dir))
    proc.processor.image_mean, proc.processor.image_std = [0.1, 0.2, 0.3], [0.9, 0.8, 0.7]
    table = pixel_table(proc)
    torch.testing.assert_close(table[:, 0], torch.tensor([-0.1 / 0.9, -0.2 / 0.8, -0.3 / 0.7]))
    torch.testing.assert_close(table[:, 255], torch.tensor([0.9 / 0.9, 0.8 / 0.8, 0.7 / 0.7]))


@torch.no_grad()
def test_the_model_normalizes_8bit_frames_as_the_processor_does(tiny_family_dir):
    proc = load_image_processor(str(tiny_family_dir))
    hf = load_hf_model(str(tiny_family_dir), True, torch.float32, "sdpa").eval()
    backbone = make_backbone(hf, 1, vision_chunk=2)  # chunks: 3 frames make 2 tower calls
    images = _frames(proc.image_size)
    expected = backbone.frame_features(proc(images))
    assert torch.equal(backbone.frame_features(proc.pixels(images)), expected)
    # a folder whose processor normalizes otherwise: the backbone adopts that processor
    other = load_image_processor(str(tiny_family_dir))
    _set_mean_std(other, [0.1, 0.2, 0.3], [0.9, 0.8, 0.7])
    backbone.use_frame_processor(other)
    theirs = backbone.frame_features(other.pixels(images))
    assert torch.equal(theirs, backbone.frame_features(other(images)))
    assert not torch.equal(theirs, expected)


def _set_mean_std(proc, mean, std) -> None:
    if hasattr(proc, "processor"):  # SmolVLM: the transformers processor inside
        proc.processor.image_mean, proc.processor.image_std = mean, std
    else:  # Qwen: our own
        proc.mean, proc.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)


def test_frame_reader_hands_out_8bit_pixels(demo_root, tiny_model_dir):
    from dst_train.data.dataset import load_split

    clip = load_split(demo_root, "train")[0].clip
    proc = load_image_processor(str(tiny_model_dir))
    pixels = FramePixels(demo_root, proc).load(clip.frames_file, [0, 1, 2, 5])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 32, 32)
    # frames come back in the order asked, read in contiguous runs whatever that order is
    shuffled = FramePixels(demo_root, proc).load(clip.frames_file, [5, 0, 1, 2, 1])
    assert torch.equal(shuffled, pixels[[3, 0, 1, 2, 1]])


def test_a_frame_of_16_pixels_holds_the_256_values_and_one_of_15_is_named():
    from types import SimpleNamespace

    from dst_train.model.smolvlm import frame_processor

    def sized(s):
        return frame_processor(SimpleNamespace(vision_config=SimpleNamespace(image_size=s)))

    table = pixel_table(sized(16))  # exactly 256 positions
    assert table.shape == (3, 256) and torch.equal(table, pixel_table(sized(32)))
    with pytest.raises(ValueError, match="frame size 15: too small to hold the 256 pixel values"):
        pixel_table(sized(15))


def test_a_processor_that_changes_a_frame_of_its_own_size_is_named(tiny_model_dir):
    # the table is read off a frame of the processor's own size, which pixels() must take as it
    # is; one that crops or filters it would give a table of other values
    proc = load_image_processor(str(tiny_model_dir))
    s = proc.image_size
    proc.pixels = lambda images: torch.zeros(len(images), 3, s, s, dtype=torch.uint8)
    with pytest.raises(ValueError, match="SmolVLMFrames changes a frame of its own size"):
        pixel_table(proc)
