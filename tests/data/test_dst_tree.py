import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst_train.data.dst_tree import (
    COMPLETED,
    IN_PROGRESS,
    NOT_STARTED,
    STATES,
    DSTFormatError,
    check_state,
    load_dst_tsv,
    parse_transitions,
    read_dst_tsv,
    render_transitions,
    repair_state,
)
from tests.conftest import write_tsv

NUMERIC = [
    ("STEP", "1", 0, 10, "build"),
    ("SUBSTEP", "1.1", None, None, "base"),  # empty parent span: derived from the children
    ("ACTION", "1.1.1", 1.0, 3.0, "screw"),
    ("ACTION", "1.1.2", 4.0, 4.0, "click"),  # instantaneous
    ("SUBSTEP", "1.2", 5, 9, "top"),
    ("ACTION", "1.2.1", 5.0, 9.0, "press"),
]
LETTER = [
    ("step", "S1", "", "", "build"),
    ("substep", "S1.1", "", "", "base"),
    ("action", "S1.1.a", 1.0, 3.0, "screw"),
    ("action", "S1.1.b", 4.0, 4.0, "click"),
    ("substep", "S1.2", 5, 9, "top"),
    ("action", "S1.2.a", 5.0, 9.0, "press"),
]


@pytest.mark.parametrize("rows", [NUMERIC, LETTER], ids=["numeric", "letter"])
def test_both_styles_build_the_same_tree(tmp_path, rows):
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))
    ids = tree.order
    assert len(ids) == 6
    step, sub1, a1, a2, sub2, a3 = (tree.nodes[i] for i in ids)
    assert [n.level for n in (step, sub1, a1, a2, sub2, a3)] == [
        "step",
        "substep",
        "action",
        "action",
        "substep",
        "action",
    ]
    assert sub1.children == [a1.id, a2.id] and a1.parent == sub1.id and sub1.parent == step.id
    assert (sub1.start, sub1.end) == (1.0, 4.0)  # derived from children
    assert (step.start, step.end) == (1.0, 9.0)  # effective span = hull of children


def test_states_over_time_follow_the_rules(tmp_path):
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", NUMERIC))
    assert set(tree.state_at(0.5).values()) == {NOT_STARTED}
    s = tree.state_at(1.0)  # start is inclusive
    assert (s["1.1.1"], s["1.1"], s["1"]) == (IN_PROGRESS, IN_PROGRESS, IN_PROGRESS)
    s = tree.state_at(3.5)
    assert (s["1.1.1"], s["1.1.2"], s["1.1"]) == (COMPLETED, NOT_STARTED, IN_PROGRESS)
    s = tree.state_at(4.0)  # instantaneous action goes straight to completed
    assert (s["1.1.2"], s["1.1"], s["1.2"]) == (COMPLETED, COMPLETED, NOT_STARTED)
    assert tree.state_before(4.0)["1.1.2"] == NOT_STARTED
    assert set(tree.state_at(9.0).values()) == {COMPLETED}
    for t in (0, 1, 2.5, 3, 4, 5, 7, 9, 12):
        assert check_state(tree, tree.state_at(t)) == []


def test_transitions_list(tmp_path):
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", NUMERIC))
    got = [(tr.time, tr.node_id, tr.state) for tr in tree.transitions()]
    assert got == [
        (1.0, "1", IN_PROGRESS),
        (1.0, "1.1", IN_PROGRESS),
        (1.0, "1.1.1", IN_PROGRESS),
        (3.0, "1.1.1", COMPLETED),
        (4.0, "1.1", COMPLETED),
        (4.0, "1.1.2", COMPLETED),
        (5.0, "1.2", IN_PROGRESS),
        (5.0, "1.2.1", IN_PROGRESS),
        (9.0, "1", COMPLETED),
        (9.0, "1.2", COMPLETED),
        (9.0, "1.2.1", COMPLETED),
    ]
    assert [tr.node_id for tr in tree.transitions_between(3.0, 4.0)] == ["1.1.1"]


def test_render_state_and_transition_text_round_trip(tmp_path):
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", LETTER))
    text = tree.render_state(tree.state_at(2))
    assert text.splitlines()[0] == "S1 build: in_progress"
    assert text.splitlines()[2] == "    S1.1.a screw: in_progress"
    changes = {"S1.1.a": COMPLETED, "S1.2": IN_PROGRESS}
    assert render_transitions(changes) == "S1.1.a=completed; S1.2=in_progress"
    assert parse_transitions(render_transitions(changes), tree) == changes
    assert parse_transitions("") == {}


