"""The classroom mode (tests/make_assignment.py, tests/grade.py): the marked regions are exactly the five cores;
the student copy imports, its core tests fail with NotImplementedError and nothing else fails; putting the bodies
back restores the original files; no line of a solution ships, nor the instructors' notes; bad markers, bad
--only lists and unsafe destinations (a link into the repository too) are refused."""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import grade
import make_assignment as ma

CORES = ["attention.attention", "hrm.HRM.segment", "rmt.RMT.segment_step", "ssm.ssd_scan", "titans.neural_memory"]


def source(module):
    with open(os.path.join(ma.ROOT, module + ".py")) as f:
        return f.read()


def test_the_marked_regions_are_the_five_cores_and_short():
    found = {}
    for module in ["attention", "ssm", "rmt", "titans", "hrm", "tasks", "compare"]:
        for begin, end, name in ma.regions(source(module).splitlines(keepends=True), module):
            found[name] = end - begin - 1
    assert sorted(found) == CORES
    assert all(3 <= n <= 40 for n in found.values()), found   # short enough that the blank still teaches


@pytest.mark.parametrize("text, message", [
    ("def f():\n    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    x = 1\n    ### END SOLUTION\n", "nested"),
    ("def f():\n    x = 1\n    ### END SOLUTION\n", "without"),
    ("def f():\n    ### BEGIN SOLUTION\n    x = 1\n", "without"),
    ("def f():\n    x = 1  ### BEGIN SOLUTION\n    ### END SOLUTION\n", "alone"),
])
def test_bad_markers_are_refused(text, message):
    with pytest.raises(ma.MarkerError, match=message):
        ma.blank(text, "m")


def test_blank_keeps_indentation_and_names_the_method():
    text = "class A:\n    def f(self, x):\n        \"\"\"doc\"\"\"\n        ### BEGIN SOLUTION\n        return x\n" \
           "        ### END SOLUTION\n"
    assert ma.blank(text, "m") == ("class A:\n    def f(self, x):\n        \"\"\"doc\"\"\"\n"
                                   "        raise NotImplementedError(\"m.A.f: see the docstring\")\n")


