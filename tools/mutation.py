"""Mutation testing of dst_train: small plausible bugs, one at a time, against the tests.

    python tools/mutation.py                      # `make mutation`: coverage pass, then mutants
    python tools/mutation.py --per-package 40 --packages data,tune --reuse-coverage
    python tools/mutation.py --per-package 6 --files dst_train/data/collate.py,dst_train/ranks.py

How it works, and why this way (the suite takes ~20 min, so running all of it per mutant is out):
1. One coverage pass of the whole suite records which test ran which line of ``dst_train``, also
   inside the processes the tests start (deepspeed workers, CLI children): the
   ``mutation_contexts`` pytest plugin labels the data with the test's node id, and the test's
   seconds are kept.
2. Every mutant of the packages is listed (operators below), and a seeded sample of
   ``--per-package`` is drawn from each package, so one run takes about an hour on 2 cores.
   ``--files`` draws from each named file instead: a package's big modules get most of its
   sample, so its small ones (``stop_request.py``: one in five samples) are reached this way.
3. A sampled mutant on a line no test runs survives without running anything. Otherwise the source
   is mutated in a copy of the repository and the tests that ran that line are run there, fastest
   first, stopping at the first failure (``-x``): a failure or an error kills the mutant, a clean
   pass lets it survive, running past the time limit counts as killed (the mutant hung).
4. Mutants listed in ``tools/mutation_equivalent.txt`` (they cannot change behaviour) are left out
   of the score. The score is killed / (killed + survived) per package.

Operators: comparison flips (``<``/``<=``, ``>``/``>=``, ``==``/``!=``, ``is``/``is not``,
``in``/``not in``), ``+``/``-`` and ``*``/``/`` swaps (also augmented), ``and``/``or``, dropped
``not`` and unary minus, integer constants +1, ``True``/``False``. Messages are not mutated: nothing
inside f-strings, ``raise``, ``print``, logging or progress-bar calls.

Results: a table on stdout and ``benchmarks/results/mutation.json`` (every mutant, its outcome and
the tests run; the machine, versions and command).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import RESULTS, environment, table  # noqa: E402

TOP = "top"  # the modules directly in dst_train/ (config, cli, ranks, atomic_io)
PACKAGES = ("data", "model", "engine", "eval", "tune", "infer", TOP)
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.txt"
COVERAGE_RC = ROOT / "tools" / "mutation.coveragerc"

_COMPARE_FLIP = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.In: ast.NotIn, ast.NotIn: ast.In,
}  # fmt: skip
_BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_QUIET_CALLS = {"print", "debug", "info", "warning", "warn", "error", "exception", "write",
                "set_description", "set_postfix", "add_scalar"}  # fmt: skip


@dataclass
class Mutant:
    """One small change to one file: ``index`` counts the candidates in walk order."""

    path: str  # relative to the repository root
    index: int
    line: int
    col: int
    change: str  # e.g. "< -> <="
    status: str = "pending"  # killed | survived | timeout | no-tests | error
    tests: list[str] = field(default_factory=list)
    seconds: float = 0.0
    in_function: bool = True  # False: module or class level, run once at import

    @property
    def key(self) -> str:
        return f"{self.path}:{self.line}:{self.col} {self.change}"

    @property
    def package(self) -> str:
        parts = Path(self.path).parts
        return parts[1] if len(parts) > 2 else TOP


class _Mutator(ast.NodeTransformer):
    """Walks a module; lists every candidate, or applies the one numbered ``target``."""

    def __init__(self, target: int | None = None):
        self.target = target
        self.found: list[tuple[int, int, str, bool]] = []  # (line, col, change, in a function)
        self.depth = 0  # function nesting

    def _candidate(self, node: ast.AST, change: str) -> bool:
        """Record a candidate; True when it is the one to apply."""
        self.found.append((node.lineno, node.col_offset, change, self.depth > 0))
        return self.target == len(self.found) - 1

    # Subtrees that only build messages or types are left alone.
    def visit_JoinedStr(self, node):
        return node

    def visit_Raise(self, node):
        return node

    def visit_Assert(self, node):
        return node

    def visit_AnnAssign(self, node):
        node.value = self.visit(node.value) if node.value is not None else None
        return node

    def visit_arg(self, node):
        return node

    def visit_FunctionDef(self, node):
        node.args = self.visit(node.args)  # defaults: evaluated at import, module level
        self.depth += 1
        node.body = [self.visit(s) for s in node.body]
        self.depth -= 1
        return node  # neither the return annotation nor the decorators are visited

    def visit_ClassDef(self, node):
        node.body = [self.visit(s) for s in node.body]
        return node  # decorators (``@dataclass(frozen=True)``) are not behaviour under test

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node  # docstring
        return self.generic_visit(node)

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in _QUIET_CALLS:
            return node
        return self.generic_visit(node)

    def visit_Compare(self, node):
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            flip = _COMPARE_FLIP.get(type(op))
            if flip and self._candidate(node, f"op{i} {_sym(op)} -> {_sym(flip())}"):
                node.ops[i] = flip()
        return node

    def visit_BinOp(self, node):
        self.generic_visit(node)
        swap = _BINOP_SWAP.get(type(node.op))
        if swap and not _is_text(node.left) and not _is_text(node.right):
            if self._candidate(node, f"{_sym(node.op)} -> {_sym(swap())}"):
                node.op = swap()
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        swap = _BINOP_SWAP.get(type(node.op))
        if swap and self._candidate(node, f"{_sym(node.op)}= -> {_sym(swap())}="):
            node.op = swap()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._candidate(node, f"{_sym(node.op)} -> {_sym(other())}"):
            node.op = other()
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Not | ast.USub) and self._candidate(
            node, f"drop {_sym(node.op)}"
        ):
            return node.operand
        return node

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            if self._candidate(node, f"{value} -> {not value}"):
                return ast.copy_location(ast.Constant(not value), node)
        elif isinstance(value, int) and self._candidate(node, f"{value} -> {value + 1}"):
            return ast.copy_location(ast.Constant(value + 1), node)
        return node


def _sym(op: ast.AST) -> str:
    return {
        ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
        ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+",
        ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.And: "and", ast.Or: "or", ast.Not: "not",
        ast.USub: "-",
    }[type(op)]  # fmt: skip


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)
    )


def list_mutants(path: Path, tree: Path = ROOT) -> list[Mutant]:
    """Every candidate in one source file of ``tree``, skipping lines marked
    ``# pragma: no mutate``."""
    source = path.read_text()
    mutator = _Mutator()
    mutator.visit(ast.parse(source))
    lines = source.splitlines()
    rel = str(path.relative_to(tree))
    return [
        Mutant(rel, i, line, col, change, in_function=inside)
        for i, (line, col, change, inside) in enumerate(mutator.found)
        if "pragma: no mutate" not in lines[line - 1]
    ]