@pytest.mark.parametrize(
    "text, msg",
    [
        ("1.2", "not of the form"),
        ("1.2=done", "unknown state"),
        ("9.9=completed", "unknown node id"),
        ("1.1=completed; 1.1=in_progress", "listed twice"),
    ],
)
def test_parse_transitions_errors(tmp_path, text, msg):
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", NUMERIC))
    with pytest.raises(ValueError, match=msg):
        parse_transitions(text, tree)


# a complete step: one substep, one action (lines 2-4 of a file)
ONE_STEP = [("STEP", "1", 0, 1, "s"), ("SUBSTEP", "1.1", 0, 1, "u"), ("ACTION", "1.1.1", 0, 1, "a")]
BAD_CASES = {
    "header": (None, "header must be"),
    "fields": ([("STEP", "1", 0, 1)], "expected 5 tab-separated fields"),
    "type": ([("PHASE", "1", 0, 1, "x")], "unknown node type"),
    "time": ([("STEP", "1", "abc", 1, "x")], "timestamps must be"),
    "negative": ([("ACTION", "1", -1, 1, "x")], "timestamps must be"),
    "reversed": ([("STEP", "1", 5, 1, "x")], "end_ts 1.0 is before start_ts 5.0"),
    "malformed_id": ([("STEP", "1.x", 0, 1, "x")], "malformed id"),
    "type_mismatch": (
        [("STEP", "1", 0, 1, "s"), ("ACTION", "1.1", 0, 1, "a")],
        "is a substep id but the row type is action",
    ),
    "duplicate": (
        [
            *ONE_STEP,
            ("ACTION", "1.1.1", 0, 1, "b"),
        ],
        "duplicate id '1.1.1' \\(first on line 4\\)",
    ),
    "missing_parent": (
        [("STEP", "1", 0, 1, "s"), ("ACTION", "1.1.1", 0, 1, "a")],
        "parent '1.1' of '1.1.1' is not defined",
    ),
    "order": (
        [
            ("STEP", "1", 0, 9, "s"),
            ("SUBSTEP", "1.1", 0, 9, "u"),
            ("SUBSTEP", "1.2", 0, 9, "v"),
            ("ACTION", "1.1.1", 0, 1, "a"),
            ("ACTION", "1.2.1", 0, 1, "b"),
        ],
        "'1.1.1' is out of order",
    ),
    "leaf_empty": (
        [("STEP", "1", 0, 1, "s"), ("SUBSTEP", "1.1", 0, 1, "u"), ("ACTION", "1.1.1", "", 1, "a")],
        "action '1.1.1' has an empty timestamp",
    ),
    "childless": ([("STEP", "1", 0, 1, "s")], "step '1' has no children"),
    "childless_after_a_full_step": (
        [
            *ONE_STEP,
            ("STEP", "2", 1, 2, "t"),
        ],
        "step '2' has no children",
    ),
    "mixed": (
        [
            *ONE_STEP,
            ("step", "S2", 0, 1, "t"),
            ("substep", "S2.1", 0, 1, "v"),
            ("action", "S2.1.a", 0, 1, "b"),
        ],
        r"id 'S2' is in the other id style than line 2 \(numeric\)",
    ),
    "empty_file": ([], "no nodes"),
}
# the line each case's error names (the header is line 1): the row to fix, not a neighbour
BAD_LINES = {
    "header": 1,
    "fields": 2,
    "type": 2,
    "time": 2,
    "negative": 2,
    "reversed": 2,
    "malformed_id": 2,
    "type_mismatch": 3,
    "duplicate": 5,
    "missing_parent": 3,
    "order": 5,
    "leaf_empty": 4,
    "childless": 2,
    "childless_after_a_full_step": 5,
    "mixed": 5,  # the first row of the second style
    "empty_file": None,  # no row to name
}


