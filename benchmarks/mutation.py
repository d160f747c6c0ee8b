"""Mutation pass over the core: the share of small code changes that the unit tests catch.

    python benchmarks/mutation.py [--files credit sde rollout] [--shard i/n] [--limit N]
                                  [--rerun survived|all] [--timeout S] [--list] [--no-fork]
                                  [--tests FOLDER --suite-label NAME] [--out FILE]

A benchmark of the test suite, not a test. Each target file (``tpgrpo/<name>.py``) is parsed with
`ast`, and every mutant is one small change to it: a comparison swapped (``<`` to ``<=`` or
``>=`` ...), an arithmetic or bitwise operator swapped (``+``/``-``, ``*``/``/``, ``&``/``|`` ...),
``and``/``or`` swapped, a unary ``-``/``not``/``~`` removed, a number ``c`` turned into ``c+1``,
``0`` or ``1``, ``True``/``False`` flipped, or a keyword argument of a call dropped. Strings,
docstrings, ``raise`` statements (error messages), annotations and ``device=`` arguments (every
test runs on the CPU, where they change nothing) are left alone.

For each mutant the mutated module is written into a private copy of the ``tpgrpo`` package, put
first on ``sys.path``, and the target's test files run with ``pytest -x`` (the copy's
``tpgrpo.__file__`` is checked): first the fast ones, then, for a mutant they let through,
tests/test_step.py (one whole rollout and update on the tiny model, about 10 s). A mutant whose
tests fail, error or time out is killed; one whose tests all pass survived. By default each
mutant runs in a process forked from this one after the heavy libraries are imported (saves
their import per mutant); ``--no-fork`` starts a fresh interpreter instead.

Results merge into ``benchmarks/results/mutation.json`` (per file its path; per mutant: line,
kind, original, mutated, status, the test that killed it, and the suite it ran against; a rerun
keeps the earlier outcomes under ``previous``). A recorded mutant is not run again unless
``--rerun`` says so, so the pass can run in chunks (``--limit``, ``--shard i/n``). A mutant's id
depends only on the top-level function (or class) that holds it: when a target changes, the
records of changed functions are dropped and the others kept. ``--tests`` measures the test
files of another folder (an older version of the suite, with its conftest.py). Prints one line:
killed/total per file and overall.
"""
from __future__ import annotations

import argparse
import ast
import copy
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after the mutated copies, which go first
from benchmarks.cpuinfo import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"
SLOW_TESTS = ["tests/test_step.py"]
# fast test files per target (those that import it, directly or through the rollout), then the slow stage
TARGETS = {
    "credit": ["tests/test_credit.py"],
    "sde": ["tests/test_sde.py", "tests/test_rollout.py"],
    "rollout": ["tests/test_rollout.py"],
}
PYTEST_ARGS = ["-x", "-q", "-rfE", "-p", "no:cacheprovider"]
HARNESS_FAILURE = 90  # the tests did not import the mutated copy: stop, nothing measured would be true

COMPARISON_SWAPS = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
OPERATOR_SWAPS = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.FloorDiv: (ast.Div,),
    ast.Mod: (ast.FloorDiv,),
    ast.Pow: (ast.Mult,),
    ast.BitAnd: (ast.BitOr,),
    ast.BitOr: (ast.BitAnd,),
}
REMOVABLE_UNARY = (ast.USub, ast.Not, ast.Invert)
UNMUTATED_KEYWORDS = {"device"}


@dataclass
class Mutant:
    id: str
    file: str
    line: int
    kind: str
    original: str
    mutated: str
    index: int  # position of the mutated node in `_mutable_nodes` order
    variant: int  # which of the node's mutations


# ------------------------------------------------------------------------------ generating mutants
def _mutable_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, in a fixed order, outside raise statements, f-strings and annotations."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.ImportFrom, ast.Import)):
            return
        found.append(node)
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "decorator_list"):
                continue
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.AST):
                    visit(child)

    visit(tree)
    return found


def _number_variants(value: float) -> list[float]:
    out = [value + 1]
    out += [v for v in (0, 1) if v != value and v not in out]
    return [type(value)(v) if isinstance(value, float) else v for v in out]


