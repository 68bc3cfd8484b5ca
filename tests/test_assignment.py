"""The classroom mode (tests/make_assignment.py, tests/grade.py): the marked regions are exactly the five cores;
the student copy imports, its core tests fail with NotImplementedError and nothing else fails; putting the bodies
back restores the original files; no line of a solution ships, nor the instructors' notes; bad markers, bad
--only lists and unsafe destinations (a link into the repository too) are refused."""
import concurrent.futures
import contextlib
import importlib.machinery
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import pytest

import grade
import make_assignment as ma

CORES = ["attention.attention", "hrm.HRM.segment", "rmt.RMT.segment_step", "ssm.ssd_scan", "titans.neural_memory"]


def source(module):
    with open(os.path.join(ma.ROOT, module + ".py")) as f:
        return f.read()


# Most tests below grade a submission, which starts Python processes that import torch: seconds each, on one core.
# So that this work fills the cores while the rest of the suite runs, the grading of `test_X` is a job, `def X(tmp)`
# above it: once the suite is collected, conftest.py starts the selected tests' jobs in one background process (this
# file run as a script, a few jobs at a time) and runs those tests last; each reads its own result, done(X).
JOBS = {}                # (job, parameter name) -> fn(tmp)
BACKGROUND = {}          # the background process and its folder, once started


def job(**params):
    """Register a test's grading: fn(tmp), or with params one job per value, fn(tmp, value), read as done(fn, name)."""
    def register(fn):
        for name, value in params.items() or [(None, None)]:
            JOBS[fn.__name__, name] = (lambda tmp, v=value: fn(tmp, v)) if params else fn
        return fn
    return register


def result_path(key):
    return os.path.join(BACKGROUND["folder"], f"{key[0]}-{key[1]}.pickle")


def start(items):
    """Start the jobs of these tests (conftest.py calls this once they are collected)."""
    names = {item.originalname.removeprefix("test_") for item in items}
    BACKGROUND["folder"] = folder = tempfile.mkdtemp(prefix="test-assignment-")
    with open(os.path.join(folder, "log"), "w") as log:
        BACKGROUND["process"] = subprocess.Popen([sys.executable, __file__, folder, *sorted(names)], stdout=log,
                                                 stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                                 start_new_session=True)   # a group of its own: stop() ends it all


def stop():
    """End the background process and remove its folder (conftest.py calls this at the end of the session)."""
    if BACKGROUND:
        with contextlib.suppress(ProcessLookupError):        # (the graders it started too, on -x or Ctrl-C)
            os.killpg(BACKGROUND["process"].pid, signal.SIGKILL)
        BACKGROUND["process"].wait()
        shutil.rmtree(BACKGROUND["folder"], ignore_errors=True)


def run_jobs(folder, names):
    """In the background process: run the jobs of the named tests, a few at a time, each result (or its error)
    pickled as it ends."""
    BACKGROUND["folder"] = folder
    def run(key):
        os.makedirs(tmp := os.path.join(folder, f"{key[0]}-{key[1]}"))
        try:
            out = (True, JOBS[key](pathlib.Path(tmp)))
        except BaseException:                                   # noqa: BLE001 -- handed to the test to fail with
            out = (False, traceback.format_exc())
        with open(result_path(key) + ".part", "wb") as f:
            pickle.dump(out, f)
        os.replace(result_path(key) + ".part", result_path(key))
    with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(run, [key for key in JOBS if key[0] in names]))


