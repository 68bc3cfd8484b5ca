"""
Grade a submission with this repository's tests, the grader-only oracles included: for instructors.

    python tests/grade.py SUBMISSION [--seeds 1234]   # SUBMISSION: a student's copy; its five model files are graded
    python tests/grade.py --seeds 0-199               # no submission: the original solutions, seed after seed

It writes a fresh copy of this repository to a temporary folder (solutions in, tests/test_oracles.py included),
puts the submission's blanked functions (and any helpers it added) into attention.py, ssm.py, rmt.py, titans.py
and hrm.py in place of the solutions, and runs the five files' tests, tests/test_cores.py and
tests/test_oracles.py once per seed with GRADE_SEED set (tests/conftest.py). So the tests, the reference loops
and everything else that grades are this repository's, not copies a student may have edited; it warns when a
submission changed its files outside the blanked functions. Tests that draw nothing from GRADE_SEED
(tests/test_cores.py, training, sizes, configs) run at the first seed only. With no submission it is the check
that no correct solution fails at any seed. It exits non-zero when a test failed at any seed.
"""
import argparse
import ast
import concurrent.futures
import difflib
import os
import shutil
import subprocess
import sys
import tempfile

import make_assignment as ma

TESTS = [f"tests/test_{m}.py" for m in ma.MODULES] + ["tests/test_oracles.py", "tests/test_cores.py"]
SEEDLESS = ("not trains_on_a_bench_task and not memory_does_not_grow and not dt_init and not state_size "
            "and not bad_config")


def seeds(text):
    """"1234", "0-199" or "1,5,9" -> a list of ints."""
    out = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


def core_spans(text, original, module):
    """{"Class.function": (first line, last line)} of the blanked functions in text, 1-based, decorators in."""
    cores = {name.split(".", 1)[1] for _, _, name in ma.regions(original.splitlines(keepends=True), module)}
    spans = {}
    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name in cores:
                    spans[name] = (min([child.lineno] + [d.lineno for d in child.decorator_list]), child.end_lineno)
                visit(child, name + ".")
    visit(ast.parse(text), "")
    missing = cores - set(spans)
    if missing:
        raise SyntaxError(f"no {', '.join(sorted(missing))} in the submission")
    return spans


def names(node):
    """The top-level names a statement defines."""
    found = {getattr(node, "name", None)} | {a.asname or a.name.split(".")[0] for a in getattr(node, "names", [])}
    found |= {t.id for t in ast.walk(node) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
    return found - {None}


def splice(original, submitted, module):
    """The original file with its blanked functions replaced by the submission's, and the submission's own new
    top-level definitions (helpers, imports) appended: everything else, the reference loops included, is ours."""
    lines, theirs = original.splitlines(keepends=True), submitted.splitlines(keepends=True)
    their_spans = core_spans(submitted, original, module)
    for name, (a, b) in sorted(core_spans(original, original, module).items(), key=lambda item: -item[1][0]):
        c, d = their_spans[name]
        lines[a - 1:b] = theirs[c - 1:d]
    ours = set().union(*(names(node) for node in ast.parse(original).body))
    added = [node for node in ast.parse(submitted).body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom, ast.Assign))
             and not names(node) & ours]
    extra = "".join("\n\n" + "".join(theirs[n.lineno - 1:n.end_lineno]) for n in added)
    return "".join(lines) + (f"\n\n# ---- added by the submission{extra}" if added else "")


def changes_outside_cores(original, submitted, module):
    """Line numbers of the submission that differ from the student copy outside the blanked functions."""
    blanked = ma.blank(original, module).splitlines()
    lines = submitted.splitlines()
    spans = list(core_spans(submitted, original, module).values())
    outside = []
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, blanked, lines, autojunk=False).get_opcodes():
        if tag != "equal":
            changed = range(j1 + 1, max(j2, j1 + 1) + 1)
            outside += [n for n in changed if not any(a <= n <= b for a, b in spans) and n <= len(lines)]
    return outside


def main():
    parser = argparse.ArgumentParser(description="Grade a submission (or the original solutions) over seeds.")
    parser.add_argument("submission", nargs="?", help="a student's copy; none: the original solutions")
    parser.add_argument("--seeds", type=seeds, default=seeds(os.environ.get("GRADE_SEED") or "1"),
                        help="GRADE_SEED values: 1234, 0-199 or 1,5,9 (default: $GRADE_SEED or 1)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds graded at once (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and say where it is")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="grade-")
    repo = os.path.join(work, "repo")
    ma.make_assignment(repo, only=set())                       # everything in, nothing blanked
    shutil.copy(os.path.join(ma.ROOT, "tests", "test_oracles.py"), os.path.join(repo, "tests"))
    if args.submission:
        for module in ma.MODULES:
            path = os.path.join(args.submission, module + ".py")
            if not os.path.exists(path):
                sys.exit(f"grade: {path} does not exist")
            with open(path) as f, open(os.path.join(ma.ROOT, module + ".py")) as g:
                submitted, original = f.read(), g.read()
            try:
                outside = changes_outside_cores(original, submitted, module)
                graded = splice(original, submitted, module)
            except SyntaxError as e:
                print(f"warning: {module}.py: {e}; graded as it is")
                outside, graded = [], submitted
            if outside:
                print(f"warning: {module}.py differs from the hand-out outside its blanked functions, at lines "
                      f"{', '.join(map(str, outside[:10]))}{' ...' if len(outside) > 10 else ''}; those changes "
                      f"are not graded (this repository's version is)")
            with open(os.path.join(repo, module + ".py"), "w") as f:
                f.write(graded)
    def grade(i):
        tests, only = (TESTS, []) if i == 0 else (TESTS[:-1], ["-k", SEEDLESS])
        env = {**os.environ, "GRADE_SEED": str(args.seeds[i]), "COLUMNS": "400"}   # COLUMNS: whole failure lines
        if args.jobs > 1:
            env["OMP_NUM_THREADS"] = "1"
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tb=line", "-rf", *only,
                               *tests], cwd=repo, capture_output=True, text=True, env=env)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for seed, run in zip(args.seeds, pool.map(grade, range(len(args.seeds)))):
            lines = run.stdout.strip().splitlines()
            print(f"GRADE_SEED={seed}: {lines[-1].strip('= ') if lines else run.stderr.strip()[-300:]}", flush=True)
            if run.returncode:
                failed.append(seed)
                for line in lines:
                    if line.startswith("FAILED"):
                        print("  " + line[:600])
    print(f"{len(args.seeds) - len(failed)} of {len(args.seeds)} seeds passed every test"
          + (f"; failed at {', '.join(map(str, failed))}" if failed else ""))
    if args.keep:
        print(f"the graded copy: {repo}")
    else:
        shutil.rmtree(work)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
