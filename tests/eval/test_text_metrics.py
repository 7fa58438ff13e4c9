"""pycocoevalcap (PTB tokenizer, BLEU, METEOR, CIDEr) and sentence-transformers, run for real
and offline, with ProAssist's text handling (issue 16, point 4)."""

import pytest

from dst_train.eval.speaking import SentenceSimilarity, minilm_model_path
from dst_train.eval.text_metrics import caption_scores, ptb_tokenize

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


def test_ptb_tokenizer_lowercases_splits_and_removes_punctuation():
    toks = ptb_tokenize(["Now, Insert the BUMPER.", "Don't\nstop -- ok...", "...", "", "a\tb"])
    assert toks == ["now insert the bumper", "do n't stop ok", "", "", "a b"]


def test_line_breaks_inside_a_text_do_not_shift_the_others():
    texts = ["a\rb", "c", "d\u2028e", "f", "g\x0ch", "i"]
    assert ptb_tokenize(texts) == ["a b", "c", "d e", "f", "g h", "i"]


def test_ptb_tokenizer_writes_nothing_into_site_packages(tmp_path):
    from dst_train.eval.text_metrics import _jar

    folder = _jar("tokenizer", "x").parent
    before = set(folder.iterdir())
    ptb_tokenize(["one sentence."])
    assert set(folder.iterdir()) == before


def test_identical_texts_score_perfectly():
    s = caption_scores(PAIRS)
    assert s["bleu1"] == pytest.approx(1.0) and s["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["cider"] > 0  # CIDEr's idf over two references is small but positive
    assert s["meteor"] == pytest.approx(1.0, abs=1e-3)


def test_punctuation_does_not_count_and_empty_references_are_dropped():
    # "Insert the pin." vs "insert the pin" only differ in case and punctuation: perfect
    s = caption_scores([("Insert the pin.", "insert the pin"), ("Insert the pin!", "...")])
    assert s["caption_pairs"] == 1  # the reference "..." tokenises to nothing: dropped
    assert s["bleu1"] == pytest.approx(1.0) and s["meteor"] == pytest.approx(1.0, abs=1e-3)
    with_punct = caption_scores([("Insert the pin.", "insert the pin")])
    assert with_punct["bleu1"] == pytest.approx(1.0)


def test_weighted_variants_are_jaccard_times_the_score():
    s = caption_scores(PAIRS, jaccard=0.25)
    for key in ("bleu1", "bleu4", "meteor", "cider"):
        assert s[f"{key}_w"] == pytest.approx(0.25 * s[key])


def test_different_texts_score_lower():
    same = caption_scores(PAIRS)
    other = caption_scores(
        [
            (PAIRS[0][0], "Please clip the blue mirror onto the cab."),
            (PAIRS[1][0], "You finished the race car, well done!"),
        ]
    )
    assert other["bleu4"] < same["bleu4"] and other["rouge_l"] < same["rouge_l"]
    assert other["meteor"] < same["meteor"]


def test_no_pairs_gives_zeros_as_proassist():
    s = caption_scores([], jaccard=0.0)
    assert s["bleu4"] == 0.0 and s["cider"] == 0.0 and s["meteor"] == 0.0
    assert s["meteor_w"] == 0.0


@pytest.fixture(scope="module")
def similarity():
    return SentenceSimilarity(minilm_model_path())


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
