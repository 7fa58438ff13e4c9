"""Every loss option reaches the loss it names, and videos without DST get no update loss."""

import shutil

import pytest
import torch

from dst_train.model.losses import binary_focal_loss
from tests.model.test_model import _setup


def _varied(demo_root, tiny_model_dir, *overrides):
    """(model, batch) built from the run config with ``overrides``; heads that vary per frame."""
    _, model, batch = _setup(demo_root, tiny_model_dir, *overrides)
    torch.manual_seed(2)
    for head in (model.speak_head, model.update_head):
        torch.nn.init.normal_(head.net[-1].weight, std=0.5)
    return model, batch


def test_every_loss_option_reaches_the_loss(demo_root, tiny_model_dir):
    model, batch = _varied(demo_root, tiny_model_dir)
    base = model(**batch)
    weights = {"speak": 0.3, "update": 0.7, "response": 1.5, "dst": 2.0}
    options = ["loss.focal_alpha=0.6", "loss.focal_gamma=1.0", "loss.text_focal_gamma=0.5"]
    options += [f"loss.{name}_weight={w}" for name, w in weights.items()]
    model, batch = _varied(demo_root, tiny_model_dir, *options)
    out = model(**batch)
    assert torch.equal(out["speak_logits"], base["speak_logits"])  # the same model and batch
    for head in ("speak", "update"):
        expected = binary_focal_loss(
            out[f"{head}_logits"], batch[head], 0.6, 1.0, batch[f"{head}_weight"]
        )
        assert out[f"{head}_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert out[f"{head}_loss"].item() != pytest.approx(base[f"{head}_loss"].item(), rel=1e-3)
    for name in ("response", "dst"):  # focal text loss: below cross-entropy (p_t is ~1/V here)
        assert 0 < out[f"{name}_loss"].item() < base[f"{name}_loss"].item() * (1 - 1e-4)
    assert out["loss"].item() == pytest.approx(
        sum(w * out[f"{n}_loss"].item() for n, w in weights.items()), rel=1e-6
    )
    model, batch = _varied(demo_root, tiny_model_dir, "loss.decision_loss=bce", *options)
    bce = model(**batch)  # plain BCE: alpha and gamma do not apply
    expected = (
        torch.nn.functional.binary_cross_entropy_with_logits(
            bce["speak_logits"],
            batch["speak"].float(),
            weight=batch["speak_weight"],
            reduction="sum",
        )
        / batch["speak_weight"].sum()
    )
    assert bce["speak_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_head_hidden_size_builds_an_mlp_head(demo_root, tiny_model_dir):
    _, model, _ = _setup(demo_root, tiny_model_dir, "model.head_hidden=24", n=1)
    for head in (model.speak_head, model.update_head):
        first, last = head.net[0], head.net[-1]
        assert (first.out_features, last.in_features, last.out_features) == (24, 24, 1)
    _, linear, _ = _setup(demo_root, tiny_model_dir, "model.head_hidden=0", n=1)
    assert len(linear.speak_head.net) == 1


def test_videos_without_dst_get_no_update_loss(demo_root, tiny_model_dir, tmp_path):
    """A video with no DST file: its update labels are unknown (-1), weighted 0, and the
    update loss of a batch of only such frames is 0 (with the graph kept), whatever the logits."""
    from dst_train.data.dataset import DatasetPaths, dst_path

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    paths = DatasetPaths.from_root(root)
    cfg0, model, _ = _setup(demo_root, tiny_model_dir, n=1)
    from dst_train.data.collate import make_collate
    from dst_train.data.pipeline import make_dataset
    from dst_train.model.backbone import load_image_processor, load_tokenizer
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(root, tiny_model_dir)
    tok, proc = load_tokenizer(cfg.model.arch), load_image_processor(cfg.model.arch)
    with_dst = make_dataset(cfg, "train", tok, model.backbone, proc)
    uid = with_dst.samples[0].video_uid
    dst_path(paths.dst_dir, uid).unlink()
    ds = make_dataset(cfg, "train", tok, model.backbone, proc)
    mine = [i for i, s in enumerate(ds.samples) if s.video_uid == uid]
    others = [i for i, s in enumerate(ds.samples) if s.video_uid != uid]
    assert mine and others
    assert all(y == -1 for i in mine for y in ds.samples[i].update)
    assert all(set(ds.samples[i].update) <= {0, 1} for i in others)
    assert any(1 in ds.samples[i].update for i in others)
    item = ds[mine[0]]
    assert set(item["update_weight"]) == {0.0} and 1.0 in item["speak_weight"]
    batch = make_collate(tok.pad_token_id, False)([item])
    assert set(batch["update"].tolist()) == {0}  # clamped: a valid target for the loss
    torch.nn.init.normal_(model.update_head.net[-1].weight, std=1.0)
    out = model(**batch)
    assert out["update_loss"].item() == 0.0 and out["update_loss"].requires_grad
    assert out["speak_loss"].item() > 0
    del cfg0