def mutated_source(path: Path, index: int) -> str:
    tree = ast.parse(path.read_text())
    tree = _Mutator(target=index).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


# ----------------------------------------------------------------------------- coverage pass
def run_coverage(workdir: Path, tests: list[str], append: bool = False) -> None:
    """``tests`` once under coverage, labelled per test (tools/mutation_contexts.py).
    ``append``: add to the data already there (tests written since the last pass)."""
    cov = workdir / "coverage"
    if not append:
        shutil.rmtree(cov, ignore_errors=True)
    cov.mkdir(parents=True, exist_ok=True)
    # ROOT on the path too: the pass measures this tree even when the venv's editable install
    # points at another checkout (a clone used so the main one can be edited meanwhile).
    path = os.pathsep.join([str(ROOT / "tools"), str(ROOT)])
    env = dict(os.environ, PYTHONPATH=path, COVERAGE_FILE=str(cov / ".coverage"))
    durations = cov / "durations.new.json"
    command = [sys.executable, "-m", "coverage", "run", f"--rcfile={COVERAGE_RC}", "-m", "pytest",
               "-q", "-p", "mutation_contexts", "--mutation-durations", str(durations),
               *tests]  # fmt: skip
    print("coverage pass:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=False)
    combine = [sys.executable, "-m", "coverage", "combine", "-q", f"--rcfile={COVERAGE_RC}"]
    subprocess.run(combine + (["--append"] if append else []), cwd=cov, env=env, check=True)
    merged = json.loads((cov / "durations.json").read_text()) if append else {}
    new = json.loads(durations.read_text())
    old_failed, new_failed = set(merged.pop("__failed__", [])), set(new.pop("__failed__", []))
    merged.update(new)
    merged["__failed__"] = sorted((old_failed - new.keys()) | new_failed)
    (cov / "durations.json").write_text(json.dumps(merged, indent=1))
    durations.unlink()


def load_coverage(workdir: Path) -> tuple[dict[str, dict[int, set[str]]], dict[str, float]]:
    """({file relative to root: {line: test ids}}, {test id: seconds}); failing tests left out."""
    import coverage

    cov = workdir / "coverage"
    data = coverage.CoverageData(str(cov / ".coverage"))
    data.read()
    durations = json.loads((cov / "durations.json").read_text())
    failed = set(durations.pop("__failed__", []))
    by_file: dict[str, dict[int, set[str]]] = {}
    for measured in data.measured_files():
        # named from the package folder on, so passes made in other clones (--add-coverage run
        # from a fresh one) land on the same files; their line data are merged
        parts = Path(measured).parts
        rel = "/".join(parts[len(parts) - 1 - parts[::-1].index("dst_train") :])
        by_line = by_file.setdefault(rel, {})
        for line, contexts in (data.contexts_by_lineno(measured) or {}).items():
            tests = {c for c in contexts if c and c not in failed}
            if tests:
                by_line.setdefault(line, set()).update(tests)
    return by_file, durations


# ----------------------------------------------------------------------------- mutant runs
def prepare_copy(workdir: Path) -> Path:
    """A copy of the working tree the mutants are written into (the venv is linked, not copied)."""
    copy = workdir / "tree"
    shutil.rmtree(copy, ignore_errors=True)
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", ".whl", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, copy, ignore=ignore)
    return copy


def run_mutant(mutant: Mutant, copy: Path, tests: list[str], limit_s: float) -> None:
    target = copy / mutant.path
    original = target.read_text()
    target.write_text(mutated_source(target, mutant.index))
    env = dict(os.environ, PYTHONPATH=str(copy))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=copy, env=env, capture_output=True, timeout=limit_s,
                              start_new_session=True)  # fmt: skip
        rc = proc.returncode
        # 3: pytest's internal error, raised by the mutant itself (code run at import that
        # exits); 4 and 5 (usage, nothing collected) are the tool's problems, not a verdict
        mutant.status = {0: "survived", 1: "killed", 2: "killed", 3: "killed"}.get(rc, "error")
    except subprocess.TimeoutExpired:
        mutant.status = "timeout"
    finally:
        target.write_text(original)
        _kill_leftovers(copy)
    mutant.seconds = round(time.perf_counter() - start, 1)


