"""BLEU-1..4, METEOR, CIDEr and ROUGE-L (pycocoevalcap) on the correctly matched turns.

Tokenisation is lower-case words and punctuation split off (no Java needed); METEOR runs the
Java jar shipped with pycocoevalcap and is reported as None when no ``java`` is on the PATH.
SPICE needs a download at first use and is left out.
"""

from __future__ import annotations

import re
import shutil


def tokenize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))


def caption_scores(pairs: list[tuple[str, str]]) -> dict:
    """``pairs`` of (generated, reference). Empty input gives zeros (None for METEOR)."""
    keys = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "cider", "rouge_l")
    if not pairs:
        return {k: 0.0 for k in keys} | {"meteor": None}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [tokenize(r)] for i, (_, r) in enumerate(pairs)}
    res = {i: [tokenize(g)] for i, (g, _) in enumerate(pairs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["meteor"] = None
    if shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            out["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.close() if hasattr(meteor, "close") else None
    return out
