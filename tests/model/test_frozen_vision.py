"""A frozen vision tower keeps no activations for backward, whatever hooks are on (issue 14.1).

On the smolvlm2-256m architecture (random init, real transformers classes) with gradient
checkpointing on, transformers' ``enable_input_require_grads`` hooks the tower's patch
embeddings; the tower used to keep ~56 MiB per frame for a backward that changes nothing in it.
Bytes saved for backward are counted with saved-tensor hooks."""

import pytest
import torch

from dst_train.config import ModelConfig
from dst_train.model.build import Precision, build_model
from dst_train.model.dst_model import HeadConfig

MIB = 2**20


def _model(checkpointing: bool, **kw):
    torch.manual_seed(0)
    mcfg = ModelConfig(
        arch="smolvlm2-256m",
        pretrained=False,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_reentrant=True,  # the mode that adds enable_input_require_grads
        **kw,
    )
    return build_model(mcfg, HeadConfig(tokens_per_frame=1), Precision("fp32", "sdpa"))


def _saved_bytes_and_grads(model, pixels):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.frame_embeddings(pixel_values=pixels)
    out.float().pow(2).sum().backward()
    connector = model.backbone.hf.model.connector
    grads = {n: p.grad.clone() for n, p in connector.named_parameters()}
    return sum(saved), grads


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(1, 3, 512, 512)  # a frame at the 256M tower's 512 px


def test_frozen_tower_saves_nothing_with_checkpointing_on(pixels):
    base_bytes, base_grads = _saved_bytes_and_grads(_model(False), pixels)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(_model(True), pixels)
    per_frame = ckpt_bytes / len(pixels) / MIB
    assert base_bytes / len(pixels) / MIB < 1.0  # the connector's input only
    assert per_frame < 1.0, f"{per_frame:.1f} MiB saved per frame through a frozen tower"
    for n in base_grads:  # the trainable part learns the same
        torch.testing.assert_close(ckpt_grads[n], base_grads[n], msg=n)


def test_a_trained_tower_still_gets_gradients_and_chunks_change_nothing(tiny_model_dir):
    def tiny(chunk):
        torch.manual_seed(0)
        mcfg = ModelConfig(arch=str(tiny_model_dir), freeze_vision=False, vision_chunk_frames=chunk)
        return build_model(mcfg, HeadConfig(tokens_per_frame=1), Precision("fp32", "sdpa"))

    whole, chunked = tiny(0), tiny(2)
    size = whole.backbone.hf.config.vision_config.image_size
    pixels = torch.randn(5, 3, size, size)  # 5 frames: chunks of 2, 2 and 1
    a = whole.frame_embeddings(pixel_values=pixels)
    b = chunked.frame_embeddings(pixel_values=pixels)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    b.float().pow(2).sum().backward()
    vision = chunked.backbone.hf.model.vision_model
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())


def _saved_bytes(run) -> int:
    """Bytes autograd saves for backward while ``run()`` executes (its output must need grad)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        assert run().requires_grad
    return sum(sizes)


def test_a_frozen_qwen_tower_saves_nothing_while_its_merger_trains(tiny_qwen_dir):
    """Qwen's merger (the connector) sits inside ``model.visual``: trainable while the tower is
    frozen, it used to switch autograd on for the whole tower, which then kept its activations
    (more with reentrant checkpointing's input hook). Now the frame path saves exactly what the
    merger alone saves."""
    pixels = torch.randn(2, 3, 64, 64)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        mcfg = ModelConfig(
            arch=str(tiny_qwen_dir),
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_reentrant=True,
        )
        model = build_model(mcfg, HeadConfig(tokens_per_frame=1), Precision("fp32", "sdpa"))
        with torch.no_grad():
            features = model.backbone.frame_features(pixels)
        whole = _saved_bytes(lambda: model.frame_embeddings(pixel_values=pixels))  # noqa: B023
        merger = _saved_bytes(lambda: model.backbone.project_frames(features))  # noqa: B023
        assert whole == merger, (checkpointing, whole, merger)


def _tiny(tiny_model_dir, **kw):
    torch.manual_seed(0)
    mcfg = ModelConfig(arch=str(tiny_model_dir), **kw)
    return build_model(mcfg, HeadConfig(tokens_per_frame=1), Precision("fp32", "sdpa"))


def test_a_tower_trained_in_part_gets_gradients_there(tiny_model_dir):
    # autograd runs through the tower when any of its weights trains, not only when all do
    model = _tiny(tiny_model_dir, freeze_vision=True)
    last = model.backbone.hf.model.vision_model.encoder.layers[-1]
    last.requires_grad_(True)  # the last layer unfrozen by hand
    size = model.backbone.hf.config.vision_config.image_size
    model.frame_embeddings(pixel_values=torch.randn(2, 3, size, size)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last.parameters())


def test_a_partitioned_tower_takes_every_frame_in_one_call(tiny_model_dir, monkeypatch):
    """Under ZeRO-3 each tower call gathers its weights on every rank (a collective): chunking
    by ``vision_chunk_frames`` would make the number of calls depend on this rank's frames."""
    model = _tiny(tiny_model_dir, vision_chunk_frames=2)
    backbone = model.backbone
    size = backbone.hf.config.vision_config.image_size
    calls = []
    real = backbone._features
    monkeypatch.setattr(backbone, "_features", lambda x: calls.append(len(x)) or real(x))
    backbone.frame_features(torch.randn(5, 3, size, size))
    assert calls == [2, 2, 1]  # chunks of vision_chunk_frames
    for chunk, expected in ((1, [1] * 5), (0, [5])):  # 0: all frames at once
        calls.clear()
        backbone.vision_chunk = chunk
        backbone.frame_features(torch.randn(5, 3, size, size))
        assert calls == expected
    calls.clear()
    first = next(backbone.module_groups()["vision"].parameters())
    monkeypatch.setattr(first, "ds_id", 0, raising=False)  # how ZeRO-3 marks its parameters
    backbone.frame_features(torch.randn(5, 3, size, size))
    assert calls == [5]