def _kill_leftovers(copy: Path) -> None:
    """Kill what a run left behind (a timed-out run's workers live in their own sessions): every
    process whose environment carries the copy's PYTHONPATH."""
    mark = f"PYTHONPATH={copy}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def collect(copy: Path) -> set[str]:
    """Node ids of the copy's tests: a test renamed or re-parametrized since the coverage pass
    is not asked for (pytest would stop with a usage error)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=copy, env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True,
    )  # fmt: skip
    return {line for line in proc.stdout.splitlines() if "::" in line}


def choose_tests(mutant: Mutant, lines: dict[int, set[str]], durations: dict[str, float],
                 budget_s: float, existing: set[str],
                 readers: set[str] = frozenset()) -> list[str]:  # fmt: skip
    """Tests that ran the mutated line, fastest first, within ``budget_s`` of their seconds. A
    line run at import (a constant, a default) is credited only to the first test that imported
    the module, so there every test that ran any line of the file is a candidate.

    ``readers``: tests that ran no line of ``dst_train`` themselves. They check what a shared
    (module- or session-scoped) fixture made, and that fixture's lines are credited to the first
    test that asked for it; so the readers in a chosen test's file are run with it (they cost
    about nothing: the fixture is built once in the same pytest process)."""
    ran = lines.get(mutant.line, set())
    if not mutant.in_function:
        # coverage credits a statement to its first line only: a constant inside a multi-line
        # table (the 3rd row of a tuple) has no line data of its own
        ran = set().union(*lines.values())
    tests = sorted((t for t in ran if t in existing), key=lambda t: (durations.get(t, 60.0), t))
    chosen, total = [], 0.0
    for test in tests:
        seconds = durations.get(test, 60.0)
        if chosen and total + seconds > budget_s:
            break
        chosen.append(test)
        total += seconds
    files = {t.split("::")[0] for t in chosen}
    return chosen + sorted(t for t in readers if t.split("::")[0] in files and t not in chosen)


def load_equivalent() -> dict[str, str]:
    """{mutant key: why it is equivalent} from tools/mutation_equivalent.txt."""
    out = {}
    if EQUIVALENT.exists():
        for raw in EQUIVALENT.read_text().splitlines():
            if raw.strip() and not raw.startswith("#"):
                key, _, why = raw.partition("  # ")
                out[key.strip()] = why.strip()
    return out


def stale_equivalents(equivalent: dict[str, str], tree: Path) -> list[str]:
    """The entries of ``equivalent`` that name no mutant of ``tree``: keys hold line numbers,
    so an edit above a listed line moves its mutant away from its entry."""
    keys = {m.key for p in PACKAGES for f in package_files(tree, p) for m in list_mutants(f, tree)}
    return [k for k in equivalent if k not in keys]


def package_files(tree: Path, package: str) -> list[Path]:
    if package == TOP:
        return sorted((tree / "dst_train").glob("*.py"))
    return sorted((tree / "dst_train" / package).rglob("*.py"))


def sample(groups: list[str], per_group: int, seed: int, tree: Path) -> list[Mutant]:
    """A seeded sample of ``per_group`` mutants from each group: a package name, or a file's path
    relative to the root (``dst_train/data/collate.py``)."""
    chosen = []
    for group in groups:
        files = [tree / group] if group.endswith(".py") else package_files(tree, group)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"--files: no such file {missing[0].relative_to(tree)}")
        every = [m for f in files for m in list_mutants(f, tree)]
        rng = random.Random(f"{seed}:{group}")
        picked = rng.sample(every, min(per_group, len(every)))
        chosen += sorted(picked, key=lambda m: (m.path, m.index))
        print(f"{group}: {len(every)} mutants, {len(picked)} sampled", flush=True)
    return chosen


def score(mutants: list[Mutant], equivalent: dict[str, str]) -> list[dict]:
    rows = []
    for package in sorted({m.package for m in mutants}):
        mine = [m for m in mutants if m.package == package and m.key not in equivalent]
        killed = sum(m.status in ("killed", "timeout") for m in mine)
        survived = sum(m.status in ("survived", "no-tests") for m in mine)
        rows.append({
            "package": package, "killed": killed, "survived": survived,
            "equivalent": sum(m.package == package and m.key in equivalent for m in mutants),
            "errors": sum(m.status == "error" for m in mine),
            "score": round(killed / max(killed + survived, 1), 3),
        })  # fmt: skip
    return rows


def write_results(args, mutants: list[Mutant], equivalent: dict, start: float) -> None:
    done = [m for m in mutants if m.status != "pending"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "environment": environment(), "seconds": round(time.perf_counter() - start),
        "per_package": args.per_package, "files": args.files, "seed": args.seed,
        "budget_s": args.budget_s,
        "finished": len(done) == len(mutants), "scores": score(done, equivalent),
        "mutants": [asdict(m) | {"key": m.key} for m in mutants],
    }, indent=1) + "\n")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", default=",".join(PACKAGES))
    parser.add_argument("--files", default=None,
                        help="comma-separated files (from the root) sampled each on its own, "
                        "instead of --packages")  # fmt: skip
    parser.add_argument("--per-package", type=int, default=30,
                        help="mutants sampled per package (per file with --files)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dst-mutation"))
    parser.add_argument("--reuse-coverage", action="store_true",
                        help="use the coverage pass already in --workdir")  # fmt: skip
    parser.add_argument("--add-coverage", nargs="+", default=None, metavar="TEST",
                        help="run these tests under coverage and add them to --workdir's pass "
                        "(tests written since), then mutate")  # fmt: skip
    parser.add_argument("--coverage-tests", nargs="+", default=["tests"], metavar="TEST",
                        help="the coverage pass's tests (default: the whole suite)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="seconds of (recorded) test time run per mutant")  # fmt: skip
    parser.add_argument("--only", nargs="*", default=None, help="run just these mutant keys")
    parser.add_argument("--out", type=Path, default=RESULTS / "mutation.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.add_coverage:
        run_coverage(args.workdir, args.add_coverage, append=True)
    elif not args.reuse_coverage:
        run_coverage(args.workdir, args.coverage_tests)
    by_file, durations = load_coverage(args.workdir)
    # the mutants come from the copy, so the working tree may change while they run
    copy = prepare_copy(args.workdir)
    groups = (args.files or args.packages).split(",")
    if args.only is not None:  # these mutants, sampled or not
        every = sample(groups, 10**9, args.seed, copy)
        mutants = [m for m in every if m.key in set(args.only)]
    else:
        mutants = sample(groups, args.per_package, args.seed, copy)
    equivalent = load_equivalent()
    for key in stale_equivalents(equivalent, copy):
        print(f"warning: {EQUIVALENT.name} names no mutant {key!r}: move it", flush=True)
    existing = collect(copy)
    readers = existing - set().union(*(t for f in by_file.values() for t in f.values()))
    for n, mutant in enumerate(mutants, 1):
        lines = by_file.get(mutant.path, {})
        mutant.tests = choose_tests(mutant, lines, durations, args.budget_s, existing, readers)
        if mutant.key in equivalent:
            mutant.status = "equivalent"
        elif not mutant.tests:
            mutant.status = "no-tests"
        else:
            limit = 3 * sum(durations.get(t, 60.0) for t in mutant.tests) + 120
            run_mutant(mutant, copy, mutant.tests, limit)
        print(f"[{n}/{len(mutants)}] {mutant.status:9s} {mutant.seconds:6.1f}s {mutant.key}",
              flush=True)  # fmt: skip
        write_results(args, mutants, equivalent, start)  # a stopped run keeps what it measured
    rows = score(mutants, equivalent)
    print(table(rows, ["package", "killed", "survived", "equivalent", "errors", "score"]))
    survivors = [m.key for m in mutants if m.status in ("survived", "no-tests")]
    print("survivors:\n  " + "\n  ".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
