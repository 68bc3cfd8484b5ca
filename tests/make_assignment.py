"""
Make a student copy of this repository, with the vectorised cores blanked: the classroom mode.

    python tests/make_assignment.py DIR                 # DIR: a new (or empty) folder outside this repository
    python tests/make_assignment.py DIR --only ssm,rmt  # blank only these files' cores

Each region between a line `### BEGIN SOLUTION` and a line `### END SOLUTION` (nbgrader's markers, each alone on
its line) becomes `raise NotImplementedError("<file>.<function>: see the docstring")`, indented like the
marker. Signatures, docstrings, the reference loops, the configs, the tasks and the harness stay, so in the
copy `pytest` is the grader: the tests of the blanked cores fail with NotImplementedError until they are
written, and everything else passes. GRADE_SEED=<int> pytest grades on inputs and lengths the students have
not seen (tests/conftest.py). This script and its test are not copied. Nothing is written in place, and
nested or unmatched markers stop it with one line before anything is written.
"""
import glob
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
SHIPPED = ["*.py", "tests/*.py", "README.md", "requirements.txt", "pytest.ini", ".gitignore", ".ci/run"]
INSTRUCTOR_ONLY = ["tests/make_assignment.py", "tests/test_assignment.py"]


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
        lines[begin:end + 1] = [f'{indent}raise NotImplementedError("{name}: see the docstring")\n']
    return "".join(lines)


def make_assignment(dest, only=None):
    """Write the student copy to dest, blanking the cores of every file (or of the modules named in `only`);
    returns the names of the blanked functions."""
    dest = os.path.abspath(dest)
    if dest == ROOT or dest.startswith(ROOT + os.sep):
        raise MarkerError(f"{dest} is inside this repository; choose a folder outside it (nothing is written in place)")
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise MarkerError(f"{dest} exists and is not an empty folder")
    files = sorted({os.path.relpath(p, ROOT) for pattern in SHIPPED for p in glob.glob(os.path.join(ROOT, pattern))}
                   - set(INSTRUCTOR_ONLY))
    student, blanked = {}, []
    for rel in files:                                   # check every file before writing any
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        module = rel[:-3].replace(os.sep, ".")
        if rel.endswith(".py") and (only is None or module in only):
            blanked += [name for _, _, name in regions(text.splitlines(keepends=True), module)]
            text = blank(text, module)
        student[rel] = text
    for rel, text in student.items():
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        with open(os.path.join(dest, rel), "w") as f:
            f.write(text)
        shutil.copymode(os.path.join(ROOT, rel), os.path.join(dest, rel))
    return blanked


if __name__ == "__main__":
    args = sys.argv[1:]
    only = None
    if len(args) == 3 and args[1] == "--only":
        only = set(args[2].split(","))
        args = args[:1]
    if len(args) != 1:
        sys.exit("usage: python tests/make_assignment.py DIR [--only attention,ssm,rmt,titans,hrm]")
    unknown = sorted((only or set()) - {"attention", "ssm", "rmt", "titans", "hrm"})
    if unknown:
        sys.exit(f"make_assignment: --only takes attention, ssm, rmt, titans, hrm; not {', '.join(unknown)}")
    try:
        names = make_assignment(args[0], only)
    except MarkerError as e:
        sys.exit(f"make_assignment: {e}")
    print(f"student copy in {os.path.abspath(args[0])}; blanked: {', '.join(names)}")
    print(f"grade it with: cd {args[0]} && pytest   (GRADE_SEED=<int> pytest for unseen cases)")