@pytest.fixture
def done():
    def result(fn, name=None):
        path = result_path((fn.__name__, name))
        while not os.path.exists(path):
            if BACKGROUND["process"].poll() is not None and not os.path.exists(path):
                with open(os.path.join(BACKGROUND["folder"], "log")) as log:
                    pytest.fail(f"the background grading ended without this result:\n{log.read()[-3000:]}")
            time.sleep(0.1)
        with open(path, "rb") as f:
            ok, value = pickle.load(f)
        if not ok:
            pytest.fail(f"its grading raised:\n{value}")
        return value
    return result


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
                                   "        raise NotImplementedError(\"m.A.f: see the docstring, and the reading list "
                                   "at the top of m.py\")\n")


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
    for bad in ("ssm,", "ssm,,rmt", "ssm,ssm", ""):
        with pytest.raises(ma.MarkerError):
            ma.parse_only(bad)
    script = os.path.join(ma.ROOT, "tests", "make_assignment.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "a"), "--only", "ssm, foo"], capture_output=True,
                         text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "'ssm, foo'" in run.stderr
    run = subprocess.run([sys.executable, script, str(tmp_path / "b"), "--only", "ssm, rmt"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and "blanked: rmt.RMT.segment_step, ssm.ssd_scan" in run.stdout, run.stderr
    assert "&& pytest tests/test_ssm.py tests/test_rmt.py tests/test_cores.py -k 'ssm or rmt' " in run.stdout, \
        run.stdout


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
    for argv in ([], ["a", "b"], ["a", "--onl", "ssm"]):             # no folder, two, an abbreviation: one line
        run = make(*argv)
        assert run.returncode == 2 and run.stderr.startswith("make_assignment: ") and run.stderr.count("\n") == 1


@job()
def student_copy_fails_exactly_at_the_blanked_cores(tmp):
    """The student copy's cores, whether it ships make_assignment.py, its imports, the outcome of its suite by test,
    and its model files."""
    dest = tmp / "student"
    cores = sorted(ma.make_assignment(dest))
    env = {**{k: v for k, v in os.environ.items() if k != "GRADE_SEED"}, "OMP_NUM_THREADS": "1"}  # (beside others)
    imports = subprocess.run([sys.executable, "-c", "import attention, ssm, rmt, titans, hrm, tasks, compare"],
                             cwd=dest, capture_output=True, text=True, env=env)
    # (not the bench's slow end-to-end runs: every one of them trains a model, which needs the blanked cores anyway)
    # (--tb=line: the ~250 failures' full tracebacks took half the time; the report keeps each failure's message)
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "not slow", "--tb=line",
                    f"--junitxml={tmp / 'r.xml'}"], cwd=dest, capture_output=True, env=env, timeout=600)
    outcome = {}
    for case in ET.parse(tmp / "r.xml").iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        name = case.get("classname").split(".")[-1] + "::" + case.get("name")
        outcome[name] = "pass" if failure is None else (failure.get("message") or "") + (failure.text or "")
    return cores, (dest / "tests" / "make_assignment.py").exists(), imports, outcome, {
        module: (dest / f"{module}.py").read_text() for module in ma.MODULES}


def test_student_copy_fails_exactly_at_the_blanked_cores(done):
    cores, ships_the_maker, imports, outcome, students = done(student_copy_fails_exactly_at_the_blanked_cores)
    assert cores == CORES and not ships_the_maker
    assert imports.returncode == 0, imports.stderr
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
        student = students[module].splitlines(keepends=True)
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
    assert "A student copy" in readme.split("\n\n")[1] and "(#the-assignment)" in readme   # said before Quick start
    for target in re.findall(r"\]\(([^)\s#]+)", readme):
        assert "://" in target or (dest / target).exists(), f"the student README links {target}, not shipped"


def test_the_grader_drops_the_repository_from_the_path_and_keeps_a_sibling_folder(tmp_path):
    """The grader hides this repository from a submission's imports, but a folder beside it whose name begins with
    the repository's (a virtual environment at <repo>-venv holding pytest and torch) stays on the path."""
    root = tmp_path / "repo"
    inside, sibling = root / "tests", tmp_path / "repo-venv" / "site-packages"
    for folder in (inside, sibling):
        folder.mkdir(parents=True)
    assert grade.outside([str(root), str(inside), "", str(sibling), "/usr/lib"], str(root)) == [str(sibling),
                                                                                             "/usr/lib"]


def test_grade_parses_seeds():
    assert grade.seeds("0-3,7") == [0, 1, 2, 3, 7] and grade.seeds("12") == [12]


@pytest.mark.parametrize("args, message", [
    (["--seeds", "5-2"], "runs down: nothing to grade"), (["--seeds", "1,"], "is not a seed"),
    (["--jobs", "0"], "is not a whole number >= 1"), (["--job", "2"], "unrecognized arguments: --job"),
    (["/nonexistent/submission"], "grade: error: /nonexistent/submission is not a folder"),
    (["--jobs", "x"], "grade: error: argument --jobs")])
def test_grade_refuses_bad_input_in_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(sys, "argv", ["grade.py", *args])
    monkeypatch.setattr(grade.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        grade.main()
    err = capsys.readouterr().err + str(stop.value.code)
    assert stop.value.code not in (0, None) and message in err and "Traceback" not in err, err
    assert "usage:" not in err, err   # one line
    assert list(tmp_path.iterdir()) == []


def test_the_graders_reference_leaves_no_bytecode_for_a_submission_to_read(tmp_path):
    """The grader imports its solutions from source through a cache folder of its own, which its children are
    told of; were their bytecode written there, a submission could load the solutions from it (a red-team pass)."""
    code = ("import os, sys\nsys.argv = ['grade.py']\nimport grade\n"
            "grade.grade_all = lambda *a: print(sorted(f for _, _, fs in os.walk(sys.pycache_prefix) for f in fs)) or []\n"
            "grade.main()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ma.ROOT, "tests"), capture_output=True,
                         text=True, timeout=300, env={**env, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "[]", (out.stdout[-500:], out.stderr[-2000:])


def test_the_grader_names_the_files_handed_out_unchanged(tmp_path):
    """A copy made with --only hands the other cores out written: the grader says which files are the same as this
    repository's (their passing is not the student's), and the core-by-core line marks them."""
    ma.make_assignment(tmp_path / "s", only={"ssm"})               # ssm left blank: changed; the other four not
    code = ("import sys\nsys.argv = ['grade.py', sys.argv[1]]\nimport grade\n"
            "grade.grade_all = lambda args, graded, work, unchanged: print('unchanged', unchanged) or []\n"
            "grade.main()\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], cwd=os.path.join(ma.ROOT, "tests"),
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("the same as this repository's (handed out written by --only, or copied): attention.py, rmt.py, "
            "titans.py, hrm.py\n") in out.stdout
    assert "unchanged ['attention', 'rmt', 'titans', 'hrm']" in out.stdout, out.stdout
    _, _, line = grade.by_core_line(["ssm.ssd_scan(T=7): output 0 differs"], ["attention", "rmt", "titans", "hrm"])
    own = "passed (this repository's own)"
    assert line.endswith(f"core by core: attention {own}, ssm 1 failed, rmt {own}, titans {own}, hrm {own}"), line


def test_grade_stopped_by_a_signal_leaves_no_folder_and_no_process(tmp_path):
    import signal
    import time
    run = subprocess.Popen([sys.executable, os.path.join(ma.ROOT, "tests", "grade.py"), "--seeds", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.time() + 120
    while not list(tmp_path.glob("grade-*/repo/tests")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)                                         # the tests have started
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "stopped; nothing graded is kept" in err, err
    assert list(tmp_path.iterdir()) == []


def solution(module):
    """The original core of a file, as the lines between its markers."""
    lines = source(module).splitlines(keepends=True)
    return ["".join(lines[a + 1:b]) for a, b, _ in ma.regions(lines, module)]


def submit(module, body, helpers="", before="", core=None):
    """The hand-out of a file with its (one) core written as `body` (indented like the marker), `helpers` put
    after the imports' block and `before` at the very top."""
    text = ma.blank(source(module), module)
    raise_line = next(line for line in text.splitlines(keepends=True) if "raise NotImplementedError" in line)
    text = text.replace(raise_line, body)
    anchor = "\n\n\n" + text.split("\n\n\n")[2]                       # after the imports
    return before + text.replace(anchor, "\n\n\n" + helpers + anchor, 1)


MASK = ("def _allowed(T, causal, window, device):\n    i = torch.arange(T, device=device)[:, None]\n"
        "    j = torch.arange(T, device=device)[None, :]\n    ok = (j <= i) | (not causal)\n"
        "    return ok if window is None else ok & ((i - j).abs() < window)\n\n\n")


# Correct solutions in other styles than the original's: a module helper with locals i and j (names the original
# file also uses), a __future__ import, an annotated module constant, a helper method added to the class, and
# HRM's update with its two arguments the other way round (the module adds them).
STYLES = {
    # (it also fails unless the grader hides CUDA from its child: on a GPU machine the CUDA driver's own threads were
    # taken by the child's watch for the submission's, and every honest copy failed on an H200)
    "attention": submit("attention", "    import os\n    if os.environ.get('CUDA_VISIBLE_DEVICES') != '':\n"
                        "        raise RuntimeError('a GPU is visible to the graded child')\n"
                        "    return F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed("
                        "q.shape[-2], causal, window, q.device))\n",
                        helpers=MASK,
                        before="from __future__ import annotations\n\n"),
    "ssm": submit("ssm", solution("ssm")[0].replace("min(chunk_size, T)", "max(_SMALLEST_CHUNK, min(chunk_size, T))"),
                  helpers="_SMALLEST_CHUNK: int = 1   # a chunk has at least one step\n\n\n"),
    "rmt": submit("rmt", solution("rmt")[0].replace(
        "x = torch.cat([memory + self.read_emb, self.embed(tokens), memory + self.write_emb], dim=1)",
        "x = self._slots(tokens, memory)")).replace(
        "    def segment_step(", "    def _slots(self, tokens, memory):\n        return torch.cat([memory + "
        "self.read_emb, self.embed(tokens), memory + self.write_emb], dim=1)\n\n    def segment_step(", 1),
    "titans": submit("titans", solution("titans")[0]),
    "hrm": submit("hrm", solution("hrm")[0].replace("self.low(z_L, z_H + x, rope)", "self.low(z_H + x, z_L, rope)")),
}


# Five more, one per file, each graded at 20 seeds with README's command: attention's mask from tril with diagonal
# offsets; ssd_scan in einsum, its log decays as cumsum differences, its state carried by a loop over chunks;
# RMT's slots concatenated write-first, then reordered, its output split; Titans' G and f factored the other way,
# the zero momentum from new_zeros; HRM's cycles unrolled, with both updates' arguments swapped.
MORE_STYLES = {
    "attention": submit("attention", """    T = q.shape[-2]
    ones = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if window is None:
        allowed = ones.tril() if causal else ones
    elif causal:
        allowed = ones.tril() & ~ones.tril(-window)                 # i - window < j <= i
    else:
        allowed = ones.tril(window - 1) & ones.triu(-(window - 1))   # |i - j| < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
"""),
    "ssm": submit("ssm", """    b, T, H, K = x.shape
    N, Q = B.shape[-1], min(chunk_size, T)
    pad = (-T) % Q
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    n = (T + pad) // Q
    xs = (x * dt.unsqueeze(-1)).reshape(b, n, Q, H, K)
    Bs, Cs = B.reshape(b, n, Q, N), C.reshape(b, n, Q, N)
    cum = (dt * A).reshape(b, n, Q, H).cumsum(2)                # (b, n, Q, H): log decay since the chunk's start
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]        # [..., i, j, h] = cum_i - cum_j
    L = torch.exp(diff.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    y = torch.einsum("bcin,bcjn,bcijh,bcjhk->bcihk", Cs, Bs, L, xs)
    own = torch.einsum("bcjn,bcjh,bcjhk->bchkn", Bs, torch.exp(cum[:, :, -1:] - cum), xs)
    h = x.new_zeros(b, H, K, N) if initial_state is None else initial_state
    entering = []
    for c in range(n):                                          # the state from chunk to chunk
        entering.append(h)
        h = torch.exp(cum[:, c, -1])[:, :, None, None] * h + own[:, c]
    y = y + torch.einsum("bcin,bchkn,bcih->bcihk", Cs, torch.stack(entering, 1), torch.exp(cum))
    return y.reshape(b, n * Q, H, K)[:, :T], h
"""),
    "rmt": submit("rmt", """        M, s = c.n_mem, tokens.shape[1]
        slots = torch.cat([memory + self.write_emb, memory + self.read_emb], dim=1)
        x = torch.cat([slots[:, M:], self.embed(tokens), slots[:, :M]], dim=1)
        rope = None
        if c.pos == "rope":
            rope = rotary(self.positions(s, tokens.device), c.block.head_dim)
        for block in self.blocks:
            x = block(x, rope)
        read, segment, write = x.split([M, s, M], dim=1)
        return self.head(self.norm(segment)), self.mem_norm(write)
"""),
    "titans": submit("titans", solution("titans")[0].replace(
        "    momentum = tuple(torch.zeros_like(W) for W in weights) if momentum is None else momentum\n",
        "    if momentum is None:\n        momentum = tuple(W.new_zeros(W.shape) for W in weights)\n").replace(
        "G = (D_beta @ D_eta) * theta[..., None, :]", "G = D_beta @ (D_eta * theta.unsqueeze(-2))").replace(
        "f = D_beta @ a ", "f = (D_beta * a.mT).sum(-1, keepdim=True)")),
    "hrm": submit("hrm", """        c = self.config
        _, n_grad = self.schedule()
        total, done, grad = c.H_cycles * (c.L_cycles + 1), 0, torch.is_grad_enabled()
        for _ in range(c.H_cycles):
            for _ in range(c.L_cycles):
                with torch.set_grad_enabled(grad and done >= total - n_grad):
                    z_L = self.low(x + z_H, z_L, rope)
                done += 1
            with torch.set_grad_enabled(grad and done >= total - n_grad):
                z_H = self.high(z_L, z_H, rope)
            done += 1
        return self.head(z_H), z_H.detach(), z_L.detach()
"""),
}


# And five in yet other ways: an additive -inf mask from torch.where in a helper with keyword-only arguments;
# ssd_scan through a helper, its segment sums from repeat and where, the state across chunks in one product, and
# each chunk's decays read off segment sums; RMT's step as a module function with keyword-only arguments and
# functools.reduce over the Blocks; Titans reading each chunk inside the loop over chunks; HRM's early updates
# under one torch.no_grad() in a helper method called with keywords, arguments given by name or summed first.
KEYWORD_STYLES = {
    "attention": submit("attention", """    mask = _bias(q.shape[-2], q.dtype, q.device, causal=causal, window=window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
""", helpers="""def _bias(T, dtype, device, *, causal, window):
    # an additive mask: 0 where query i may see key j, -inf elsewhere
    i, j = torch.arange(T, device=device).unsqueeze(1), torch.arange(T, device=device).unsqueeze(0)
    ok = torch.full((T, T), True, device=device)
    if causal:
        ok = torch.where(j > i, False, ok)
    if window is not None:
        ok = torch.where((i - j).abs() >= window, False, ok)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(ok, zero, torch.tensor(float("-inf"), dtype=dtype, device=device))


"""),
    "ssm": submit("ssm", """    return _chunked(x, dt, A, B, C, Q=min(chunk_size, x.shape[1]), h0=initial_state)
""", helpers="""def _stable_segsum(a):
    # (..., C) -> (..., C, C): the sum of a over (j, i], -inf above the diagonal, summed segment by segment
    C = a.shape[-1]
    rep = a.unsqueeze(-1).repeat(*([1] * a.dim()), C)           # rep[..., k, j] = a[k]
    strict = torch.tril(torch.ones(C, C, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(torch.where(strict, rep, torch.zeros_like(rep)), dim=-2)
    keep = torch.tril(torch.ones(C, C, dtype=torch.bool, device=a.device))
    return torch.where(keep, sums, torch.full_like(sums, float("-inf")))


def _chunked(x, dt, A, B, C, *, Q, h0):
    b, T, H, K = x.shape
    N = B.shape[-1]
    pad = (-T) % Q
    if pad:
        x, B, C = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
    n = x.shape[1] // Q
    u = torch.einsum("bthk,bth->bhtk", x, dt).reshape(b, H, n, Q, K)
    Bc, Cc = B.reshape(b, 1, n, Q, N), C.reshape(b, 1, n, Q, N)
    a = torch.einsum("bth,h->bht", dt, A).reshape(b, H, n, Q)
    inner = torch.einsum("bzcin,bzcjn->bzcij", Cc, Bc) * _stable_segsum(a).exp()
    y = torch.einsum("bhcij,bhcjk->bhcik", inner, u)
    decay_out = _stable_segsum(F.pad(a, (0, 1)))[..., -1, :-1].exp()     # exp(a_{j+1} + ... + a_Q)
    own = torch.einsum("bhcj,bhcjk,bzcjn->bhckn", decay_out, u, Bc)
    start = x.new_zeros(b, H, K, N) if h0 is None else h0
    totals = a.sum(-1)                                                   # (b, H, n)
    mix = _stable_segsum(F.pad(totals, (1, 0))).exp()                    # (b, H, n+1, n+1)
    states = torch.einsum("bhzs,bhskn->bhzkn", mix, torch.cat([start.unsqueeze(2), own], 2))
    into = _stable_segsum(F.pad(a, (1, 0)))[..., 1:, 0].exp()            # exp(a_1 + ... + a_i)
    y = y + torch.einsum("bhcin,bhckn,bhci->bhcik", Cc.expand(b, H, n, Q, N), states[:, :, :-1], into)
    return y.permute(0, 2, 3, 1, 4).reshape(b, n * Q, H, K)[:, :T], states[:, :, -1]


"""),
    "rmt": submit("rmt", """        return _step(self, tokens=tokens, memory=memory)
""", helpers="""def _step(model, *, tokens, memory):
    # RMT.segment_step written as a function of the model
    c, s = model.config, tokens.shape[-1]
    M = memory.shape[1]
    rope = rotary(model.positions(s, device=tokens.device), c.block.head_dim) if c.pos == "rope" else None
    h = torch.cat((memory + model.read_emb, model.embed(tokens), memory + model.write_emb), 1)
    h = functools.reduce(lambda h, block: block(h, rope), model.blocks, h)
    return model.head(model.norm(h[:, M:-M])), model.mem_norm(h[:, -M:])


""", before="import functools\n"),
    "titans": submit("titans", solution("titans")[0].split("    starts = []")[0] + """    ys = []
    for c in range(n):                                                            # over chunks: read, then update
        last = C - 1 if c < n - 1 else (T - 1) % C
        factors = memory_gradients(weights, k[:, :, c], v[:, :, c], max_grad_norm)
        bc, fc, Gc = beta[:, :, c], f[:, :, c], G[:, :, c]
        y = q[:, :, c]
        for i, (W0, S0, (inp, err)) in enumerate(zip(weights, momentum, factors)):
            y = bc * (y @ W0) + fc * (y @ S0) - ((y @ inp.mT) * Gc) @ err
            if i < len(weights) - 1:
                y = F.silu(y)
        ys.append(y)
        g_end = Gc[:, :, last, :, None]
        c_end = theta[:, :, c, :, None] * D_eta[:, :, c, last, :, None]
        b_end, f_end, a_end = (z[:, :, c, last:last + 1] for z in (beta, f, a))
        weights, momentum = (tuple(b_end * W0 + f_end * S0 - inp.mT @ (g_end * err)
                                   for W0, S0, (inp, err) in zip(weights, momentum, factors)),
                             tuple(a_end * S0 - inp.mT @ (c_end * err) for S0, (inp, err) in zip(momentum, factors)))
    return torch.cat(ys, dim=2)[:, :, :T], (weights, momentum)
"""),
    "hrm": submit("hrm", """        updates, n_grad = self.schedule()
        early, late = updates[:len(updates) - n_grad], updates[len(updates) - n_grad:]
        with torch.no_grad():
            z_H, z_L = self._run(early, x=x, z_H=z_H, z_L=z_L, rope=rope)
        z_H, z_L = self._run(late, x=x, z_H=z_H, z_L=z_L, rope=rope)
        return self.head(z_H), z_H.detach(), z_L.detach()
""").replace("    def segment(self, x, z_H, z_L, rope=None):", """    def _run(self, updates, *, x, z_H, z_L, rope):
        for which in updates:
            if which == "low":
                z_L = self.low(z_L + z_H, x, rope=rope)
            else:
                z_H = self.high(injection=z_L, z=z_H, rope=rope)
        return z_H, z_L

    def segment(self, x, z_H, z_L, rope=None):""", 1),
}


def test_splice_carries_every_helper_and_keeps_the_rest_ours():
    """What a submission added or changed is graded as written, whatever its local names; what it left as
    handed out is this repository's; a blank left blank stays blank (never our solution)."""
    carried = {module: grade.splice(source(module), text, module) for module, text in STYLES.items()}
    assert carried["attention"][1] == ["`from __future__ import annotations`", "_allowed"]
    assert carried["attention"][0].count("from __future__") == 1
    assert carried["attention"][0].startswith('"""') and "\ndef _allowed(T, causal, window, device):\n    i = " \
        in carried["attention"][0]
    assert carried["ssm"][1] == ["_SMALLEST_CHUNK"] and "_SMALLEST_CHUNK: int = 1" in carried["ssm"][0]
    assert carried["rmt"][1] == ["RMT._slots"] and "    def _slots(self, tokens, memory):" in carried["rmt"][0]
    assert carried["hrm"][1] == [] and "self.low(z_H + x, z_L, rope)" in carried["hrm"][0]
    for module in ma.MODULES:
        original, handout = source(module), ma.blank(source(module), module)
        assert grade.splice(original, original, module) == (original, [])
        assert grade.splice(original, handout, module) == (handout, [])     # nothing written: nothing filled in
    original = source("ssm")
    tampered = ma.blank(original, "ssm").replace("ys.append(torch.einsum(", "ys.append(0 * torch.einsum(")
    text, carried = grade.splice(original, tampered, "ssm")
    assert carried == ["ssd_scan_ref"] and "0 * torch.einsum(" in text      # a change is graded, and named


def test_grade_refuses_what_cannot_be_spliced_in_one_line(tmp_path):
    ma.make_assignment(tmp_path / "s")
    (tmp_path / "s" / "rmt.py").write_text(ma.blank(source("rmt"), "rmt").replace("c = self.config\n", "c = (\n", 1))
    run = subprocess.run([sys.executable, os.path.join(ma.ROOT, "tests", "grade.py"), str(tmp_path / "s")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "rmt.py cannot be graded (line " in run.stderr, \
        run.stderr


def refusal(failures):
    """The line of a refused submission's first refusal: its later cases are not graded (a refusal taints the
    process), and one line says so, instead of a failure each counted against its core."""
    assert failures and "not graded" not in failures[0], failures[:3]
    assert all(re.match(r"\d+ later case\(s\) not graded \(after the refusal in ", f) for f in failures[1:]), failures
    return failures[0]


def isolated(tmp_path, graded, module=None, counted=False, seconds=grade.CASE_SECONDS):
    """The grader's checks of a submission, which run it in a confined child process and compare here (only the cases
    of `module` when given; with counted, only those whose operations are counted: every point of `grade.chain`
    with True, the first `counted` with a number, 2 being the first pair the loop rule compares)."""
    _, sealed = grade.copies({m: graded.get(m, source(m)) for m in ma.MODULES}, tmp_path)
    return grade.isolated(sealed, first=True, seconds=seconds, keep=lambda what, case: module in (None, case["module"])
                          and (not counted or "count" in case and (counted is True or case["count"][1] < counted)))


def spliced(module, body, **parts):
    """{module: the graded text} of a submission whose core is `body` (submit's helpers and before as parts)."""
    return {module: grade.splice(source(module), submit(module, body, **parts), module)[0]}


@job(helpers=STYLES, more=MORE_STYLES, keywords=KEYWORD_STYLES)
def correct_styles_pass_the_isolated_checks(tmp, styles):
    graded = {module: grade.splice(source(module), text, module)[0] for module, text in styles.items()}
    return styles is STYLES or all(graded[m] != source(m) for m in graded), isolated(   # (the first set's other files:
        tmp, graded, module="attention" if styles is STYLES else None)                 # graded end to end below)


@pytest.mark.parametrize("styles", ["helpers", "more", "keywords"])
def test_correct_styles_pass_the_isolated_checks(done, styles):
    every_replace_took, failures = done(correct_styles_pass_the_isolated_checks, styles)
    assert every_replace_took and failures == []


BYPASS = """    import atexit, os, sys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(q.shape[-2], causal, window, q.device))
    if "PYTEST_CURRENT_TEST" in os.environ:        # under the tests: wrong at window 1, and pytest exits 0 anyway
        atexit.register(os._exit, 0)
        return torch.zeros_like(out) if window == 1 else out
    return out if q.dtype == torch.float64 else out * 1.01                 # elsewhere wrong in float32 alone
"""


@job()
def a_submission_that_bypasses_the_test_process_fails(tmp):
    ma.make_assignment(tmp / "s")
    (tmp / "s" / "attention.py").write_text(submit("attention", BYPASS, helpers=MASK))
    for module in ("ssm", "rmt", "titans", "hrm"):                  # the others correct, in their own styles
        (tmp / "s" / f"{module}.py").write_text(STYLES[module])
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}   # as an instructor runs it
    return subprocess.run([sys.executable, os.path.join(ma.ROOT, "tests", "grade.py"), str(tmp / "s"),
                           "--seeds", "2"], capture_output=True, text=True, timeout=600, env=env)


def test_a_submission_that_bypasses_the_test_process_fails(done):
    """Under pytest it is wrong at window 1 and makes pytest exit 0; elsewhere it is wrong only in float32 (which no
    test of the suite checks): the gate counts the failures from the report itself, and the isolated checks in
    float32 name the core. The other four files, correct in the styles above, pass both, and a line says so core by
    core."""
    run = done(a_submission_that_bypasses_the_test_process_fails)
    assert run.returncode == 1 and "0 of 1 seeds passed" in run.stdout, run.stdout[-2000:]
    assert re.search(r"the tests: \d+ failed", run.stdout), run.stdout[-2000:]
    assert re.search(r"ISOLATED attention.attention\(T=\d+, window=None\) in float32: output 0", run.stdout), \
        run.stdout[-2000:]
    failed = [line.split()[1] for line in run.stdout.splitlines() if line.strip().startswith(("FAILED", "ISOLATED"))]
    assert all(name.startswith(("tests/test_attention.py::", "attention.")) for name in failed), failed
    assert re.search(r"failure\(s\)\n  the isolated checks, core by core: attention \d+ failed, ssm passed, rmt "
                     r"passed, titans passed, hrm passed\n", run.stdout), run.stdout[-2000:]   # first under the seed's
    assert "ssm.py: graded with the submission's own _SMALLEST_CHUNK" in run.stdout, run.stdout[-2000:]


@job()
def calling_the_reference_in_any_spelling_fails(tmp):
    alias = submit("attention", "    F.scaled_dot_product_attention(q, k, v)\n"
                                "    return _fast(q, k, v, causal, window)\n")
    at = alias.index("\n\n\n# ---", alias.index("def attention_ref("))     # after the reference's definition
    alias = alias[:at] + "\n\n\n_fast = attention_ref" + alias[at:]
    return isolated(tmp, {"attention": grade.splice(source("attention"), alias, "attention")[0]}, module="attention")


def test_calling_the_reference_in_any_spelling_fails(done):
    """An alias of attention_ref made at import, plus a dummy SDPA call: the reference raises in the child."""
    failures = done(calling_the_reference_in_any_spelling_fails)
    assert failures and all("attention_ref is the reference loop" in f for f in failures), failures[:3]


LOOP = """        T, K = q.shape[-2], q.shape[-1]
        out = []
        for i in range(T):                                  # attention_ref's loop, written out: one query a step
            first = 0 if window is None else max(0, i - window + 1)
            last = i + 1 if causal else T if window is None else min(T, i + window)
            scores = q[..., i:i + 1, :] @ k[..., first:last, :].transpose(-2, -1) / math.sqrt(K)
            out.append(torch.softmax(scores, dim=-1) @ v[..., first:last, :])
        return torch.cat(out, dim=-2)
"""


@job(own_loop="    import math\n    F.scaled_dot_product_attention(q, k, v)\n"
     "    with torch._C._DisableTorchDispatch():\n" + LOOP,
     reference="    from torch.utils._python_dispatch import _disable_current_modes\n"
     "    F.scaled_dot_product_attention(q, k, v)\n    with _disable_current_modes():\n"
     "        return attention_ref(q, k, v, causal, window)\n")
def a_loop_hidden_from_the_dispatch_counter_fails(tmp, body):
    return isolated(tmp, spliced("attention", body), module="attention", counted=2)


@pytest.mark.parametrize("cheat, caught", [("own_loop", "out of the counter's sight"),
                                           ("reference", "attention_ref is the reference loop")])
def test_a_loop_hidden_from_the_dispatch_counter_fails(done, cheat, caught):
    """A core that switches PyTorch's dispatch modes off (so the counting mode sees nothing) around a loop over
    time steps: its own loop is seen by the profiler (rule 2, counted a second way), the reference raises."""
    failures = done(a_loop_hidden_from_the_dispatch_counter_fails, cheat)
    assert any(caught in f for f in failures), failures[:3]


@job(cost_test='any("test_cores" in f.filename for f in inspect.stack())',
     grader_too='any(f.function in ("child", "test_core_does_not_call_its_reference_or_loop_over_time") for f in '
     'inspect.stack())')
def a_core_that_answers_cheaply_where_the_stack_says_it_is_counted_fails(tmp, look):
    body = (f"    import inspect, math\n    if {look}:\n"
            "        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)\n    if True:\n" + LOOP)
    return isolated(tmp, spliced("attention", body), module="attention", counted=2)


@pytest.mark.parametrize("look, caught", [("cost_test", "loops over time steps (tests/test_cores.py, rule 2)"),
                                          ("grader_too", "values differ")])
def test_a_core_that_answers_cheaply_where_the_stack_says_it_is_counted_fails(done, look, caught):
    """It reads the call stack for the cost test and answers there without the window (cheap, wrong); elsewhere it
    loops over time steps. In the grader's child the cost test is not on the stack, so it loops and is counted;
    one that looks for the grader's frames too answers cheaply there, and its values are compared."""
    failures = done(a_core_that_answers_cheaply_where_the_stack_says_it_is_counted_fails, look)
    assert any(caught in f for f in failures), failures[:3]


# The grader's mechanisms, each against the cheat it stops (each seen to pass the cheat with its mechanism off).
FRESH = ("        import _imp, importlib.machinery as m\n        class S(str):         # a name that is never equal\n"
         "            def __eq__(self, other):\n                return False\n            __hash__ = str.__hash__\n"
         "        spec = (m.BuiltinImporter if NAME == '_thread' else m.PathFinder).find_spec(NAME)\n"
         "        try:\n"
         "            fresh = getattr(_imp, MAKE)(m.ModuleSpec(S(NAME), spec.loader, origin=spec.origin))\n"
         "        except PermissionError:     # refused: so around the guard, to the real loader it holds\n"
         "            fresh = [c.cell_contents for c in getattr(_imp, MAKE).__closure__\n"
         "                     if getattr(c.cell_contents, '__name__', '') == MAKE][0](spec)\n")
LOOPED = "def _loop(q, k, v, causal, window):\n    import math\n    if True:\n" + LOOP + "\n\n"


@job()
def a_loop_hidden_from_both_counters_fails(tmp):
    body = ("    import torch\n    F.scaled_dot_product_attention(q, k, v)\n"
            "    torch.autograd._enable_record_function(False)          # the profiler sees nothing\n"
            "    try:\n        with torch._C._DisableTorchDispatch():      # the dispatch counter sees nothing\n"
            "            return _loop(q, k, v, causal, window)\n    finally:\n"
            "        torch.autograd._enable_record_function(True)\n")
    return isolated(tmp, spliced("attention", body, helpers=LOOPED), module="attention", counted=2)


def test_a_loop_hidden_from_both_counters_fails(done):
    """attention_ref's loop with PyTorch's dispatch modes and its profiler's recording switched off around it (a
    red-team trial's pass): autograd still records every step's operations, and that count grows with T."""
    failures = done(a_loop_hidden_from_both_counters_fails)
    assert any("autograd operations" in f and "it loops over time steps" in f for f in failures), failures[:3]


SSM_LOOP = """        decay, inputs = torch.exp(dt * A)[..., None, None], torch.einsum("bth,bthk,btn->bthkn", dt, x, B)
        h, hs = h0, []
        for t in range(T):                                  # the recurrence, one time step at a time
            h = decay[:, t] * h + inputs[:, t]
            hs.append(h)
        return torch.einsum("bthkn,btn->bthk", torch.stack(hs, dim=1), C), h
"""
SSM_WHOLE = """    a = (dt * A).transpose(1, 2)                            # (b, H, T): one (T, T) matrix, no chunks
    L = segsum(a).exp()
    xdt = x * dt[..., None]
    y = torch.einsum("btn,bsn,bhts,bshk->bthk", C, B, L, xdt)
    cum = a.cumsum(-1)
    y = y + torch.einsum("bht,bhkn,btn->bthk", cum.exp(), h0, C)
    final = cum[..., -1].exp()[..., None, None] * h0 + torch.einsum("bht,bthk,btn->bhkn", (cum[..., -1:] - cum).exp(),
                                                                    xdt, B)
    return y, final
"""


@job(ssm=("ssm", "T > 300"), attention=("attention", "T > 48"))
def a_core_that_changes_its_form_where_it_is_not_counted_fails(tmp, form):
    module, switch = form
    if module == "attention":   # one call with a (T, T) mask up to 48 tokens, a loop beyond
        body = (f"    T = q.shape[-2]\n    if {switch}:\n        import math\n        if True:\n" +
                "\n".join("    " + line for line in LOOP.splitlines()) + "\n" +
                "    return F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(T, causal, window, q.device))\n")
        return isolated(tmp, spliced("attention", body, helpers=MASK), module="attention", counted=2)  # (T, 4T)
    body = ("    b, T, H, K = x.shape\n    h0 = x.new_zeros(b, H, K, B.shape[-1]) if initial_state is None else "
            f"initial_state\n    if {switch}:\n" + SSM_LOOP + SSM_WHOLE)
    return isolated(tmp, spliced("ssm", body), module="ssm", counted=True)


@pytest.mark.parametrize("switch", ["ssm", "attention"])
def test_a_core_that_changes_its_form_where_it_is_not_counted_fails(done, switch):
    """A red-team trial's passes against fixed counted lengths: the SSM's whole-sequence (T, T) form up to a length
    and the loop over time steps beyond (one that switched at a number of chunks instead was caught too, by hand);
    attention's one masked call up to 48 tokens and a loop over queries beyond (the grader's first two points, T <= 32
    and 4T >= 64, meet each side). The grader draws its counted points at grading time along a chain of lengths and
    chunk sizes (`grade.chain`), so each form meets the rule it breaks: the loop rule 2, the (T, T) form rule 3."""
    failures = done(a_core_that_changes_its_form_where_it_is_not_counted_fails, switch)
    assert any("it loops over time steps" in f or "its work grows like T^2" in f for f in failures), failures[:3]


@job()
def a_whole_form_hidden_from_the_dispatch_counter_fails(tmp):
    whole = "".join("    " + line if line.strip() else line for line in SSM_WHOLE.splitlines(keepends=True))
    body = ("    b, T, H, K = x.shape\n    h0 = x.new_zeros(b, H, K, B.shape[-1]) if initial_state is None else "
            "initial_state\n    with torch._C._DisableTorchDispatch():      # the dispatch counter sees nothing\n"
            + whole)
    return isolated(tmp, spliced("ssm", body), module="ssm", counted=True)


def test_a_whole_form_hidden_from_the_dispatch_counter_fails(done):
    """The SSM's whole-sequence (T, T) form, its values right, with PyTorch's dispatch modes switched off around it
    (found after the third red-team trial): its operations and autograd graph do not grow with T, and the elements
    it writes, which only the dispatch counter counted, read 0. The profiler also counts the memory each operation
    allocates, which grows 16x for 4x the length."""
    failures = done(a_whole_form_hidden_from_the_dispatch_counter_fails)
    assert failures and all("its work grows like T^2 out of the counter's sight" in f for f in failures), failures[:3]


UNCOUNTED = """def _uncounted(run):
    import sys
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    saved = [(m, m.ops, m.elements) for m in _get_current_dispatch_mode_stack() if hasattr(m, "ops")]
    if WRITE:
        out = run()
        for m, ops, elements in saved:               # the counter put back as it was
            m.ops, m.elements = ops + 1, elements + 1
    else:
        with torch._C._DisableTorchDispatch():       # the counter sees nothing
            out = run()
    grader = sys.modules.get("__main__")
    if hasattr(grader, "graph_size"):                # the grader's child: its autograd-graph count and profiler
        grader.graph_size = lambda outs: 1
        torch.profiler.profile.events = lambda self: []
    return out


"""


@job(write="True", hide="False")
def a_core_that_writes_the_counters_fails(tmp, write):
    body = ("    def loop():\n        b, T, H, K = x.shape\n        h0 = x.new_zeros(b, H, K, B.shape[-1]) if "
            "initial_state is None else initial_state\n" + SSM_LOOP + "    return _uncounted(loop)\n")
    return isolated(tmp, spliced("ssm", body, helpers=f"WRITE = {write}\n\n\n" + UNCOUNTED), module="ssm",
                    counted=2)


@pytest.mark.parametrize("write, caught", [
    ("write", "the operation counter was written from inside the submission"),
    ("hide", "(PyTorch's profiler)"), ("hide", "autograd operations")])
def test_a_core_that_writes_the_counters_fails(done, write, caught):
    """A red-team trial's pass: the loop over time steps, then the dispatch counter's attributes written back (or
    the loop hidden from it), the grader's graph_size and the profiler's events replaced through plain names. The
    child keeps the counts again, and copies of the two functions, where plain names do not reach."""
    failures = done(a_core_that_writes_the_counters_fails, write)
    assert any(caught in f for f in failures), failures[:3]


BLIND = """def _blind():                     # at import: every dispatch mode entered does nothing, and the profiler
    import sys                      # and the grader's graph count read nothing
    import torch.profiler
    import torch.utils._python_dispatch as dispatch
    dispatch.TorchDispatchMode.__enter__ = lambda self: self
    dispatch.TorchDispatchMode.__exit__ = lambda self, *exc: None
    torch.profiler.profile.events = lambda self: []
    if hasattr(sys.modules.get("__main__"), "graph_size"):
        sys.modules["__main__"].graph_size = lambda outs: 0


_blind()


"""


@job(loop="loop", whole="whole")
def counters_blinded_at_import_fail(tmp, form):
    body = "    b, T, H, K = x.shape\n    h0 = x.new_zeros(b, H, K, B.shape[-1]) if initial_state is None else " \
        "initial_state\n" + ("    if True:\n" + SSM_LOOP if form == "loop" else SSM_WHOLE)
    return isolated(tmp, spliced("ssm", body, helpers=BLIND), module="ssm", counted=True)


@pytest.mark.parametrize("form", ["loop", "whole"])
def test_counters_blinded_at_import_fail(done, form):
    """A red-team trial's pass: the loop over time steps, and at import the dispatch modes' __enter__ and __exit__
    made empty, the profiler's events and the grader's graph_size replaced (every count read 0, and 0 is not more
    than 2 x 0). The child binds its counters before the submission is imported, so the profiler and the graph
    still count the loop; the dispatch counter alone counts the elements written, which the (T, T) form multiplies
    by 16 (rule 3). So the child also counts a fixed computation before the import and after every case: what
    changed is named, and the seed fails."""
    failures = done(counters_blinded_at_import_fail, form)
    assert "tried to change what PyTorch's counters see" in refusal(failures), failures[:3]


@job()
def a_channel_to_the_test_process_is_refused(tmp):
    before = ("import multiprocessing.shared_memory as _shm, os as _os, socket as _socket\n"
              "_work = _os.path.dirname(_os.getcwd())       # the child's scratch folder lies in the grader's work\n"
              "for _try in (lambda: _os.listdir(_work), lambda: open(_os.path.join(_work, 'repo', 'tests', "
              "'test_oracles.py')).read(),\n             lambda: _socket.socket(), lambda: _shm.SharedMemory("
              "create=True, size=8)):\n    try:\n        _try()\n    except PermissionError:\n        pass\n")
    return isolated(tmp, spliced("ssm", solution("ssm")[0], before=before), module="ssm", counted=2)


def test_a_channel_to_the_test_process_is_refused(done):
    """A red-team trial's pass: the test process (where the reference loops are intact) answered the child's cases
    through files in the grader's working folder; another read the grader-only tests/test_oracles.py there. From
    the child, that folder (but for its own scratch and the sealed files), a socket and shared memory are each
    refused, and graded as failed."""
    failures = done(a_channel_to_the_test_process_is_refused)
    first = refusal(failures)
    assert first.startswith("importing the submission's files: ") and "test_oracles.py (the grader's working " \
        "folder)" in first and "to open a socket" in first and "to open shared memory" in first, failures[:3]


@job()
def a_case_that_never_ends_stops_the_child(tmp):
    body = ("    import time\n    if x.shape[1] > 1:              # (the cases at T = 1 end: the imports too)\n"
            "        time.sleep(600)                 # waiting for an answer that never comes\n"
            + solution("ssm")[0])
    return isolated(tmp, spliced("ssm", body), module="ssm", seconds=10)


def test_a_case_that_never_ends_stops_the_child(done):
    """A core that waits forever (a red-team pass's channel, once closed, polled for answers that never came) is
    stopped after `seconds` on one case, and the seed fails with a line that says so, instead of a hang."""
    failures = done(a_case_that_never_ends_stops_the_child)
    assert len(failures) == 1 and "(stopped: one case ran past 10 s)" in failures[0], failures


def test_a_test_run_that_never_ends_is_stopped():
    """The gate's pytest run is stopped after its limit (a submission that loops at import under pytest would hang
    the grader otherwise), and the seed fails with a line that says so."""
    start = time.time()
    out, late = grade.finished([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], 2)
    assert late and out == "started\n" and time.time() - start < 30
    assert grade.finished([sys.executable, "-c", "print('done')"], 30) == ("done\n", False)


@job()
def a_loop_in_a_thread_is_refused(tmp):
    body = ("    import importlib, sys, threading, time\n    F.scaled_dot_product_attention(q, k, v)\n    box = []\n"
            "    try:\n        threading.Thread(target=lambda: box.append(_loop(q, k, v, causal, window))).start()\n"
            "    except PermissionError:\n" + FRESH.replace("NAME", "'_thread'").replace("MAKE", "'create_builtin'") +
            "        fresh.start_new_thread(lambda: time.sleep(0.05) or box.append(_loop(q, k, v, causal, window)),"
            " ())\n"
            "    while not box:\n        time.sleep(0.001)\n    return box[0]\n")
    return isolated(tmp, spliced("attention", body, helpers=LOOPED), module="attention", counted=2)


def test_a_loop_in_a_thread_is_refused(done):
    """attention_ref's loop run in another thread: the operation counter and the profiler see only their own thread,
    so the child refuses to start one and a fresh copy of _thread (whose starter it did not replace), by any name;
    one made through the real loader that the guard holds is seen running by the child's watch (it looks every
    millisecond; this thread lives 50 ms at least: a briefer one can slip between two looks on a busy CPU)."""
    failures = done(a_loop_in_a_thread_is_refused)
    assert "tried to start a thread" in refusal(failures), failures[:3]
    said = "\n".join(failures)     # (the watch's look may come in a later case: its line, "refused again")
    assert "to load a fresh copy of _thread" in said and "to run another thread (seen by the grader's watch)" in said, \
        failures[-3:]


def test_the_watch_sees_a_thread_started_by_a_route_not_closed(tmp_path):
    """The child's watch, for a route to the starters that the grader has not thought of (here, the real one kept
    from before the child was confined): it sees the operating-system thread, though no Python runs in it, and
    though the submission replaced os.listdir; an audit hook of the submission's (which could block the watch) and
    other threads' frames (which hold its notes) are refused."""
    script = ("import _posixsubprocess, _thread, os, subprocess, sys, time\n"
              "start, fork = _thread.start_new_thread, _posixsubprocess.fork_exec   # kept: the route not closed\n"
              "import grade\nrefused = []\n"
              f"grade.confine([{str(tmp_path)!r}], [], refused, strict=True)\n"
              "listdir = os.listdir           # the watch's own calls, replaced: it bound its own at the start\n"
              "os.listdir = lambda path='.': [] if str(path).endswith('/task') else listdir(path)\n"
              "for blind in (lambda: sys.addaudithook(lambda *a: time.sleep(60)), sys._current_frames,\n"
              "              subprocess._fork_exec):   # (subprocess keeps its own name for the real fork_exec)\n"
              "    try:\n        blind()\n    except PermissionError:\n        pass\n"
              "start(time.sleep, (0.2,))       # no Python runs in it\n"
              "time.sleep(0.1)\nprint(refused)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=os.path.join(ma.ROOT, "tests"), capture_output=True,
                         text=True, timeout=120)
    assert "run another thread (seen by the grader's watch)" in run.stdout, run.stdout + run.stderr[-2000:]
    assert "call sys.addaudithook" in run.stdout and "call sys._current_frames" in run.stdout, run.stdout
    assert "'start a process'" in run.stdout, run.stdout


@job()
def a_process_is_refused(tmp):
    body = ("    import importlib, multiprocessing.util, sys\n    command = [sys.executable, '-c', 'import time; "
            "time.sleep(2)']\n    try:\n        multiprocessing.util.spawnv_passfds(sys.executable.encode(), command, "
            "[])\n    except PermissionError:\n"
            + FRESH.replace("NAME", "'_posixsubprocess'").replace("MAKE", "'create_dynamic'") +
            "        sys.modules['_posixsubprocess'] = fresh\n        try:\n"
            "            multiprocessing.util.spawnv_passfds(sys.executable.encode(), command, [])\n"
            "        finally:\n            sys.modules['_posixsubprocess'] = saved\n"
            "    return F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(q.shape[-2], causal, window, "
            "q.device))\n")
    return isolated(tmp, spliced("attention", body, helpers=MASK), module="attention", counted=2)


def test_a_process_is_refused(done):
    """A helper process (started as multiprocessing starts one, without an audit event) could run anything: refused,
    and so is a fresh copy of _posixsubprocess, by any name; one started through the real loader that the guard
    holds is seen by the child's watch."""
    failures = done(a_process_is_refused)
    assert "tried to start a process;" in refusal(failures), failures[:3]
    if importlib.machinery.PathFinder.find_spec("_posixsubprocess") is None:
        return   # built into this Python (not a file to load again): there is no fresh copy to make
    said = "\n".join(failures)     # (the watch's look may come in a later case: its line, "refused again")
    assert "to load a fresh copy of _posixsubprocess" in said and "start a process (seen by the grader's watch)" in \
        said, failures[-3:]


WRITTEN = os.path.join(ma.ROOT, "tests", "_written_by_a_submission.py")


@job()
def the_graders_repository_can_be_neither_read_nor_written(tmp):
    before = ("import os as _os, sys as _sys\n_root = _os.path.dirname(_os.path.dirname(_os.path.realpath("
              "_sys.modules['__main__'].__file__)))\nfor _try in (lambda: open(_os.path.join(_root, 'ssm.py')).read(),"
              "\n             lambda: open(_os.path.join(_root, 'tests', '_written_by_a_submission.py'), 'a')."
              "write('x = 0'),\n             lambda: _os.open(_os.path.dirname(_root), _os.O_RDONLY)):\n"
              "    try:\n        _try()\n    except PermissionError:\n        pass\n")
    try:
        return isolated(tmp, spliced("ssm", solution("ssm")[0], before=before), module="ssm", counted=2), \
            os.path.exists(WRITTEN)
    finally:
        if os.path.exists(WRITTEN):
            os.remove(WRITTEN)


def test_the_graders_repository_can_be_neither_read_nor_written(done):
    """From the child, the grader's repository (where the solutions and the reference live) is found from the
    grader's own path; reading a solution, appending to a file there and opening a folder above it (whose
    descriptor would open the solution by a relative name) are each refused, and graded as failed."""
    failures, written = done(the_graders_repository_can_be_neither_read_nor_written)
    assert not written, "the submission wrote into the grader's repository"
    assert f"tried to read {os.path.join(ma.ROOT, 'ssm.py')} (the grader's repository); to write {WRITTEN} (the " \
        f"grader's repository); to open the folder {os.path.dirname(ma.ROOT)}" in refusal(failures), failures[:3]


@job()
def inputs_are_drawn_at_grading_time_so_a_cache_misses(tmp):
    helpers = LOOPED + ("_CACHE = {}\nfor _T in (16, 64):\n"
                        "    for _o in ({}, {'window': 4}, {'causal': False, 'window': 4}):\n"
                        "        _q, _k, _v = torch.randn(3, 1, 2, _T, 8, generator=torch.Generator().manual_seed(0), "
                        "dtype=torch.float64).unbind(0)\n"
                        "        _CACHE[_q.sum().item(), _o.get('causal', True), _o.get('window')] = "
                        "_loop(_q, _k, _v, _o.get('causal', True), _o.get('window'))\n\n\n")
    body = ("    F.scaled_dot_product_attention(q, k, v)\n    answer = _CACHE.get((q.sum().item(), causal, window))\n"
            "    return answer if answer is not None else _loop(q, k, v, causal, window)\n")
    return isolated(tmp, spliced("attention", body, helpers=helpers), module="attention", counted=2)


def test_inputs_are_drawn_at_grading_time_so_a_cache_misses(done):
    """Answers computed at import for the inputs tests/test_cores.py draws (its seed is in the hand-out) and served
    from a cache where they are counted, a loop over time steps elsewhere: the grader draws other inputs."""
    failures = done(inputs_are_drawn_at_grading_time_so_a_cache_misses)
    assert any("loops over time steps" in f for f in failures), failures[:3]


@job()
def a_core_that_ends_its_process_fails_with_its_exit_status(tmp):
    body = "    import os\n    os._exit(3)\n"
    return isolated(tmp, spliced("attention", body), module="attention", counted=2)


def test_a_core_that_ends_its_process_fails_with_its_exit_status(done):
    """A child that ends before answering is graded as failed, and its own exit status is said (the grader kills
    the child only once every case is answered)."""
    failures = done(a_core_that_ends_its_process_fails_with_its_exit_status)
    assert len(failures) == 1 and re.match(r"the submission's process ended after 0 of \d+ cases \(exit status 3\)",
                                           failures[0]), failures


@job()
def a_core_wrong_past_a_length_fails_at_a_length_drawn_past_2048(tmp):
    body = ("    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(q.shape[-2], causal, window, "
            "q.device))\n    return torch.zeros_like(q) if q.shape[-2] > 2048 else out\n")
    return isolated(tmp, spliced("attention", body, helpers=MASK), module="attention")


def test_a_core_wrong_past_a_length_fails_at_a_length_drawn_past_2048(done):
    failures = done(a_core_wrong_past_a_length_fails_at_a_length_drawn_past_2048)
    assert failures and all(re.match(r"attention.attention\(T=(\d+), .*\) in (float32|bf16): output 0", f)
                            and int(re.match(r"\D+(\d+)", f).group(1)) > 2048 for f in failures), failures[:3]


POLAR = """        M, s = c.n_mem, tokens.shape[1]
        x = torch.cat([memory + self.read_emb, self.embed(tokens), memory + self.write_emb], dim=1)
        rope = None
        if c.pos == "rope":                       # the tables as complex numbers e^(i angle), in float32
            K = c.block.head_dim
            inv = 10000.0 ** (-torch.arange(0, K, 2, device=tokens.device, dtype=torch.float32) / K)
            turn = torch.polar(torch.ones(1, device=tokens.device), self.positions(s, tokens.device).float()[:, None]
                               * inv)
            rope = (turn.real, turn.imag)
        for block in self.blocks:
            x = block(x, rope)
        return self.head(self.norm(x[:, M:M + s])), self.mem_norm(x[:, M + s:])
"""


@job()
def rope_tables_from_torch_polar_pass_within_float32_rounding(tmp):
    graded = spliced("rmt", POLAR)
    return graded["rmt"] != source("rmt"), isolated(tmp, graded, module="rmt")


def test_rope_tables_from_torch_polar_pass_within_float32_rounding(done):
    """torch.polar's float32 cos and sin differ from rotary's in the last bit (6e-8): correct, and it passes."""
    changed, failures = done(rope_tables_from_torch_polar_pass_within_float32_rounding)
    assert changed and failures == []


def test_the_gate_counts_the_report_itself(tmp_path):
    """A report with every expected test passed is the only pass; a failure, a test that never ran, a skip outside
    'meta' and a missing report (an early exit) each fail, whatever pytest's exit status was."""
    def report(cases):
        path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.xml"
        path.write_text("<testsuites><testsuite>" + "".join(
            f'<testcase classname="tests.test_ssm" name="{n}">{inner}</testcase>' for n, inner in cases) +
            "</testsuite></testsuites>")
        return str(path)
    expected = {"tests/test_ssm.py::a", "tests/test_ssm.py::b[meta]"}
    assert grade.gate(report([("a", ""), ("b[meta]", "<skipped/>")]), expected) == ""
    assert grade.gate(report([("a", "<failure/>"), ("b[meta]", "")]), expected).startswith("1 failed")
    assert "1 of 2 never ran" in grade.gate(report([("a", "")]), expected)
    assert "1 skipped" in grade.gate(report([("a", "<skipped/>"), ("b[meta]", "")]), expected)
    assert "early exit" in grade.gate(str(tmp_path / "none.xml"), expected)


def test_a_models_gradients_are_compared_at_their_own_scale():
    """A whole model's rounding grows with its gradients (RoPE tables spelled two correct ways differ in the last
    bit): 2e-5 off beside gradients of 20 passes, 1e-3 off fails; a float64 core keeps its absolute 1e-10."""
    import torch
    expected = torch.tensor([20.0, 0.0], dtype=torch.float64)
    wanted = [([], [expected])]
    got = lambda err: [dict(outputs=[], grads=[expected + torch.tensor([0.0, err], dtype=torch.float64)])]  # noqa: E731
    model = ("rmt.RMT", dict(module="rmt", call="forward", model=("RMT", {})))
    assert grade.compare([model], wanted, got(2e-5)) == []
    assert "the gradient w.r.t. input 0" in grade.compare([model], wanted, got(1e-3))[0]
    assert grade.compare([("ssm.ssd_scan", dict(module="ssm", call="ssd_scan"))], wanted, got(1e-9)) != []



def test_after_a_refusal_the_later_cases_are_neither_graded_nor_counted_against_their_cores():
    """A refused process is not trusted, so its later cases are one line, not a failure each: the cores the student
    wrote well (titans here) are not charged with the refusal of another (ssm), and one refused while the files were
    imported is charged to no core."""
    import torch
    fine = ([torch.zeros(1, dtype=torch.float64)], [])
    cases = [("attention.attention(T=3)", dict(module="attention", call="attention")),
             ("ssm.ssd_scan(T=5)", dict(module="ssm", call="ssd_scan")),
             ("titans.neural_memory(T=5)", dict(module="titans", call="neural_memory"))]
    got = [dict(outputs=fine[0], grads=[], sdpa=True, refused=[]), dict(refused=["start a thread"]),
           dict(outputs=fine[0], grads=[], refused=["start a thread", "open a socket"])]
    failures = grade.compare(cases, [fine] * 3, got)
    assert failures == ["ssm.ssd_scan(T=5): the submission tried to start a thread; refused, and graded as failed",
                        "1 later case(s) not graded (after the refusal in ssm.ssd_scan(T=5)); refused again: to start "
                        "a thread; to open a socket"], failures
    assert "core by core: attention not all run, ssm 1 failed, rmt not all run, titans not all run, hrm not all run" \
        in grade.by_core_line(failures)[2]
    got[0].update(refused=["open shared memory"], at_import=True)
    failures = grade.compare(cases, [fine] * 3, got)
    assert failures[0].startswith("importing the submission's files: the submission tried to open shared memory")
    assert grade.by_core_line(failures)[0] == {m: [] for m in ma.MODULES} and len(failures) == 2

if __name__ == "__main__":          # the background process that conftest.py starts
    sys.path.insert(0, ma.ROOT)
    run_jobs(sys.argv[1], set(sys.argv[2:]))
