"""Dialog-state-tracking (DST) annotations: a 3-level task tree (step → substep → action).

One TSV file per video, header ``type  id  start_ts  end_ts  name`` (DESIGN.md §2.3). Two id
styles are accepted: ``STEP 1 / SUBSTEP 1.1 / ACTION 1.1.1`` and ``step S1 / substep S1.1 /
action S1.1.a``. Times are seconds.

State semantics. A leaf (action) is ``not_started`` before its start, ``in_progress`` in
``[start, end)`` and ``completed`` from ``end`` on; an instantaneous action (start == end) goes
straight to ``completed``. A parent's state is *derived from its children* (completed iff all
children completed, not_started iff all not_started, else in_progress), so the tracked state is
always hierarchically consistent; its effective span is therefore the hull of its children.
Annotated parent spans are only checked against that hull (LLM-made annotations are imperfect;
``span_policy`` says what to do about it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

NOT_STARTED, IN_PROGRESS, COMPLETED = "not_started", "in_progress", "completed"
STATES = (NOT_STARTED, IN_PROGRESS, COMPLETED)
LEVELS = ("step", "substep", "action")
SPAN_POLICIES = ("error", "repair", "clip")
HEADER = ["type", "id", "start_ts", "end_ts", "name"]
MAX_CELL_CHARS = 10_000  # a node name longer than this is corrupt input (it becomes prompt text)

# One regex per id style; the level is the number of dotted parts.
_NUMERIC_ID = re.compile(r"^\d+(\.\d+){0,2}$")
_LETTER_ID = re.compile(r"^S\d+(\.\d+(\.[a-z]+)?)?$")


class DSTFormatError(ValueError):
    """A DST annotation that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Issue:
    """One problem found in an annotation: where, what, and whether it blocks use."""

    path: str
    line: int | None
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.severity}: {self.message}"


@dataclass
class DSTNode:
    id: str
    level: str  # one of LEVELS
    name: str
    start: float  # seconds, effective (derived/repaired) span
    end: float
    line: int  # 1-based line in the TSV (header is line 1)
    parent: str | None = None
    children: list[str] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return self.level == "action"


@dataclass(frozen=True)
class Transition:
    """Node ``node_id`` enters ``state`` at ``time`` seconds."""

    time: float
    node_id: str
    state: str


class DSTTree:
    """The task tree of one video, nodes kept in file order."""

    def __init__(self, nodes: list[DSTNode], source: str = "<memory>"):
        self.nodes: dict[str, DSTNode] = {n.id: n for n in nodes}
        self.order: list[str] = [n.id for n in nodes]
        self.source = source
        self._transitions: list[Transition] | None = None

    # ----------------------------------------------------------------- states
    def leaves(self) -> list[DSTNode]:
        return [self.nodes[i] for i in self.order if self.nodes[i].is_leaf]

    def initial_state(self) -> dict[str, str]:
        return {i: NOT_STARTED for i in self.order}

    def state_at(self, t: float) -> dict[str, str]:
        """State of every node at time ``t`` seconds (transitions at exactly ``t`` applied)."""
        return self._state(lambda tr: tr.time <= t)

    def state_before(self, t: float) -> dict[str, str]:
        """State just before ``t``: what a frame starting at ``t`` begins from."""
        return self._state(lambda tr: tr.time < t)

    def _state(self, applies) -> dict[str, str]:
        state = self.initial_state()
        for tr in self.transitions():
            if applies(tr):
                state[tr.node_id] = tr.state
        return state

    def transitions(self) -> list[Transition]:
        """Every state change of every node, sorted by time then file order."""
        if self._transitions is None:
            rank = {nid: k for k, nid in enumerate(self.order)}
            out = []
            for node in self.nodes.values():
                if node.end > node.start:
                    out.append(Transition(node.start, node.id, IN_PROGRESS))
                out.append(Transition(node.end, node.id, COMPLETED))
            out.sort(key=lambda tr: (tr.time, rank[tr.node_id], STATES.index(tr.state)))
            self._transitions = out
        return self._transitions

    def transitions_between(self, t0: float, t1: float) -> list[Transition]:
        """Transitions with ``t0 <= time < t1`` (one frame's interval)."""
        return [tr for tr in self.transitions() if t0 <= tr.time < t1]

    # -------------------------------------------------------------- rendering
    def render_state(self, state: dict[str, str]) -> str:
        """Full state as prompt text, one node per line, indented by level."""
        lines = []
        for nid in self.order:
            node = self.nodes[nid]
            indent = "  " * LEVELS.index(node.level)
            lines.append(f"{indent}{nid} {node.name}: {state[nid]}")
        return "\n".join(lines)

    def net_changes(self, transitions: list[Transition]) -> dict[str, str]:
        """Final state per changed node, in file order (a node may change twice in one frame)."""
        last = {tr.node_id: tr.state for tr in transitions}
        return {nid: last[nid] for nid in self.order if nid in last}