def _variants(node: ast.AST) -> list[tuple[str, callable]]:
    """(kind, function applying the change to a copy of ``node`` in place) for each mutant of ``node``."""
    out = []
    if isinstance(node, ast.Compare):
        for k, op in enumerate(node.ops):
            for new in COMPARISON_SWAPS.get(type(op), ()):
                out.append(("comparison", lambda n, k=k, new=new: n.ops.__setitem__(k, new())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)):
        for new in OPERATOR_SWAPS.get(type(node.op), ()):
            out.append(("operator", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append(("boolean", lambda n, new=new: setattr(n, "op", new())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, REMOVABLE_UNARY):
        out.append(("unary removed", None))  # replaced by its operand, see `_apply`
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append(("boolean constant", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        for value in _number_variants(node.value):
            out.append(("number", lambda n, value=value: setattr(n, "value", value)))
    elif isinstance(node, ast.Call):
        for k, keyword in enumerate(node.keywords):
            if keyword.arg is not None and keyword.arg not in UNMUTATED_KEYWORDS:
                out.append((f"keyword {keyword.arg}= dropped", lambda n, k=k: n.keywords.pop(k)))
    return out


def _apply(tree: ast.AST, index: int, variant: int) -> tuple[str, str]:
    """Mutate ``tree`` in place; returns the changed expression before and after, unparsed."""
    nodes = _mutable_nodes(tree)
    node = nodes[index]
    before = ast.unparse(node)
    kind, change = _variants(node)[variant]
    if change is None:  # a unary operator removed: the parent's reference to the node becomes the operand
        for parent in nodes:
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                elif isinstance(value, list) and any(item is node for item in value):
                    value[[item is node for item in value].index(True)] = node.operand
        return before, ast.unparse(node.operand)
    change(node)
    return before, ast.unparse(node)


def _units(tree: ast.Module) -> list[tuple[str, int]]:
    """For each node of `_mutable_nodes` order, the text of the top-level statement (function, class, ...)
    that holds it and the node's position inside that statement."""
    out = [("", 0)]  # the module node itself
    for statement in tree.body:
        text = ast.unparse(statement)
        out += [(text, k) for k in range(len(_mutable_nodes(statement)))]
    return out


def mutants_of(name: str, source: str) -> tuple[list[Mutant], dict[str, str]]:
    """All mutants of ``tpgrpo/<name>.py`` and their mutated sources, keyed by id.

    The id depends only on the function (or class, or other top-level statement) that holds the
    mutant, so an edit elsewhere in the file leaves it, and its recorded result, in place.
    """
    tree = ast.parse(source)
    baseline = ast.unparse(tree)
    units = _units(tree)
    out, sources = [], {}
    for index, node in enumerate(_mutable_nodes(tree)):
        for variant, (kind, _) in enumerate(_variants(node)):
            mutated_tree = copy.deepcopy(tree)
            before, after = _apply(mutated_tree, index, variant)
            text = ast.unparse(mutated_tree)
            if text == baseline or text in sources.values():
                continue
            unit, position = units[index]
            digest = hashlib.sha1(f"{unit}\n{position}:{variant}".encode()).hexdigest()[:10]
            mutant = Mutant(f"{name}-{digest}", f"tpgrpo/{name}.py", node.lineno, kind, before, after, index, variant)
            out.append(mutant)
            sources[mutant.id] = text
    return out, sources


# --------------------------------------------------------------------------------- running tests
def _pytest_in_this_process(package_root: str, module: str, test_files: list[str], extra: list[str] = ()) -> int:
    """Run pytest on ``test_files`` against the package copy at ``package_root``; returns its exit code."""
    sys.path.insert(0, package_root)
    import importlib

    target = importlib.import_module(f"tpgrpo.{module}")
    if not target.__file__.startswith(package_root):
        print(f"MUTATION-HARNESS: tpgrpo.{module} came from {target.__file__}, not the copy", flush=True)
        return HARNESS_FAILURE
    import pytest

    return int(pytest.main([*test_files, *PYTEST_ARGS, *extra]))


def _run_forked(
    package_root: str, module: str, test_files: list[str], extra: list[str], timeout: float, log: Path
) -> tuple[int | None, str]:
    pid = os.fork()
    if pid == 0:  # child: its own process group, so a timeout can end whatever it started
        code = 99
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = _pytest_in_this_process(package_root, module, test_files, extra)
        except BaseException as error:  # noqa: BLE001 (a mutant may break the import itself)
            print(f"MUTATION-HARNESS: {type(error).__name__}: {error}", flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), log.read_text(errors="replace")
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, log.read_text(errors="replace")
        time.sleep(0.05)


def _run_subprocess(
    package_root: str, module: str, test_files: list[str], extra: list[str], timeout: float, log: Path
) -> tuple[int | None, str]:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import mutation; "
        f"sys.exit(mutation._pytest_in_this_process({package_root!r}, {module!r}, {test_files!r}, {extra!r}))"
    )
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        try:
            return process.wait(timeout=timeout), log.read_text(errors="replace")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None, log.read_text(errors="replace")


def _first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if found:  # named as in tests/, also when --tests took the files from another folder
        path, _, test = found.group(1).partition("::")
        return f"tests/{Path(path).name}::{test}"
    harness = re.search(r"^MUTATION-HARNESS: (.*)$", output, re.M)
    return harness.group(1)[:200] if harness else "pytest exit code without a named test"


class Runner:
    """A private copy of the package; runs a module's test stages with one mutated file in it."""

    def __init__(self, fork: bool, timeout: float | None, tests: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="tpgrpo-mutation-"))
        shutil.copytree(ROOT / "tpgrpo", self.folder / "tpgrpo", ignore=shutil.ignore_patterns("__pycache__"))
        self.log = self.folder / "pytest.log"
        self.run = _run_forked if fork else _run_subprocess
        self.fixed_timeout = timeout
        self.timeouts: dict[tuple[str, ...], float] = {}
        self.tests = tests.resolve()
        # test files from another folder (an older version of the suite) still take this repository's pytest settings
        elsewhere = self.tests != ROOT / "tests"
        self.extra = ["-c", str(ROOT / "setup.cfg"), "--rootdir", str(self.tests)] if elsewhere else []

    def source(self, module: str) -> str:
        return (self.folder / "tpgrpo" / f"{module}.py").read_text()

    def stages(self, module: str) -> list[list[str]]:
        return [[str(self.tests / Path(f).name) for f in files] for files in (TARGETS[module], SLOW_TESTS)]

    def baseline(self, module: str) -> None:
        """The unmutated copy must pass every stage; their times set the per-mutant timeouts."""
        for files in self.stages(module):
            start = time.monotonic()
            code, output = self.run(str(self.folder), module, files, self.extra, 600, self.log)
            seconds = time.monotonic() - start
            if code != 0:
                sys.exit(f"the unmutated tests fail ({' '.join(files)}), fix the tree first:\n{output[-3000:]}")
            self.timeouts[tuple(files)] = self.fixed_timeout or 3 * seconds + 15

    def test(self, module: str, mutated_source: str) -> dict:
        path = self.folder / "tpgrpo" / f"{module}.py"
        original = path.read_text()
        path.write_text(mutated_source)
        start = time.monotonic()
        try:
            for files in self.stages(module):
                code, output = self.run(str(self.folder), module, files, self.extra, self.timeouts[tuple(files)], self.log)
                if code is None:
                    named = " ".join("tests/" + Path(f).name for f in files)
                    return {"status": "timeout", "killed_by": named, "seconds": round(time.monotonic() - start, 1)}
                if code == HARNESS_FAILURE:
                    sys.exit(output[-3000:])
                if code != 0:
                    status = "killed" if code == 1 else "error"
                    seconds = round(time.monotonic() - start, 1)
                    return {"status": status, "killed_by": _first_failure(output), "seconds": seconds}
            return {"status": "survived", "killed_by": None, "seconds": round(time.monotonic() - start, 1)}
        finally:
            path.write_text(original)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ------------------------------------------------------------------------------------- results
def machine() -> dict:
    import pytest
    import torch

    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "pytest": pytest.__version__,
    }


def _short(value, limit: int = 160):
    """Long expressions (a dropped keyword shows the whole call) cut for the results file."""
    return value[: limit - 1] + "…" if isinstance(value, str) and len(value) > limit else value


def dumps(results: dict) -> str:
    """The results as JSON with one line per mutant (the file stays small and diffs stay readable)."""
    files = []
    for name, entry in results["files"].items():
        meta = json.dumps({k: v for k, v in entry.items() if k != "mutants"}, ensure_ascii=False)[1:-1]
        rows = ",\n".join(f"   {json.dumps(k)}: {json.dumps(r, ensure_ascii=False)}" for k, r in entry["mutants"].items())
        files.append(f'  {json.dumps(name)}: {{{meta}, "mutants": {{\n{rows}\n  }}}}')
    rest = {k: v for k, v in results.items() if k != "files"}
    head = json.dumps(rest, indent=1, ensure_ascii=False)[1:-2]
    text = "{\n \"files\": {\n" + ",\n".join(files) + "\n },\n" + head + "\n}\n"
    assert json.loads(text) == results
    return text


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"files": {}, "runs": []}


def summary(results: dict) -> tuple[str, dict]:
    parts, counts, total_killed, total = [], {}, 0, 0
    for name, entry in results["files"].items():
        records = entry["mutants"].values()
        killed = sum(r["status"] != "survived" for r in records)
        done = len(records)
        counts[name] = {"killed": killed, "run": done, "generated": entry["generated"]}
        share = f" ({100 * killed / done:.1f}%)" if done else ""
        pending = f", {entry['generated'] - done} not run" if done < entry["generated"] else ""
        parts.append(f"{name} {killed}/{done}{share}{pending}")
        total_killed, total = total_killed + killed, total + done
    share = f" ({100 * total_killed / total:.1f}%)" if total else ""
    counts["overall"] = {"killed": total_killed, "run": total}
    return f"mutation: {'; '.join(parts)}; overall {total_killed}/{total}{share} killed", counts


def _select(mutants: list[Mutant], entry: dict, args: argparse.Namespace) -> list[Mutant]:
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        mutants = [m for k, m in enumerate(mutants) if k % n == i - 1]
    recorded = entry["mutants"]
    if args.rerun == "all":
        chosen = mutants
    elif args.rerun == "survived":
        chosen = [m for m in mutants if recorded.get(m.id, {}).get("status") == "survived"]
    else:
        chosen = [m for m in mutants if m.id not in recorded]
    return chosen[: args.limit] if args.limit is not None else chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--shard", help="i/n: only every n-th mutant, starting at the i-th (1-based)")
    parser.add_argument("--limit", type=int, help="run at most this many mutants (per file)")
    parser.add_argument("--rerun", choices=["survived", "all"], help="run recorded mutants again")
    parser.add_argument("--timeout", type=float, help="seconds per test stage (default: 3× the unmutated run + 15 s)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-fork", action="store_true", help="a fresh interpreter per test run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--tests", type=Path, default=ROOT / "tests",
        help="folder of the test files (and their conftest.py) to measure, e.g. an older version of the suite",
    )
    parser.add_argument("--suite-label", help="how the results name the suite of --tests (default: its folder)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)

    if args.list:
        for name in args.files:
            for m in mutants_of(name, (ROOT / "tpgrpo" / f"{name}.py").read_text())[0]:
                print(f"{m.id} {m.file}:{m.line} [{m.kind}] {m.original}  ->  {m.mutated}")
        return

    sys.dont_write_bytecode = True  # no .pyc of mutated modules or rewritten tests anywhere
    if not args.no_fork:  # imported once here, inherited by every forked test run
        import lightning.pytorch  # noqa: F401
        import diffusers  # noqa: F401
        import numpy  # noqa: F401
        import pytest  # noqa: F401
        import torch  # noqa: F401
        assert "tpgrpo" not in sys.modules, "the parent must not import tpgrpo: the children import the mutated copy"

    results = load_results(args.out)
    runner = Runner(fork=not args.no_fork, timeout=args.timeout, tests=args.tests)
    started, ran = time.monotonic(), 0
    suite = args.suite_label or ("tests/" if runner.tests == ROOT / "tests" else str(args.tests))
    try:
        for name in args.files:
            source = runner.source(name)
            sha = hashlib.sha256(source.encode()).hexdigest()
            mutants, sources = mutants_of(name, source)
            entry = results["files"].setdefault(name, {"path": f"tpgrpo/{name}.py", "source_sha256": sha, "mutants": {}})
            if entry["source_sha256"] != sha:  # keep the records of mutants in unchanged functions
                current = {m.id: m for m in mutants}
                kept = {key: record for key, record in entry["mutants"].items() if key in current}
                for key, record in kept.items():
                    record["line"] = current[key].line
                print(f"{name}: the source changed; {len(entry['mutants']) - len(kept)} records of changed code dropped", flush=True)
                entry.update(source_sha256=sha, mutants=kept)
            entry.update(generated=len(mutants), tests=[*TARGETS[name], *SLOW_TESTS])
            chosen = _select(mutants, entry, args)
            if not chosen:
                continue
            runner.baseline(name)
            for m in chosen:
                outcome = runner.test(name, sources[m.id])
                record = {k: _short(v) for k, v in asdict(m).items() if k not in ("id", "file", "index", "variant")}
                earlier = entry["mutants"].get(m.id)
                if earlier is not None:  # a rerun keeps what the earlier suites did
                    previous = earlier.get("previous", [])
                    previous.append({k: earlier.get(k) for k in ("status", "killed_by", "suite")})
                    record["previous"] = previous
                entry["mutants"][m.id] = {**record, **outcome, "suite": suite}
                ran += 1
                print(f"{outcome['status']:8s} {m.file}:{m.line} {m.original} -> {m.mutated}  [{outcome['killed_by']}]", flush=True)
                args.out.write_text(dumps(results))
    finally:
        runner.close()
        line, counts = summary(results)
        results["summary"] = counts
        results["runs"].append({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/mutation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "mutants_run": ran,
            "summary_after": line,
            "seconds": round(time.monotonic() - started, 1),
            "machine": machine(),
        })
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(dumps(results))
        print(line)


if __name__ == "__main__":
    main()
