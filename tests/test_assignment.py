"""The classroom mode (tests/make_assignment.py): the marked regions are exactly the five cores; the student copy
imports, its core tests fail with NotImplementedError and nothing else fails; putting the bodies back restores
the original files; bad markers and unsafe destinations are refused."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

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
                      "test_titans::test_dual_form_equals_token_loop[16-64-mlp]",
                      "test_rmt::test_segment_step_is_read_segment_write",
                      "test_hrm::test_forward_and_gradients_equal_the_cycles_by_hand[True-one_step]"]:
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