# ------------------------------------------------------------- sparse text
def render_transitions(changes: dict[str, str]) -> str:
    """``{"1.2": "completed", "1.3": "in_progress"}`` → ``"1.2=completed; 1.3=in_progress"``."""
    return "; ".join(f"{nid}={state}" for nid, state in changes.items())


def parse_transitions(text: str, tree: DSTTree | None = None) -> dict[str, str]:
    """Inverse of :func:`render_transitions`. Raises ``ValueError`` naming the bad item."""
    changes: dict[str, str] = {}
    for item in (p.strip() for p in text.split(";")):
        if not item:
            continue
        nid, sep, state = (s.strip() for s in item.partition("="))
        if not sep or not nid:
            raise ValueError(f"transition {item!r} is not of the form id=state")
        if state not in STATES:
            raise ValueError(
                f"transition {item!r}: unknown state {state!r} (expected one of {STATES})"
            )
        if tree is not None and nid not in tree.nodes:
            raise ValueError(f"transition {item!r}: unknown node id {nid!r}")
        if nid in changes:
            raise ValueError(f"transition {item!r}: node {nid!r} listed twice")
        changes[nid] = state
    return changes


# ---------------------------------------------------- hierarchical validity
def _allowed_parent_states(child_states: list[str]) -> str:
    if all(s == COMPLETED for s in child_states):
        return COMPLETED
    if all(s == NOT_STARTED for s in child_states):
        return NOT_STARTED
    return IN_PROGRESS


def check_state(tree: DSTTree, state: dict[str, str]) -> list[str]:
    """Problems that make ``state`` an invalid tree state (empty list = valid)."""
    problems = []
    missing = [nid for nid in tree.order if nid not in state]
    if missing:
        problems.append(f"missing nodes: {', '.join(missing)}")
    unknown = [nid for nid in state if nid not in tree.nodes]
    if unknown:
        problems.append(f"unknown nodes: {', '.join(unknown)}")
    bad = [nid for nid, s in state.items() if s not in STATES]
    if bad:
        problems.append(f"unknown states on: {', '.join(bad)}")
    if problems:
        return problems
    for nid in tree.order:
        node = tree.nodes[nid]
        if node.children:
            want = _allowed_parent_states([state[c] for c in node.children])
            if state[nid] != want:
                problems.append(f"{nid} is {state[nid]} but its children imply {want}")
    return problems


