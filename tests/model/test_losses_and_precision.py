import math

import pytest
import torch
import torch.nn.functional as F

from dst_train.model.losses import binary_focal_loss, token_loss
from dst_train.model.precision import select_precision

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0])
TARGETS = torch.tensor([1, 0, 0, 1])


def _reference_focal(alpha, gamma):
    total = 0.0
    for x, y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        p = 1 / (1 + math.exp(-x))
        p_t = p if y == 1 else 1 - p
        a_t = alpha if y == 1 else 1 - alpha
        total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    return total / len(TARGETS)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.75, 1.0), (0.5, 0.5)])
def test_focal_matches_reference_formula(alpha, gamma):
    got = binary_focal_loss(LOGITS, TARGETS, alpha, gamma)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference_focal(alpha, gamma), rel=1e-6)


def test_focal_reduces_to_bce_at_gamma_zero():
    got = binary_focal_loss(LOGITS, TARGETS, alpha=None, gamma=0.0)
    ref = F.binary_cross_entropy_with_logits(LOGITS, TARGETS.float())
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_focal_weights_mask_positions_and_empty_keeps_graph():
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = binary_focal_loss(LOGITS, TARGETS, None, 0.0, weight=w)
    ref = F.binary_cross_entropy_with_logits(LOGITS[[0, 2]], TARGETS[[0, 2]].float())
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    x = LOGITS.clone().requires_grad_(True)
    empty = binary_focal_loss(x, TARGETS, weight=torch.zeros(4))
    empty.backward()  # no labels: zero loss, but the graph still reaches the inputs
    assert empty.item() == 0 and torch.equal(x.grad, torch.zeros(4))


def test_focal_downweights_easy_examples():
    easy = binary_focal_loss(torch.tensor([4.0]), torch.tensor([1]), None, 2.0)
    plain = binary_focal_loss(torch.tensor([4.0]), torch.tensor([1]), None, 0.0)
    assert easy < plain * 0.01


def test_token_loss_is_cross_entropy_in_fp32():
    logits = torch.randn(5, 11, dtype=torch.bfloat16)
    targets = torch.tensor([1, 3, 5, 7, 9])
    got = token_loss(logits, targets)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(F.cross_entropy(logits.float(), targets).item(), rel=1e-5)
    assert token_loss(logits[:0], targets[:0]).item() == 0
    assert token_loss(logits, targets, gamma=2.0) < got


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_token_focal_loss_matches_reference_formula(gamma):
    torch.manual_seed(0)
    logits = torch.randn(6, 7) * 3  # some tokens easy, some hard: the factor matters
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    total = 0.0
    for row, y in zip(logits.tolist(), targets.tolist(), strict=True):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        total += -((1 - p) ** gamma) * math.log(p)
    assert token_loss(logits, targets, gamma).item() == pytest.approx(total / 6, rel=1e-5)


@pytest.mark.parametrize(
    "cap, flash, want",
    [
        ((7, 5), True, ("fp16", "sdpa")),  # Titan RTX: never bf16 or FlashAttention-2
        ((7, 5), False, ("fp16", "sdpa")),
        ((8, 0), True, ("bf16", "flash_attention_2")),
        ((8, 0), False, ("bf16", "sdpa")),
        ((9, 0), True, ("bf16", "flash_attention_2")),
        ((9, 0), False, ("bf16", "sdpa")),
        (None, True, ("fp32", "sdpa")),
    ],
)
def test_precision_selection(cap, flash, want):
    assert select_precision(cap, flash_installed=flash) == want


def test_precision_refuses_what_the_device_cannot_run():
    with pytest.raises(ValueError, match="bf16 needs compute capability"):
        select_precision((7, 5), dtype="bf16")
    with pytest.raises(ValueError, match="flash_attention_2 needs"):
        select_precision((7, 5), attention="flash_attention_2", flash_installed=True)
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        select_precision(None, dtype="fp16")
    assert select_precision(None, cpu_dtype="bf16") == ("bf16", "sdpa")
    assert select_precision((8, 6), dtype="fp32", flash_installed=True) == ("fp32", "sdpa")