def test_a_row_that_cannot_be_read_is_the_only_error(tmp_path):
    """A malformed row stops the read before the tree is built: its children do not each add a
    'parent is not defined' error that hides the one line to fix."""
    rows = [
        ("STEP", "1", 0, 9, "s"),
        ("SUBSTP", "1.1", 0, 9, "u"),
        ("ACTION", "1.1.1", 0, 1, "a"),
        ("ACTION", "1.1.2", 1, 2, "b"),
    ]
    tree, issues = read_dst_tsv(write_tsv(tmp_path / "bad.tsv", rows))
    assert tree is None
    assert [(i.line, i.severity) for i in issues] == [(3, "error")]
    assert "unknown node type 'SUBSTP'" in issues[0].message


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_every_validation_error_names_file_and_line(tmp_path, case):
    rows, msg = BAD_CASES[case]
    path = tmp_path / "bad.tsv"
    if rows is None:
        write_tsv(path, [("STEP", "1", 0, 1, "s")], header="kind\tid\tfrom\tto\tname")
    else:
        write_tsv(path, rows)
    tree, issues = read_dst_tsv(path)
    assert tree is None
    errors = [i for i in issues if i.severity == "error"]
    matching = [i for i in errors if __import__("re").search(msg, i.message)]
    assert [i.line for i in matching] == [BAD_LINES[case]], issues
    assert all(i.path == str(path) for i in errors)
    with pytest.raises(DSTFormatError, match=str(path)):
        load_dst_tsv(path)
    if case != "empty_file":
        assert all(i.line for i in errors)  # each names its line


OUTSIDE = [
    ("STEP", "1", 2, 6, "s"),
    ("SUBSTEP", "1.1", 2, 6, "u"),
    ("ACTION", "1.1.1", 1, 3, "a"),
    ("ACTION", "1.1.2", 5, 8, "b"),
]


def test_span_policy_error(tmp_path):
    tree, issues = read_dst_tsv(write_tsv(tmp_path / "v.tsv", OUTSIDE), "error")
    assert tree is None
    assert issues[0].line == 3 and "outside its annotated span [2, 6]" in issues[0].message


def test_span_policy_repair_widens_parents(tmp_path):
    tree, issues = read_dst_tsv(write_tsv(tmp_path / "v.tsv", OUTSIDE), "repair")
    assert tree is not None and all(i.severity == "warning" for i in issues) and issues
    assert (tree.nodes["1.1"].start, tree.nodes["1.1"].end) == (1, 8)
    assert (tree.nodes["1.1.1"].start, tree.nodes["1.1.2"].end) == (1, 8)


def test_span_policy_clip_clips_children(tmp_path):
    tree, issues = read_dst_tsv(write_tsv(tmp_path / "v.tsv", OUTSIDE), "clip")
    assert tree is not None and issues
    assert (tree.nodes["1.1.1"].start, tree.nodes["1.1.2"].end) == (2, 6)
    assert (tree.nodes["1"].start, tree.nodes["1"].end) == (2, 6)


def test_overlapping_siblings_warn(tmp_path):
    rows = [
        ("STEP", "1", 0, 9, "s"),
        ("SUBSTEP", "1.1", 0, 9, "u"),
        ("ACTION", "1.1.1", 0, 5, "a"),
        ("ACTION", "1.1.2", 4, 9, "b"),
    ]
    tree, issues = read_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))
    assert tree is not None
    assert [(i.line, i.severity) for i in issues] == [(5, "warning")]
    rows[3] = ("ACTION", "1.1.2", 5, 9, "b")  # starts as its sibling ends: back to back, fine
    assert read_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))[1] == []


def test_check_state_reports_inconsistency(tmp_path):
    tree = load_dst_tsv(write_tsv(tmp_path / "v.tsv", NUMERIC))
    state = tree.state_at(2)
    state["1.1"] = COMPLETED
    assert check_state(tree, state) == ["1.1 is completed but its children imply in_progress"]
    del state["1.2"]
    assert "missing nodes: 1.2" in check_state(tree, state)
    # what a model may write: a node the task does not have, a state that is not one
    valid = tree.state_at(2)
    assert check_state(tree, {**valid, "9.9": COMPLETED}) == ["unknown nodes: 9.9"]
    assert check_state(tree, {**valid, "1": "done"}) == ["unknown states on: 1"]


