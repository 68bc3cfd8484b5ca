"""
Make a student copy of this repository, with the vectorised cores blanked: the classroom mode.

    python tests/make_assignment.py DIR                 # DIR: a new (or empty) folder outside this repository
    python tests/make_assignment.py DIR --only ssm,rmt  # blank only these files' cores

Each region between a line `### BEGIN SOLUTION` and a line `### END SOLUTION` (nbgrader's markers, each alone on
its line) becomes `raise NotImplementedError("<file>.<function>: see the docstring, and the reading list at the top
of <file>.py")`, indented like the marker. Signatures, docstrings, the reference loops, the configs, the tasks, the
harness and the results stay, so in the copy `pytest` checks the students' work: every test that runs a blanked
core (its own tests, and those that train its model: compare.py's and the harness's) fails with NotImplementedError
until it is written, and everything else passes. The copy's README is the students': its "For instructors" section
becomes "The assignment". Left out: this script, tests/grade.py, and the tests that would hand an answer out
(tests/test_oracles.py spells the RMT step and HRM's cycles out); `python tests/grade.py SUBMISSION` grades with
them. Nothing is written in place (nor through a link into this repository), and nested or unmatched markers stop
it with one line before anything is written.
"""
import argparse
import glob
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SHIPPED = ["*.py", "harness/*.py", "tests/*.py", "README.md", "requirements.txt", "pytest.ini", ".gitignore", ".ci/run",
           "results/*", "results/*/*", "results/*/*/*"]
INSTRUCTOR_ONLY = ["tests/make_assignment.py", "tests/test_assignment.py", "tests/grade.py", "tests/test_oracles.py"]
MODULES = ["attention", "ssm", "rmt", "titans", "hrm"]
ASSIGNMENT = """## The assignment

In this copy the vectorised cores raise NotImplementedError: {names}.
Write each one from its docstring (shapes, equations, the reference loop beside it). `pytest
tests/test_<file>.py` checks it against that loop in float64 on several shapes; `pytest tests/test_cores.py -k
<file>` checks that it does the vectorised work itself: no call of the reference, no loop over time steps (a loop over
chunks is fine where the docstring has chunks), no (T, T) matrices where it has chunks, and every tensor on the
inputs' device. RMT, Titans and HRM run on `attention.Block`, so write `attention.attention` first. Until a
core is written, whatever runs its model stops with NotImplementedError naming it: its tests, the tests that train
models (tests/test_compare.py, tests/test_harness_*.py) and `python compare.py` (one line). The README mentions
`tests/make_assignment.py`, `tests/grade.py`, `tests/test_assignment.py`, `tests/test_oracles.py` and the
mutation tester's `setup.cfg`: your instructor keeps those.
"""


class MarkerError(ValueError):
    pass


def enclosing(lines, i, module):
    """`module.Class.function` of the innermost def (and its classes) around line i."""
    indent, names = len(lines[i]) - len(lines[i].lstrip()), []
    for line in reversed(lines[:i]):
        m = re.match(r"(\s*)(?:def|class)\s+(\w+)", line)
        if m and len(m.group(1)) < indent:
            names.insert(0, m.group(2))
            indent = len(m.group(1))
    return ".".join([module] + names)


def regions(lines, module):
    """The marked regions of a file, [(first line, last line, qualified name)], 0-based and inclusive of the
    markers. Raises MarkerError on a nested, unmatched or not-alone marker."""
    found, begin = [], None
    for i, line in enumerate(lines):
        text = line.strip()
        if text in (BEGIN, END):
            if (text == BEGIN) == (begin is not None):
                what = f"nested {BEGIN} (line {begin + 1} is still open)" if begin is not None else f"{END} without {BEGIN}"
                raise MarkerError(f"{module}.py:{i + 1}: {what}")
            if text == BEGIN:
                begin = i
            else:
                found.append((begin, i, enclosing(lines, begin, module)))
                begin = None
        elif "BEGIN SOLUTION" in text or "END SOLUTION" in text:
            raise MarkerError(f"{module}.py:{i + 1}: a solution marker must be alone on its line: {text!r}")
    if begin is not None:
        raise MarkerError(f"{module}.py:{begin + 1}: {BEGIN} without {END}")
    return found


def blank(text, module):
    """The student version of a file's text: each marked region replaced by one `raise` line."""
    lines = text.splitlines(keepends=True)
    for begin, end, name in reversed(regions(lines, module)):
        indent = lines[begin][:len(lines[begin]) - len(lines[begin].lstrip())]
        why = f"{name}: see the docstring, and the reading list at the top of {module}.py"
        lines[begin:end + 1] = [f'{indent}raise NotImplementedError("{why}")\n']
    return "".join(lines)


