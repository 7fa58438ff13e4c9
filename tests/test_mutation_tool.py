"""tools/mutation.py (`make mutation`): which mutants it lists, how it applies one, which tests
it runs for it and how it scores; and the benchmarks' table it prints with."""

from __future__ import annotations

import ast
import textwrap

from benchmarks.common import table
from tools.mutation import Mutant, choose_tests, list_mutants, mutated_source, score

SOURCE = textwrap.dedent('''\
    LIMIT = 5  # pragma: no mutate


    def f(a, b=1):
        """doc 2"""
        if a < b and not a:
            raise ValueError("a", a + 1)
        print("x", a + 2)
        text = f"{a + 3}"
        return -a * 3
''')


def _module(tmp_path):
    path = tmp_path / "dst_train" / "data" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text(SOURCE)
    return path


def test_mutants_skip_messages_and_marked_lines(tmp_path):
    mutants = list_mutants(_module(tmp_path), tmp_path)
    # nothing from the raise, print(...), the f-string or the pragma line
    assert [(m.line, m.change) for m in mutants] == [
        (4, "1 -> 2"), (6, "op0 < -> <="), (6, "drop not"), (6, "and -> or"),
        (10, "drop -"), (10, "3 -> 4"), (10, "* -> /"),
    ]  # fmt: skip
    assert [m.in_function for m in mutants] == [False] + [True] * 6  # a default runs at import
    assert {m.package for m in mutants} == {"data"}
    assert mutants[0].key == "dst_train/data/x.py:4:11 1 -> 2"


def test_each_mutant_changes_exactly_its_own_spot(tmp_path):
    path = _module(tmp_path)
    expected = {
        "1 -> 2": "def f(a, b=2):",
        "op0 < -> <=": "if a <= b and (not a):",
        "drop not": "if a < b and a:",
        "and -> or": "if a < b or not a:",
        "drop -": "return a * 3",
        "3 -> 4": "return -a * 4",
        "* -> /": "return -a / 3",
    }
    original = ast.unparse(ast.parse(SOURCE)).splitlines()
    for m in list_mutants(path, tmp_path):
        lines = mutated_source(path, m.index).splitlines()
        changed = [new.strip() for old, new in zip(original, lines, strict=True) if old != new]
        assert changed == [expected[m.change]], m.change


def test_tests_are_the_ones_that_ran_the_line_fastest_first_within_the_budget():
    lines = {10: {"t::slow", "t::fast", "t::mid", "t::renamed"}, 20: {"u::other"}}
    durations = {"t::slow": 50.0, "t::fast": 1.0, "t::mid": 5.0, "u::other": 0.5}
    existing = {"t::slow", "t::fast", "t::mid", "u::other", "t::reader", "v::reader"}
    inside = Mutant("dst_train/x.py", 0, 10, 0, "< -> <=")
    assert choose_tests(inside, lines, durations, 10.0, existing) == ["t::fast", "t::mid"]
    # the first test is run whatever its time; readers ride along with their file's tests
    assert choose_tests(inside, lines, durations, 0.1, existing, {"t::reader", "v::reader"}) == [
        "t::fast", "t::reader"
    ]  # fmt: skip
    at_import = Mutant("dst_train/x.py", 1, 3, 0, "1 -> 2", in_function=False)
    assert choose_tests(at_import, lines, durations, 100.0, existing) == [
        "u::other", "t::fast", "t::mid", "t::slow"
    ]  # fmt: skip


def test_the_score_counts_timeouts_as_killed_and_leaves_equivalents_out():
    statuses = ["killed", "timeout", "survived", "no-tests", "error", "survived"]
    mutants = [Mutant("dst_train/eval/m.py", i, i + 1, 0, "+ -> -", s) for i, s in
               enumerate(statuses)]  # fmt: skip
    equivalent = {mutants[-1].key: "same value"}
    assert score(mutants, equivalent) == [{
        "package": "eval", "killed": 2, "survived": 2, "equivalent": 1, "errors": 1,
        "score": 0.5,
    }]  # fmt: skip


def test_a_table_of_no_rows_is_its_header():
    assert table([], ["package", "score"]) == "package  score\n-------  -----"
    assert table([{"a": 1.23456, "b": None}], ["a", "b"]) == "a      b\n-----  -\n1.235  -"