def test_a_dst_file_that_cannot_be_read_is_an_issue_and_a_bad_policy_an_error(tmp_path):
    folder = tmp_path / "v.tsv"
    folder.mkdir()  # a folder where the file should be
    tree, issues = read_dst_tsv(folder)
    assert tree is None and [str(i) for i in issues] == [
        f"{folder}: error: cannot read DST file: Is a directory"
    ]
    with pytest.raises(ValueError, match="span_policy must be one of .*, got 'fix'"):
        read_dst_tsv(write_tsv(tmp_path / "w.tsv", NUMERIC), span_policy="fix")


# ------------------------------------------------------------ repair
def _big_tree(tmp_path):
    rows = [
        ("STEP", "1", "", "", "a"),
        ("SUBSTEP", "1.1", "", "", "b"),
        ("ACTION", "1.1.1", 0, 1, "c"),
        ("ACTION", "1.1.2", 1, 2, "d"),
        ("ACTION", "1.1.3", 2, 3, "e"),
        ("SUBSTEP", "1.2", "", "", "f"),
        ("ACTION", "1.2.1", 3, 4, "g"),
        ("STEP", "2", "", "", "h"),
        ("SUBSTEP", "2.1", "", "", "i"),
        ("ACTION", "2.1.1", 4, 5, "j"),
        ("ACTION", "2.1.2", 5, 6, "k"),
    ]
    return load_dst_tsv(write_tsv(tmp_path / "big.tsv", rows))


def test_repair_example(tmp_path):
    tree = _big_tree(tmp_path)
    state = tree.state_at(10)  # all completed
    state["1.1.2"] = NOT_STARTED  # one leaf wrong: nearest fix is to flip it back (1 change)
    fixed = repair_state(tree, state)
    assert fixed == tree.state_at(10)
    state = tree.initial_state()
    state["1"] = COMPLETED  # a parent claims completion with no evidence: flip the parent
    assert repair_state(tree, state) == tree.initial_state()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_repair_output_is_always_valid_and_minimal(tmp_path_factory, data):
    tree = _big_tree(tmp_path_factory.mktemp("r"))
    state = {nid: data.draw(st.sampled_from(STATES)) for nid in tree.order}
    fixed = repair_state(tree, state)
    assert check_state(tree, fixed) == []
    changed = sum(fixed[n] != state[n] for n in tree.order)
    # minimal: no valid state (every one is reachable from leaves) is closer
    for t in [x * 0.5 for x in range(14)]:
        valid = tree.state_at(t)
        assert changed <= sum(valid[n] != state[n] for n in tree.order)


@settings(max_examples=100, deadline=None)
@given(t=st.floats(0, 7))
def test_repair_returns_valid_input_unchanged(tmp_path_factory, t):
    tree = _big_tree(tmp_path_factory.mktemp("r"))
    state = tree.state_at(t)
    assert repair_state(tree, state) == state


def test_repair_drops_unknown_and_fills_missing(tmp_path):
    tree = _big_tree(tmp_path)
    fixed = repair_state(tree, {"1.1.1": COMPLETED, "9.9": COMPLETED})
    assert set(fixed) == set(tree.order) and check_state(tree, fixed) == []
    assert fixed["1.1.1"] == COMPLETED and fixed["1.1"] == IN_PROGRESS


def test_weighted_repair_keeps_pinned_nodes(tmp_path):
    tree = _big_tree(tmp_path)
    state = tree.initial_state()
    state["1.1.1"] = IN_PROGRESS  # a partial update: the parents were not listed
    assert repair_state(tree, state)["1.1.1"] == NOT_STARTED  # unweighted: 1 change beats 2
    fixed = repair_state(tree, state, {"1.1.1": 100})
    assert (
        fixed["1.1.1"] == IN_PROGRESS and fixed["1.1"] == IN_PROGRESS and fixed["1"] == IN_PROGRESS
    )
    assert check_state(tree, fixed) == []
    state = tree.initial_state()
    state["1.1"] = COMPLETED  # a parent said completed: pinned, its children follow
    fixed = repair_state(tree, state, {"1.1": 100})
    assert all(fixed[c] == COMPLETED for c in ("1.1.1", "1.1.2", "1.1.3"))