def student_readme(text, names, shipped):
    """The README of the copy: a line under its title saying so, the "For instructors" section replaced by the
    assignment, and the links to files that the copy does not ship turned into plain text."""
    assignment = ASSIGNMENT.format(names=", ".join(f"`{n}`" for n in names) or "none of the cores") + "\n"
    text = re.sub(r"^## For instructors\n.*?(?=^## |\Z)", lambda m: assignment, text, flags=re.S | re.M)
    title, rest = text.split("\n", 1)   # first, what differs from the repository the README describes
    text = f"{title}\n\n> A student copy: until the cores of [The assignment](#the-assignment) are written, " \
           f"what runs them (their tests, `python compare.py`, a model's own file) stops at the first one.\n{rest}"
    def link(m):
        target = m.group(2).split("#")[0]
        return m.group(0) if not target or "://" in target or target in shipped else m.group(1)
    return re.sub(r"!?\[([^\]]*)\]\(([^)\s]+)\)", link, text)


def make_assignment(dest, only=None):
    """Write the student copy to dest, blanking the cores of every file (or of the modules named in `only`);
    returns the names of the blanked functions."""
    dest = os.path.realpath(dest)                       # a link into this repository leads inside it
    if dest == ROOT or dest.startswith(ROOT + os.sep):
        raise MarkerError(f"{dest} is inside this repository; choose a folder outside it (nothing is written in place)")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise MarkerError(f"{dest} exists and is not an empty folder; choose a new folder for each copy")
    files = sorted({os.path.relpath(p, ROOT) for pattern in SHIPPED for p in glob.glob(os.path.join(ROOT, pattern))
                    if os.path.isfile(p)} - set(INSTRUCTOR_ONLY))
    student, blanked = {}, []
    for rel in files:                                   # check every file before writing any
        with open(os.path.join(ROOT, rel), "rb") as f:
            data = f.read()
        if rel.endswith(".py"):
            module = rel[:-3].replace(os.sep, ".")
            if only is None or module in only:
                text = data.decode()
                blanked += [name for _, _, name in regions(text.splitlines(keepends=True), module)]
                data = blank(text, module).encode()
        student[rel] = data
    student["README.md"] = student_readme(student["README.md"].decode(), blanked, set(files)).encode()
    for rel, data in student.items():
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        with open(os.path.join(dest, rel), "wb") as f:
            f.write(data)
        shutil.copymode(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return blanked


def parse_only(text):
    """--only's value, "ssm,rmt" or "ssm, rmt", as a set of module names; MarkerError on anything else (an empty
    item, a name twice: as compare.py's lists)."""
    names = [name.strip() for name in text.split(",")]
    if set(names) - set(MODULES) or len(set(names)) < len(names):
        raise MarkerError(f"expected a comma-separated list of {', '.join(MODULES)}, each once; got {text!r}")
    return set(names)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, never a traceback
        self.exit(2, f"make_assignment: {message}\n")


def only_type(text):
    """--only's argparse type: parse_only, with its one-line message."""
    try:
        return parse_only(text)
    except MarkerError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    p = Parser(prog="python tests/make_assignment.py", description="Write a student copy of this repository with the "
               "vectorised cores blanked (see this file's docstring).", allow_abbrev=False)
    p.add_argument("dest", metavar="DIR", help="a new (or empty) folder outside this repository")
    p.add_argument("--only", type=only_type, help=f"blank only these files' cores, comma-separated from: "
                   f"{', '.join(MODULES)} (default: all)")
    args = p.parse_args(argv)
    try:
        names = make_assignment(args.dest, args.only)
    except MarkerError as e:
        sys.exit(f"make_assignment: {e}")
    except OSError as e:
        sys.exit(f"make_assignment: cannot write the copy in {args.dest} ({e.strerror}: {e.filename}); choose a new "
                 "folder that you can write to")
    print(f"student copy in {os.path.realpath(args.dest)}; blanked: {', '.join(names)}")
    modules = [m for m in MODULES if any(n.startswith(f"{m}.") for n in names)]
    files = " ".join(f"tests/test_{m}.py" for m in modules)   # -k: test_cores.py's checks of these cores alone
    print(f"students check their cores with: cd {args.dest} && pytest {files} tests/test_cores.py -k "
          f"'{' or '.join(modules)}' (the whole suite: "
          "pytest, a few minutes); grade a submission (a copy with the cores written) from this repository: "
          "python tests/grade.py SUBMISSION")


if __name__ == "__main__":
    main()
