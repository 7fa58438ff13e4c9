"""The transition grammar used to constrain DST decoding."""

from dst_train.infer.stream import TransitionGrammar

G = TransitionGrammar(["1", "1.1", "1.1.1", "1.2"])


def test_prefixes_of_valid_lists_are_accepted():
    full = "1.1=completed; 1.2=in_progress"
    for n in range(len(full) + 1):
        assert G.prefix_ok(full[:n]), full[:n]
    assert G.complete(full)
    assert G.complete("1.1.1=not_started")


def test_a_separator_split_across_tokens_is_accepted():
    assert G.prefix_ok("1.1=completed;")
    assert G.prefix_ok("1.1=completed; ")
    assert not G.complete("1.1=completed;")
    assert not G.complete("1.1=completed; ")


def test_wrong_ids_states_and_repeats_are_rejected():
    assert not G.prefix_ok("2")
    assert not G.prefix_ok("1.3")
    assert not G.prefix_ok("1.1=done")
    assert not G.prefix_ok("1.1=completed,")
    assert not G.prefix_ok("1.1=completed; 1.1=")  # the same node twice
    assert not G.prefix_ok("1.1=completed; 1.1=in_progress; ")  # ... both items complete
    assert not G.prefix_ok("1.1=completed; 1.1=completed; 1")
    assert not G.complete("1.1=completed; 1.1=in_progress")
    assert not G.complete("1.1=")
    assert not G.complete("")


def test_an_id_that_prefixes_another_id_stays_open():
    assert G.prefix_ok("1.1")  # could be "1.1=" or "1.1.1="
    assert G.prefix_ok("1.1.")
    assert G.prefix_ok("1.1.1=in")


def test_only_tokens_made_of_grammar_characters_are_candidates():
    vocab = ["1", ".1", "=comp", "leted", "; ", "Hello", "", "=x", "_"]
    ids = G.candidates(vocab).tolist()
    assert ids == [0, 1, 2, 3, 4, 8]  # "Hello" (H, e, l, o...) and "=x" use other characters