def test_line_numbers_survive_exotic_characters_and_a_bom_is_fine(tmp_path):
    from dst_train.data.dst_tree import read_dst_tsv

    rows = [
        ("STEP", 1, 0, 10, "step\x0cwith form feed\u2028and line separator\x85"),
        ("SUBSTEP", 1.1, 0, 10, "a"),
        ("ACTION", "1.1.1", 0, 5, "x"),
        ("ACTION", "1.1.2", "oops", 10, "y"),  # line 5 of the file
    ]
    path = write_tsv(tmp_path / "v.tsv", rows)
    tree, issues = read_dst_tsv(path)
    assert tree is None
    assert [i.line for i in issues if i.severity == "error"] == [5], [str(i) for i in issues]
    good = write_tsv(tmp_path / "good.tsv", rows[:3])
    good.write_bytes(b"\xef\xbb\xbf" + good.read_bytes().replace(b"\n", b"\r\n"))
    tree, issues = read_dst_tsv(good)
    assert tree is not None and tree.nodes["1"].name.startswith("step\x0c"), issues


def test_a_tsv_that_is_not_utf8_is_an_issue_with_its_line(tmp_path):
    from dst_train.data.dst_tree import read_dst_tsv

    path = write_tsv(tmp_path / "v.tsv", [("STEP", 1, 0, 10, "s"), ("SUBSTEP", 1.1, 0, 10, "a")])
    path.write_bytes(path.read_bytes().replace(b"a\n", b"caf\xe9\n"))
    tree, issues = read_dst_tsv(path)
    assert tree is None and issues[0].line == 3 and "not UTF-8" in str(issues[0])


def test_repair_ties_keep_the_given_root_state_then_the_earliest(tmp_path):
    """Equally near valid states: the one that keeps the root's given state, else the one whose
    root state comes first in not_started < in_progress < completed."""
    tree = _big_tree(tmp_path)
    state = tree.initial_state()
    state.update({"2": COMPLETED, "2.1": COMPLETED})  # actions not_started: 2 changes either way
    fixed = repair_state(tree, state)
    assert [fixed[n] for n in ("2", "2.1", "2.1.1", "2.1.2")] == [COMPLETED] * 4
    state = tree.initial_state()
    state.update({"2.1": COMPLETED, "2.1.1": COMPLETED})  # step 2 unlisted: no given state
    del state["2"]
    fixed = repair_state(tree, state)  # completed (2.1.2 changes) ties in_progress (2.1 changes)
    want = [IN_PROGRESS, IN_PROGRESS, COMPLETED, NOT_STARTED]
    assert [fixed[n] for n in ("2", "2.1", "2.1.1", "2.1.2")] == want


def test_an_unweighted_node_costs_1(tmp_path):
    """A weight of 1.5 is dearer than one default node and cheaper than two."""
    tree = _big_tree(tmp_path)
    state = tree.initial_state()
    state["1.1.1"] = IN_PROGRESS  # undo it (1.5) or carry its 2 parents along (2)
    assert repair_state(tree, state, {"1.1.1": 1.5})["1.1.1"] == NOT_STARTED
    assert repair_state(tree, state, {"1.1.1": 2.5})["1.1.1"] == IN_PROGRESS


def test_an_empty_file_is_an_issue_and_a_missing_last_newline_is_fine(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    tree, issues = read_dst_tsv(empty)
    assert tree is None and [i.message for i in issues] == ["empty file (expected a header row)"]
    path = write_tsv(tmp_path / "v.tsv", NUMERIC)
    whole = load_dst_tsv(path)
    path.write_text(path.read_text().removesuffix("\n"))
    assert load_dst_tsv(path).nodes == whole.nodes


def test_an_error_while_building_the_tree_is_not_followed_by_span_checks(tmp_path):
    """Substep 1.1 loses its only action (a malformed id): 'no children' is the error. Checking
    spans on what is left would also blame step 1 for a child span [0, 0] that is not in the
    file."""
    rows = [
        ("STEP", "1", 5, 10, "s"),
        ("SUBSTEP", "1.1", "", "", "u"),
        ("ACTION", "1.1.x", 5, 7, "a"),
        ("SUBSTEP", "1.2", 5, 10, "v"),
        ("ACTION", "1.2.1", 5, 10, "b"),
    ]
    tree, issues = read_dst_tsv(write_tsv(tmp_path / "v.tsv", rows))
    assert tree is None
    assert [(i.line, i.severity) for i in issues] == [(4, "error"), (3, "error")], issues
