"""The tiny model memorises a handful of demo clips: every loss falls, decisions become right."""

import torch

from tests.model.test_model import _setup


def test_tiny_model_overfits_two_clips(demo_root, tiny_model_dir):
    # alpha 0.5: positives and negatives weigh the same (0.25 favours silence, for real data)
    _, model, batch = _setup(demo_root, tiny_model_dir, "loss.focal_alpha=0.5", n=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    names = ("speak_loss", "update_loss", "response_loss", "dst_loss")
    first = None
    for _ in range(250):
        out = model(**batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        first = first or {k: out[k].item() for k in names}
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    for k in names:
        assert out[k].item() < 0.2 * first[k], (k, first[k], out[k].item())  # fell 5× or more
    for head in ("speak", "update"):
        pred = torch.sigmoid(out[f"{head}_logits"]) > 0.5
        y = batch[head].bool()
        assert y.any() and (~y).any()
        assert pred[y].float().mean() >= 0.9, head  # positives found
        assert (~pred[~y]).float().mean() >= 0.98, head  # negatives stay silent