def repair_state(
    tree: DSTTree, state: dict[str, str], weights: dict[str, float] | None = None
) -> dict[str, str]:
    """The valid tree state that differs from ``state`` on the fewest nodes.

    Exact dynamic programme over the tree: for every node and candidate state, the least total
    cost of changed nodes in its subtree; changing a node costs ``weights[node]`` (default 1).
    Streaming inference gives the nodes the model just updated a large weight, so a partial
    update ("1.2.1=in_progress" without its parents) is completed rather than undone. Unknown ids
    are dropped; missing ids or unknown states count as "no opinion" (any state costs 0). Ties
    prefer the given state, then not_started < in_progress < completed. A valid input has cost 0
    and is returned unchanged.
    """
    weights = weights or {}
    best: dict[str, dict[str, tuple[int, dict[str, str]]]] = {}
    for nid in reversed(tree.order):  # children come after their parent in file order
        node = tree.nodes[nid]
        given = state.get(nid)
        options = {}
        for s in STATES:
            own = 0 if given not in STATES or given == s else weights.get(nid, 1)
            sub = _best_children(node.children, s, best) if node.children else (0, {})
            options[s] = (own + sub[0], {nid: s, **sub[1]})
        best[nid] = options
    out: dict[str, str] = {}
    for nid in tree.order:
        if tree.nodes[nid].parent is None:
            given = state.get(nid)
            pick = min(STATES, key=lambda s: (best[nid][s][0], s != given, STATES.index(s)))
            out.update(best[nid][pick][1])
    return {nid: out[nid] for nid in tree.order}


def _best_children(children, parent_state, best) -> tuple[int, dict[str, str]]:
    """Cheapest assignment of ``children`` compatible with ``parent_state``."""
    if parent_state in (COMPLETED, NOT_STARTED):
        cost, assign = 0, {}
        for c in children:
            cost += best[c][parent_state][0]
            assign.update(best[c][parent_state][1])
        return cost, assign
    # in_progress: not all completed and not all not_started. DP over children with two flags:
    # (some child is not completed, some child is not not_started).
    table: dict[tuple[bool, bool], tuple[int, dict[str, str]]] = {(False, False): (0, {})}
    for c in children:
        nxt: dict[tuple[bool, bool], tuple[int, dict[str, str]]] = {}
        for (not_all_c, not_all_ns), (cost, assign) in table.items():
            for s in STATES:
                key = (not_all_c or s != COMPLETED, not_all_ns or s != NOT_STARTED)
                cand = (cost + best[c][s][0], {**assign, **best[c][s][1]})
                if key not in nxt or cand[0] < nxt[key][0]:
                    nxt[key] = cand
        table = nxt
    return table.get((True, True), (math.inf, {}))


# ------------------------------------------------------------------ reading
def _level_of(raw_type: str) -> str | None:
    t = raw_type.strip().lower()
    return t if t in LEVELS else None


def _id_style(nid: str) -> str | None:
    if _NUMERIC_ID.match(nid):
        return "numeric"
    if _LETTER_ID.match(nid):
        return "letter"
    return None


def _parse_time(text: str) -> float | None:
    text = text.strip()
    if text == "":
        return None
    value = float(text)  # ValueError handled by the caller
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


@dataclass
class _Row:
    line: int
    level: str
    id: str
    start: float | None
    end: float | None
    name: str


def read_dst_tsv(
    path: str | Path, span_policy: str = "repair"
) -> tuple[DSTTree | None, list[Issue]]:
    """Read one annotation file. Returns ``(tree, issues)``; ``tree`` is None when any issue is an
    error. Never raises for bad content (see :func:`load_dst_tsv` for the raising form).

    ``span_policy`` — children outside their parent's annotated span:
    ``error`` reports an error; ``repair`` warns and takes the hull of the children as the
    parent's span; ``clip`` warns and clips the children into the parent's span.
    """
    if span_policy not in SPAN_POLICIES:
        raise ValueError(f"span_policy must be one of {SPAN_POLICIES}, got {span_policy!r}")
    path = Path(path)
    src = str(path)
    issues: list[Issue] = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, [Issue(src, None, f"cannot read DST file: {e.strerror or e}")]
    try:
        text = raw.decode("utf-8-sig")  # a leading BOM is not part of the header
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return None, [Issue(src, line, f"not UTF-8 (byte {e.start})")]
    rows = _parse_rows(src, text, issues)
    if any(i.severity == "error" for i in issues):
        return None, issues
    nodes = _build_nodes(src, rows, issues)
    if any(i.severity == "error" for i in issues):  # later checks on a partial tree mislead
        return None, issues
    tree_nodes = _resolve_spans(src, nodes, span_policy, issues)
    _check_overlaps(src, tree_nodes, issues)
    if any(i.severity == "error" for i in issues):
        return None, issues
    return DSTTree(list(tree_nodes.values()), src), issues


