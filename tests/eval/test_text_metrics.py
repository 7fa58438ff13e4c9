"""pycocoevalcap and sentence-transformers, run for real and offline."""

import shutil

import pytest

from dst_train.eval.speaking import SentenceSimilarity, default_embedding_model
from dst_train.eval.text_metrics import caption_scores, tokenize

PAIRS = [
    (
        "Now let's mount the bumper. Start to insert the bumper.",
        "Now let's mount the bumper. Start to insert the bumper.",
    ),
    (
        "Great, the chassis is done. Next: build the body.",
        "Great, the chassis is done. Next: build the body.",
    ),
]


def test_tokenize_splits_punctuation_and_lowercases():
    assert tokenize("Now, Insert the BUMPER.") == "now , insert the bumper ."


def test_identical_texts_score_perfectly():
    s = caption_scores(PAIRS)
    assert s["bleu1"] == pytest.approx(1.0) and s["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["cider"] > 0  # CIDEr's idf over two references is small but positive
    if shutil.which("java"):
        assert s["meteor"] == pytest.approx(1.0, abs=1e-3)
    else:
        assert s["meteor"] is None


def test_different_texts_score_lower():
    same = caption_scores(PAIRS)
    other = caption_scores(
        [
            (PAIRS[0][0], "Please clip the blue mirror onto the cab."),
            (PAIRS[1][0], "You finished the race car, well done!"),
        ]
    )
    assert other["bleu4"] < same["bleu4"] and other["rouge_l"] < same["rouge_l"]


def test_no_pairs_gives_zeros():
    s = caption_scores([])
    assert s["bleu4"] == 0.0 and s["cider"] == 0.0 and s["meteor"] is None


@pytest.fixture(scope="module")
def similarity():
    return SentenceSimilarity(default_embedding_model())


def test_sentence_similarity_runs_offline_and_ranks_meaning(similarity):
    same, close, far = similarity(
        [
            ("Start to insert the bumper.", "Start to insert the bumper."),
            ("Start to insert the bumper.", "Now put the bumper in."),
            ("Start to insert the bumper.", "The weather is sunny today."),
        ]
    )
    assert same == pytest.approx(1.0, abs=1e-5)
    assert far < close < same
    assert far < 0.5 < close