def test_never_writes_in_place_or_over_a_folder(tmp_path):
    with pytest.raises(ma.MarkerError, match="inside this repository"):
        ma.make_assignment(os.path.join(ma.ROOT, "student"))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("x")
    with pytest.raises(ma.MarkerError, match="not an empty folder"):
        ma.make_assignment(tmp_path / "old")
    run = subprocess.run([sys.executable, os.path.join(ma.ROOT, "tests", "make_assignment.py"), ma.ROOT],
                         capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    os.symlink(ma.ROOT, tmp_path / "link")                          # a link that leads into the repository
    with pytest.raises(ma.MarkerError, match="inside this repository"):
        ma.make_assignment(tmp_path / "link" / "student")
    assert not os.path.exists(os.path.join(ma.ROOT, "student"))


def test_only_takes_a_list_with_or_without_spaces(tmp_path):
    assert ma.parse_only("ssm, rmt") == ma.parse_only("ssm,rmt") == {"ssm", "rmt"}
    script = os.path.join(ma.ROOT, "tests", "make_assignment.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "a"), "--only", "ssm, foo"], capture_output=True,
                         text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "'ssm, foo'" in run.stderr
    run = subprocess.run([sys.executable, script, str(tmp_path / "b"), "--only", "ssm, rmt"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "blanked: rmt.RMT.segment_step, ssm.ssd_scan" in run.stdout, run.stderr


def test_help_is_help_and_an_unwritable_destination_is_one_line(tmp_path):
    def make(*argv):
        return subprocess.run([sys.executable, os.path.join(ma.ROOT, "tests", "make_assignment.py"), *map(str, argv)],
                              cwd=tmp_path, capture_output=True, text=True)
    run = make("--help")
    assert run.returncode == 0 and "usage: python tests/make_assignment.py" in run.stdout
    assert os.listdir(tmp_path) == []                             # no student copy in a folder named --help
    (tmp_path / "a_file").write_text("")
    for dest in [tmp_path / "a_file" / "student"] + (["/proc/student"] if os.path.isdir("/proc/self") else []):
        run = make(dest)
        assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith(f"make_assignment: cannot write the copy in {dest} (")
        assert run.stderr.endswith("choose a new folder that you can write to\n")
    for argv in ([], ["a", "b"]):                                   # no folder, two folders: one line, status 2
        run = make(*argv)
        assert run.returncode == 2 and run.stderr.startswith("make_assignment: ") and run.stderr.count("\n") == 1


def test_student_copy_fails_exactly_at_the_blanked_cores(tmp_path):
    dest = tmp_path / "student"
    assert sorted(ma.make_assignment(dest)) == CORES
    assert not (dest / "tests" / "make_assignment.py").exists()
    env = {k: v for k, v in os.environ.items() if k != "GRADE_SEED"}
    imports = subprocess.run([sys.executable, "-c", "import attention, ssm, rmt, titans, hrm, tasks, compare"],
                             cwd=dest, capture_output=True, text=True, env=env)
    assert imports.returncode == 0, imports.stderr
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={tmp_path / 'r.xml'}"],
                   cwd=dest, capture_output=True, env=env, timeout=600)
    outcome = {}
    for case in ET.parse(tmp_path / "r.xml").iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        name = case.get("classname").split(".")[-1] + "::" + case.get("name")
        outcome[name] = "pass" if failure is None else (failure.get("message") or "") + (failure.text or "")
    failures = {n: m for n, m in outcome.items() if m != "pass"}
    assert failures and all("NotImplementedError" in m for m in failures.values()), \
        {n: m[:200] for n, m in failures.items() if "NotImplementedError" not in m}
    for core_test in ["test_attention::test_core_equals_reference_and_loop[None-True-37]",
                      "test_ssm::test_scan_equals_reference[False-16-131]",
                      "test_titans::test_dual_form_equals_token_loop[None-16-64-mlp]",
                      "test_rmt::test_segment_step_runs_the_blocks_on_2M_plus_s_positions_with_the_right_rope[5-rope]",
                      "test_hrm::test_each_update_reads_the_latest_states[one_step]",
                      "test_cores::test_core_does_not_call_its_reference_or_loop_over_time[ssm]"]:
        assert core_test in failures
    for kept in ["test_attention::test_reference_equals_pytorch_builtin[True]",
                 "test_ssm::test_segsum_is_the_sum_over_each_segment",
                 "test_compare::test_evaluate_scores_a_perfect_copier_perfectly"]:
        assert outcome[kept] == "pass"
    assert all(m == "pass" for n, m in outcome.items() if n.startswith("test_tasks::"))

    for module in ["attention", "ssm", "rmt", "titans", "hrm"]:     # the original bodies put back: the originals
        original = source(module).splitlines(keepends=True)
        student = (dest / f"{module}.py").read_text().splitlines(keepends=True)
        for begin, end, _ in reversed(ma.regions(original, module)):
            raise_line = next(i for i, line in enumerate(student) if "raise NotImplementedError" in line
                              and student[:i] == original[:i])
            student[raise_line:raise_line + 1] = original[begin:end + 1]
        assert "".join(student) == "".join(original)


def test_only_blanks_the_named_files(tmp_path):
    assert ma.make_assignment(tmp_path / "s", only={"ssm"}) == ["ssm.ssd_scan"]
    assert (tmp_path / "s" / "attention.py").read_text() == source("attention")
    assert "raise NotImplementedError" in (tmp_path / "s" / "ssm.py").read_text()


def test_no_line_of_a_solution_ships(tmp_path):
    """Every line of every marked region is absent from the student copy (tests and README included), except
    the lines the hand-out has anyway outside the regions, such as `for block in self.blocks:`."""
    dest = tmp_path / "student"
    ma.make_assignment(dest)
    solution, handed_out = set(), set()
    for module in ma.MODULES + ["tasks", "compare"]:
        lines = source(module).splitlines()
        inside = set()
        for begin, end, _ in ma.regions(source(module).splitlines(keepends=True), module):
            inside.update(range(begin + 1, end))
        solution |= {lines[i].strip() for i in inside if lines[i].strip()}
        handed_out |= {line.strip() for i, line in enumerate(lines) if i not in inside}
    assert len(solution - handed_out) > 60
    leaks = []
    for path in dest.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".md", ".txt", ".ini", ""):
            shipped = {line.strip() for line in path.read_text(errors="replace").splitlines()}
            leaks += [f"{path.relative_to(dest)}: {line}" for line in sorted((solution - handed_out) & shipped)]
    assert not leaks, leaks[:10]
    for name in ma.INSTRUCTOR_ONLY:
        assert not (dest / name).exists(), name


def test_student_readme_has_no_instructor_notes_and_no_dead_links(tmp_path):
    dest = tmp_path / "student"
    ma.make_assignment(dest, only={"ssm"})
    readme = (dest / "README.md").read_text()
    assert "## For instructors" not in readme and "## The assignment" in readme and "`ssm.ssd_scan`" in readme
    assert "GRADE_SEED" not in readme and "make_assignment.py DIR" not in readme
    for target in re.findall(r"\]\(([^)\s#]+)", readme):
        assert "://" in target or (dest / target).exists(), f"the student README links {target}, not shipped"


def test_grade_parses_seeds_and_finds_changes_outside_the_cores():
    assert grade.seeds("0-3,7") == [0, 1, 2, 3, 7] and grade.seeds("12") == [12]
    original = source("ssm")
    handout = ma.blank(original, "ssm")
    assert grade.changes_outside_cores(original, handout, "ssm") == []
    written = handout.replace('raise NotImplementedError("ssm.ssd_scan: see the docstring")', "return x, None")
    assert grade.changes_outside_cores(original, written, "ssm") == []
    tampered = written.replace("ys.append(torch.einsum(", "ys.append(0 * torch.einsum(")
    assert len(grade.changes_outside_cores(original, tampered, "ssm")) == 1
    helper = "\n\ndef helper(x):\n    return x\n"
    graded = grade.splice(original, tampered + helper, "ssm")      # ours but the core, and the new helper
    assert "return x, None" in graded and "0 * torch.einsum(" not in graded and graded.endswith(helper)
    assert grade.splice(original, original, "ssm") == original