def load_dst_tsv(path: str | Path, span_policy: str = "repair") -> DSTTree:
    """Like :func:`read_dst_tsv` but raises :class:`DSTFormatError` listing every error."""
    tree, issues = read_dst_tsv(path, span_policy)
    if tree is None:
        errors = [str(i) for i in issues if i.severity == "error"]
        raise DSTFormatError("invalid DST annotation:\n  " + "\n  ".join(errors))
    return tree


def _parse_rows(src: str, text: str, issues: list[Issue]) -> list[_Row]:
    # only \n (and \r\n) end a line: str.splitlines() also splits on form feeds, \x1c-\x1e,
    # \x85 and U+2028/9, which a name may hold, and every later line number would be off
    lines = [x.removesuffix("\r") for x in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        issues.append(Issue(src, None, "empty file (expected a header row)"))
        return []
    header = [h.strip().lower() for h in lines[0].split("\t")]
    if header != HEADER:
        issues.append(Issue(src, 1, f"header must be {'<TAB>'.join(HEADER)!r}, got {lines[0]!r}"))
        return []
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        cells = line.split("\t")  # no quoting in this format: a quote is part of the text
        if all(not c.strip() for c in cells):
            continue
        if len(cells) != 5:
            issues.append(Issue(src, lineno, f"expected 5 tab-separated fields, got {len(cells)}"))
            continue
        longest = max(range(5), key=lambda k: len(cells[k]))
        if len(cells[longest]) > MAX_CELL_CHARS:
            issues.append(
                Issue(
                    src,
                    lineno,
                    f"field {HEADER[longest]} has {len(cells[longest])} characters "
                    f"(at most {MAX_CELL_CHARS})",
                )
            )
            continue
        raw_type, nid, start, end, name = cells
        level = _level_of(raw_type)
        if level is None:
            issues.append(
                Issue(src, lineno, f"unknown node type {raw_type!r} (step/substep/action)")
            )
            continue
        try:
            t0, t1 = _parse_time(start), _parse_time(end)
        except ValueError:
            issues.append(
                Issue(
                    src,
                    lineno,
                    f"timestamps must be non-negative numbers or empty, "
                    f"got start={start!r} end={end!r}",
                )
            )
            continue
        if t0 is not None and t1 is not None and t1 < t0:
            issues.append(Issue(src, lineno, f"end_ts {t1} is before start_ts {t0}"))
            continue
        rows.append(_Row(lineno, level, nid.strip(), t0, t1, name.strip()))
    if not rows and not issues:
        issues.append(Issue(src, None, "no nodes (only a header)"))
    return rows


def _build_nodes(src: str, rows: list[_Row], issues: list[Issue]) -> dict[str, _Row]:
    """Check ids, types, parents, order and duplicates; return rows keyed by id."""
    by_id: dict[str, _Row] = {}
    styles: dict[str, int] = {}  # id style -> line of its first row
    open_parent: dict[str, str | None] = {"step": None, "substep": None}  # last step/substep seen
    for row in rows:
        style = _id_style(row.id)
        if style is None:
            issues.append(
                Issue(
                    src,
                    row.line,
                    f"malformed id {row.id!r} (expected 1, 1.2, 1.2.3 or S1, S1.2, S1.2.a)",
                )
            )
            continue
        if styles and style not in styles:
            first_style, first_line = next(iter(styles.items()))
            issues.append(
                Issue(
                    src,
                    row.line,
                    f"id {row.id!r} is in the other id style than line {first_line} "
                    f"({first_style}); one file uses one style (1.2.3 or S1.2.a)",
                )
            )
        styles.setdefault(style, row.line)
        depth = row.id.count(".")
        if LEVELS[depth] != row.level:
            issues.append(
                Issue(
                    src,
                    row.line,
                    f"id {row.id!r} is a {LEVELS[depth]} id but the row type is {row.level}",
                )
            )
            continue
        if row.id in by_id:
            issues.append(
                Issue(
                    src, row.line, f"duplicate id {row.id!r} (first on line {by_id[row.id].line})"
                )
            )
            continue
        parent = row.id.rsplit(".", 1)[0] if depth else None
        if parent is not None:
            if parent not in by_id:
                issues.append(
                    Issue(src, row.line, f"parent {parent!r} of {row.id!r} is not defined above it")
                )
                continue
            if open_parent[LEVELS[depth - 1]] != parent:
                issues.append(
                    Issue(
                        src,
                        row.line,
                        f"{row.id!r} is out of order: it belongs under "
                        f"{parent!r} but follows "
                        f"{open_parent[LEVELS[depth - 1]]!r}",
                    )
                )
                continue
        if row.level == "step":
            open_parent.update(step=row.id, substep=None)
        elif row.level == "substep":
            open_parent["substep"] = row.id
        if row.level == "action" and (row.start is None or row.end is None):
            issues.append(
                Issue(
                    src,
                    row.line,
                    f"action {row.id!r} has an empty timestamp (only parents may leave them empty)",
                )
            )
            continue
        by_id[row.id] = row
    for nid, row in by_id.items():
        if row.level != "action" and not any(c.rsplit(".", 1)[0] == nid for c in by_id if "." in c):
            issues.append(Issue(src, row.line, f"{row.level} {nid!r} has no children"))
    return by_id


def _resolve_spans(
    src: str, rows: dict[str, _Row], policy: str, issues: list[Issue]
) -> dict[str, DSTNode]:
    """Turn rows into nodes with effective spans (bottom-up), applying ``policy``."""
    nodes: dict[str, DSTNode] = {}
    for nid, row in rows.items():
        parent = nid.rsplit(".", 1)[0] if "." in nid else None
        nodes[nid] = DSTNode(
            nid, row.level, row.name, row.start or 0.0, row.end or 0.0, row.line, parent
        )
        if parent is not None:
            nodes[parent].children.append(nid)
    for nid in reversed(list(rows)):  # children before parents
        node, row = nodes[nid], rows[nid]
        if not node.children:
            continue
        kids = [nodes[c] for c in node.children]
        lo, hi = min(k.start for k in kids), max(k.end for k in kids)
        a_lo = row.start if row.start is not None else lo
        a_hi = row.end if row.end is not None else hi
        if lo < a_lo or hi > a_hi:
            msg = (
                f"children of {nid!r} span [{lo:g}, {hi:g}] s, outside its annotated span "
                f"[{a_lo:g}, {a_hi:g}] s"
            )
            if policy == "error":
                issues.append(Issue(src, row.line, msg))
            elif policy == "clip":
                issues.append(Issue(src, row.line, msg + " (children clipped)", "warning"))
                for k in kids:
                    _clip_subtree(nodes, k.id, a_lo, a_hi)
                lo, hi = min(k.start for k in kids), max(k.end for k in kids)
            else:
                issues.append(Issue(src, row.line, msg + " (parent span widened)", "warning"))
        node.start, node.end = lo, hi
    return nodes


def _clip_subtree(nodes: dict[str, DSTNode], nid: str, lo: float, hi: float) -> None:
    node = nodes[nid]
    node.start = min(max(node.start, lo), hi)
    node.end = min(max(node.end, lo), hi)
    for c in node.children:
        _clip_subtree(nodes, c, lo, hi)


def _check_overlaps(src: str, nodes: dict[str, DSTNode], issues: list[Issue]) -> None:
    """Overlapping sibling actions are legal for the state rules but usually an LLM slip: warn."""
    for node in nodes.values():
        kids = sorted((nodes[c] for c in node.children if nodes[c].is_leaf), key=lambda n: n.start)
        for a, b in zip(kids, kids[1:], strict=False):
            if b.start < a.end:
                issues.append(
                    Issue(
                        src,
                        b.line,
                        f"action {b.id!r} starts at {b.start:g} s, before "
                        f"sibling {a.id!r} ends at {a.end:g} s",
                        "warning",
                    )
                )
