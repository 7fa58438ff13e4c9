"""BLEU-1..4, METEOR, CIDEr (and ROUGE-L, ours) on the correctly matched turns, as ProAssist.

Tokenisation is the PTB tokenizer of the Stanford CoreNLP 3.4.1 jar that pycocoevalcap ships
(``-preserveLines -lowerCase``, newlines in a text become spaces), then punctuation tokens are
removed. Pairs whose *reference* becomes empty are dropped (ProAssist: "poor data synthesis");
no pair left → every score is 0. Each score ``x`` also has ``x_w = jaccard * x`` (ProAssist's
jaccard-weighted variant). Java is needed (tokenizer and METEOR); without it the text metrics
are None and a warning says why. SPICE needs a download at first use and is left out.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

# PTB tokens that are dropped (pycocoevalcap's list)
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ","}
PUNCTUATION |= {":", "-", "--", "...", ";"}
LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]")
CAPTION_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "cider")


def _jar(folder: str, name: str) -> Path:
    import pycocoevalcap  # a namespace package: no __file__

    return Path(list(pycocoevalcap.__path__)[0]) / folder / name


def ptb_tokenize(texts: list[str]) -> list[str]:
    """PTB-tokenised, lower-cased, punctuation-free form of each text (one Java run).

    The jar reads a file written to our own temporary folder (pycocoevalcap's wrapper writes
    one into site-packages, which may be read-only).
    """
    if not texts:
        return []
    # one text per line: the jar also breaks lines at \r, \v, \f and U+2028/9, which would
    # shift every later text onto the wrong pair (ProAssist's wrapper replaces only \n; no
    # fixture text holds the others, so parity is unchanged)
    lines = "\n".join(LINE_BREAKS.sub(" ", t) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_bytes(lines.encode())
        cmd = ["java", "-cp", str(_jar("tokenizer", "stanford-corenlp-3.4.1.jar"))]
        cmd += ["edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(src)]
        out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode()
    rows = out.split("\n")
    while len(rows) > len(texts) and rows[-1] == "":
        rows.pop()
    if len(rows) > len(texts):
        raise RuntimeError(f"PTB tokenizer gave {len(rows)} lines for {len(texts)} texts")
    # the jar drops trailing blank lines: a text that tokenises to nothing is ""
    rows += [""] * (len(texts) - len(rows))
    return [
        " ".join(w for w in row.rstrip().split(" ") if w not in PUNCTUATION)
        for row in rows[: len(texts)]
    ]


def caption_scores(pairs: list[tuple[str, str]], jaccard: float | None = None) -> dict:
    """``pairs`` of (generated, reference) raw texts. ``jaccard`` adds the ``*_w`` keys."""
    if not shutil.which("java"):
        warnings.warn("java not found: BLEU/METEOR/CIDEr need it", stacklevel=2)
        out = {k: None for k in (*CAPTION_KEYS, "rouge_l")}
        return out | ({f"{k}_w": None for k in CAPTION_KEYS} if jaccard is not None else {})
    toks = ptb_tokenize([t for p in pairs for t in p])
    kept = [(toks[2 * i], toks[2 * i + 1]) for i in range(len(pairs)) if toks[2 * i + 1]]
    out = _scores(kept)
    out["caption_pairs"] = len(kept)
    if jaccard is not None:
        out |= {f"{k}_w": jaccard * out[k] for k in CAPTION_KEYS}
    return out


@functools.cache
def _meteor():
    """One METEOR process for the whole run: starting one loads its paraphrase tables (~7 s)."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _scores(pairs: list[tuple[str, str]]) -> dict:
    if not pairs:
        return {k: 0.0 for k in (*CAPTION_KEYS, "rouge_l")}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [r] for i, (_, r) in enumerate(pairs)}
    res = {i: [g] for i, (g, _) in enumerate(pairs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["meteor"] = float(_meteor().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    return out
