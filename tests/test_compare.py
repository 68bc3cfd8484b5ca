"""compare.py: the smoke preset end to end, resumption and stored-run checks, bad input, the metrics, the size match.

The end-to-end tests train real (tiny) models and are marked `slow`: `pytest -m "not slow"` skips them."""
import contextlib
import glob
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn

import compare
import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    """Every model on every task, in worker processes as by default (2 on a 2-core machine)."""
    assert compare.main(["--preset", "smoke", "--workers", "2", "--out", str(tmp_path)]) == 0
    runs = json.load(open(tmp_path / "smoke.json"))["runs"]
    preset = compare.PRESETS["smoke"]
    dial = {k: r for k, r in runs.items() if r.get("dial")}
    assert sorted(dial) == ["ssm[d_state=4]/recall/lr=0.003/seed=0"]
    assert dial["ssm[d_state=4]/recall/lr=0.003/seed=0"]["model_options"]["d_state"] == 4
    runs = {k: r for k, r in runs.items() if k not in dial}
    cells = [(m, t) for t, b in preset["tasks"].items() for m in b.models or preset["models"]
             if getattr(tasks.TASKS[t], "causal", True) or compare.reads_grids(m)]   # grid tasks: no SSM/RMT/Titans
    assert sorted((r["model"], r["task"]) for r in runs.values()) == sorted(cells * len(preset["lrs"]))
    assert ("hrm", "maze") in cells and ("ssm", "maze") not in cells
    assert all(r["model_options"]["causal"] is False for r in runs.values() if r["task"] == "maze")
    hrm_maze = runs["hrm/maze/lr=0.003/seed=0"]["metrics"]
    assert all(set(v["by_segments"]) == {"1", "2"} for v in hrm_maze.values())
    looped = runs["attention_looped/sudoku/lr=0.003/seed=0"]   # read at test-time loops; its compute counted
    assert set(looped["metrics"]["2"]["by_segments"]) == {"1", "2"} and looped["block_calls"] == 4 * 2   # 4 x 2 layers
    assert "by_segments" not in runs["attention/sudoku/lr=0.003/seed=0"]["metrics"]["2"]
    for r in runs.values():   # every test length measured, the spec stored with the run
        assert sorted(r["metrics"], key=int) == [str(L) for L in r["test"]] and r["protocol"] == compare.PROTOCOL
        assert r["examples_seen"] == r["steps"] * r["batch_size"] and set(r["state_size"]) == set(r["metrics"])
    assert len(runs["attention/babilong/lr=0.003/seed=0"]["metrics"]["32"]["by_depth"]) == 4
    text = (tmp_path / "smoke.md").read_text()
    assert "| attention |" in text and "copy@" in text and "| hrm | 3x3 |" in text
    assert "## The dial on recall" in text and "| ssm | d_state=4 (lr 0.003) |" in text
    assert "## babilong: exact match by the depth" in text and "## maze: exact match against path length" in text
    assert all((tmp_path / f"smoke_{name}.png").exists() == (compare.pyplot() is not None)
               for name in ("segments", "tradeoff"))   # the trade-off: recall's dial beside flip-flop


def test_runs_go_to_an_untracked_folder_by_default():
    """A fresh clone's `python compare.py` trains: it never reads or writes the committed reference results."""
    out = compare.parse_args(["--preset", "smoke"]).out
    assert out == os.path.join(ROOT, "runs") and "reference" not in out
    ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(out, "smoke.json")], cwd=ROOT)
    assert ignored.returncode in (0, 128)    # ignored (0), or not a git checkout (128): never tracked (1)


@pytest.mark.slow
def test_interrupted_run_resumes_without_redoing(tmp_path, monkeypatch, capsys):
    argv = ["--preset", "smoke", "--models", "attention", "--tasks", "copy,flipflop,mqar", "--steps", "3",
            "--workers", "1", "--out", str(tmp_path)]  # one worker: the patched run_one runs in this process
    real, calls = compare.run_one, []

    def interrupted_after_two(spec):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(compare.run_key(spec))
        return real(spec)

    monkeypatch.setattr(compare, "run_one", interrupted_after_two)
    assert compare.main(argv) == 130
    saved = json.load(open(tmp_path / "smoke.json"))["runs"]
    assert sorted(saved) == sorted(calls)
    assert "the 2 runs finished by this command are saved" in capsys.readouterr().out

    calls.clear()
    monkeypatch.setattr(compare, "run_one", lambda spec: calls.append(compare.run_key(spec)) or real(spec))
    assert compare.main(argv) == 0
    final = json.load(open(tmp_path / "smoke.json"))["runs"]
    assert len(final) == 3 and len(calls) == 1 and calls[0] not in saved
    for key, record in saved.items():  # the finished runs were kept as they were, not redone
        assert final[key] == record
    commands = json.load(open(tmp_path / "smoke.json"))["meta"]["commands"]   # the time of both commands
    assert [c["runs_run"] for c in commands] == [2, 1] and all(c["wall_time_s"] >= 0 for c in commands)

    calls.clear()   # a changed setting re-runs what it changes, and says so
    assert compare.main(argv[:-2] + ["--steps", "4", "--out", str(tmp_path)]) == 0
    assert len(calls) == 3 and "3 because their settings differ" in capsys.readouterr().out

    calls.clear()   # --fresh starts over and keeps the old file under a new name
    assert compare.main(argv + ["--fresh"]) == 0
    assert len(calls) == 3 and len(list(tmp_path.glob("smoke.*.json"))) == 1


def test_interrupt_before_any_run_finished_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    def interrupted(spec):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, "run_one", interrupted)
    assert compare.main(["--preset", "smoke", "--models", "attention", "--tasks", "copy", "--workers", "1",
                         "--out", str(tmp_path)]) == 130
    assert "nothing new was saved" in capsys.readouterr().out and not (tmp_path / "smoke.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--models", "lstm"], "unknown model 'lstm'"),
    (["--tasks", "sorting"], "unknown task 'sorting'"),
    (["--test-lengths", "-5"], "--test-lengths: expected comma-separated positive integers"),
    (["--seeds", "1,x"], "expected comma-separated integers"),
    (["--tasks", "maze", "--models", "ssm"], "none of the models"),
    (["--tasks", "mqar", "--test-lengths", "15"], "too short"),
    (["--device", "tpu9"], "device"),
    (["--steps", "0"], "--steps"),
    (["--lrs", "inf"], "--lrs: expected comma-separated learning rates from 1e-06 to 1, got 'inf'"),
    (["--lrs", "1e9"], "--lrs: expected comma-separated learning rates from 1e-06 to 1, got '1e9'"),
    (["--lrs", "1e-3,0.001"], "--lrs: 0.001 is given twice in '1e-3,0.001'"),
    (["--seeds", "0,0"], "--seeds: 0 is given twice in '0,0'; expected comma-separated integers from 0 to 4294967295"),
    (["--seeds", "99999999999999999999"], "--seeds: expected comma-separated integers from 0 to 4294967295, got"),
    (["--models", "ssm,ssm"], "--models: ssm is given twice"),
    (["--preset", "quick", "--tasks", "maze"], "no settings in preset 'quick'; it has copy, flipflop (try --preset "
                                               "smoke or --preset depth)"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke"] + args)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_maze_size_with_no_fresh_test_maze_is_one_line(monkeypatch, capsys):
    """The argument check asks each task for its lengths; a maze size whose training set holds every maze (2x2
    cells, 1,000 training mazes) stops it with the task's one line, before any training."""
    monkeypatch.setitem(compare.PRESETS["smoke"]["tasks"]["maze"].options, "n_train", 1000)
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke", "--tasks", "maze", "--models", "hrm", "--test-lengths", "2"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and "no 2x2 maze outside the training set" in err and "\n" not in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a readable results file"),
    ("", "is not a readable results file"),
    ('{"runs": [1, 2]}', "does not hold compare.py runs"),
    ('{"meta": {"preset": "quick"}, "runs": {}}', "holds runs of preset 'quick', not 'smoke'"),
])
def test_a_bad_results_file_stops_with_one_line_and_is_kept(tmp_path, content, message, capsys):
    (tmp_path / "smoke.json").write_text(content)
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert exit.value.code not in (0, None) and message in str(exit.value) and "--fresh" in str(exit.value)
    assert "\n" not in str(exit.value) and (tmp_path / "smoke.json").read_text() == content


def test_out_must_be_a_writable_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cases = [(tmp_path / "a_file", "is a file;"), (tmp_path / "a_file" / "below", "a part of the path is a file;")]
    if os.path.isdir("/proc"):                      # a folder where no file can be made (Linux)
        cases.append(("/proc", "no file can be made there;"))
    for out, why in cases:
        with pytest.raises(SystemExit) as exit:
            compare.main(["--preset", "smoke", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and f"--out {str(out)!r}" in err and why in err and "\n" not in err
        assert "expected a folder (new or existing) that this process can write to" in err


def test_a_test_length_whose_evaluation_cannot_fit_is_refused_before_training(monkeypatch, capsys):
    """A test length past one of evaluate's batches is read as one sequence: if its forward would need more memory
    than the device has (here a device of 1 GiB), the command stops before any training, saying how much."""
    monkeypatch.setattr(compare, "device_bytes", lambda device: 2 ** 30)
    monkeypatch.setattr(compare, "run_one", lambda spec: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke", "--models", "ssm", "--tasks", "flipflop", "--test-lengths", "32,1000000"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and "\n" not in err
    need = float(re.search(r"--test-lengths 1000000: testing ssm on flipflop at that length reads 1,000,000 tokens at "
                           r"once and needs about ([\d,.]+) GiB, more than the device's 1.0 GiB \(cpu\); expected "
                           r"test lengths whose evaluation fits in 1.0 GiB$", err).group(1))
    assert 9 < need < 12    # 10.6 GiB when this was written: the SSM's (T / chunk)^2 decays, not a linear guess


def test_the_memory_of_an_evaluation_is_counted_not_guessed():
    """eval_bytes counts a forward on fake tensors as LiveBytes counts it on real ones; a forward of more than
    max_ops ops (a Python loop over segments) is counted at 1,024 tokens and scaled linearly."""
    torch.manual_seed(0)
    model = compare.build_model("ssm", 5, d_model=32, n_layers=2).eval()
    def counted(tokens):   # what evaluate holds for one sequence, counted on real tensors
        with torch.no_grad(), compare.LiveBytes() as live:
            x = y = torch.zeros(1, tokens, dtype=torch.long)
            logits = model(x).float()
            nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), logits.argmax(-1)
        return live.peak
    assert compare.eval_bytes(model, 4096, "cpu") == counted(4096)                      # the same bytes, exactly
    assert compare.eval_bytes(model, 4096, "cpu", max_ops=0) == 4 * counted(1024)


def stored_run(**changes):
    """A stored run of this protocol as run_one makes it, with some fields changed."""
    run = dict(model="attention", task="copy", lr=0.003, seed=0, protocol=compare.PROTOCOL, params=1000,
               state_size={"6": 10}, examples_seen=32, final_loss=0.5, val_token_acc=0.9, val_loss=0.4,
               wall_time_s=1.0, diverged_at=None, metrics={"6": {"token_acc": 0.9, "loss": 0.4, "exact": None,
                                                                  "gen_exact": 0.5}})
    return {**run, **changes}


@pytest.mark.parametrize("changes, message", [
    (dict(metrics=[1, 2]), "has metrics [1, 2], expected a dict"),
    (dict(metrics={"6": {"token_acc": 1.5}}), "has metrics['6']['token_acc'] 1.5, expected an accuracy in [0, 1]"),
    (dict(metrics={"6": {"token_acc": 0.5, "by_depth": [0.1, "x"]}}), "has metrics['6']['by_depth'] [0.1, 'x']"),
    (dict(metrics={"6": {"by_path": {"20": [0.5, 2.5]}}}), "has metrics['6']['by_path'] {'20': [0.5, 2.5]}"),
    (dict(metrics={"6": {"by_segments": {"2": {"exact": -1}}}}), "has metrics['6']['by_segments']['2']['exact'] -1"),
    (dict(val_token_acc=float("nan")), "has val_token_acc nan, expected an accuracy in [0, 1] or null"),
    (dict(params="1000"), "has params '1000', expected a count"),
    (dict(state_size={"6": 2.5}), "has state_size['6'] 2.5, expected a count"),
    (dict(state_size=None), "has state_size None, expected a dict"),
])
def test_a_stored_run_with_a_field_of_the_wrong_type_or_range_is_refused(tmp_path, changes, message):
    key = "attention/copy/lr=0.003/seed=0"
    (tmp_path / "smoke.json").write_text(json.dumps({"meta": {"preset": "smoke"}, "runs": {key: stored_run()}}))
    assert compare.load_runs(str(tmp_path / "smoke.json"), "smoke", False)[0]     # the run as made is fine
    content = json.dumps({"meta": {"preset": "smoke"}, "runs": {key: stored_run(**changes)}})
    (tmp_path / "smoke.json").write_text(content)
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert str(exit.value).startswith(f"compare.py: error: {tmp_path / 'smoke.json'} holds a run {key!r} that ")
    assert message in str(exit.value) and "--fresh" in str(exit.value) and "\n" not in str(exit.value)
    assert (tmp_path / "smoke.json").read_text() == content                         # left as it was
    old = json.dumps({"meta": {"preset": "smoke"}, "runs": {key: stored_run(**changes, protocol=1)}})
    (tmp_path / "smoke.json").write_text(old)                                        # another protocol: run again
    assert compare.load_runs(str(tmp_path / "smoke.json"), "smoke", False)[0]


def test_workers_are_capped_at_the_cores_and_workers_times_threads_never_exceeds_them(tmp_path, monkeypatch, capsys):
    """--workers 1000 on one core runs one worker, and the header says so; on a CPU, workers x torch threads never
    exceeds the cores, nor does a worker get more threads than this process has (OMP_NUM_THREADS, say)."""
    monkeypatch.setattr(compare, "usable_cores", lambda: 1)
    started = []

    def stop_at_once(spec):
        started.append(spec)
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, "run_one", stop_at_once)
    assert compare.main(["--preset", "smoke", "--models", "attention", "--tasks", "copy", "--workers", "1000",
                         "--out", str(tmp_path)]) == 130
    assert "1 worker(s) (--workers 1000 is capped at the 1 CPU cores)" in capsys.readouterr().out
    assert len(started) == 1 and started[0]["threads"] == 1
    threads = torch.get_num_threads()
    for cores in (1, 2, 3, 8, 64):
        monkeypatch.setattr(compare, "usable_cores", lambda: cores)
        for workers in range(1, cores + 1):
            assert 1 <= compare.cpu_threads(workers) <= threads and workers * compare.cpu_threads(workers) <= cores


def test_bad_input_from_the_shell_has_no_traceback():
    out = subprocess.run([sys.executable, "compare.py", "--models", "nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "unknown model" in out.stderr


def smoke_command(out, *args, steps=2):
    """`python compare.py --preset smoke` in its own process: a thread a worker, one worker unless args say."""
    return subprocess.Popen([sys.executable, "compare.py", "--preset", "smoke", "--steps", str(steps), "--out",
                             str(out), *(args if "--workers" in args else args + ("--workers", "1"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))   # a thread each: the cores are shared


@pytest.mark.slow
def test_three_commands_at_once_on_one_folder_keep_every_run_and_train_none_twice(tmp_path):
    """Three commands at once on one --out: two with different --models, and a third the same as the first. Each
    stores its runs under a lock, merged with what the others stored, through a temporary file of its own: none is
    dropped, none fails. A run that one command is training is waited for by the other, then reused: between them
    the two identical commands train each of their runs once, and both report all of them."""
    jobs = [smoke_command(tmp_path, "--models", m, "--tasks", "copy,flipflop")
            for m in ("attention", "ssm", "attention")]
    outs = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], [err[-1500:] for _, err in outs]
    runs = json.load(open(tmp_path / "smoke.json"))["runs"]
    assert sorted(runs) == sorted(f"{m}/{t}/lr=0.003/seed=0" for m in ("attention", "ssm")
                                  for t in ("copy", "flipflop"))
    trained = [int(re.search(r"(\d+) runs trained by this command", out).group(1)) for out, _ in outs]
    assert trained[1] == 2 and trained[0] + trained[2] == 2, trained
    assert all(out.count("| attention |") for out, _ in outs[::2]) and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_a_run_another_live_command_claimed_is_waited_for_and_taken_over_if_it_ends_unstored(tmp_path, monkeypatch,
                                                                                             capsys):
    """A run claimed in the lock file by a live process is left to it, and the command says it waits; once that
    process has ended without storing the run (killed, say), the command trains the run itself."""
    other = subprocess.Popen(["sleep", "300"])                       # "another command", which will store nothing
    (tmp_path / "smoke.json.lock").write_text(json.dumps({"attention/copy/lr=0.003/seed=0": other.pid}))

    sync = compare.Store.sync

    def sync_then_end_the_other(store):                              # once the command has seen the claim
        others = sync(store)
        if other.pid in others.values():
            other.kill()
            other.wait()                                             # reaped: a zombie would still look alive
        return others
    monkeypatch.setattr(compare.Store, "sync", sync_then_end_the_other)
    try:
        assert compare.main(["--preset", "smoke", "--models", "attention", "--tasks", "copy,flipflop", "--steps", "2",
                             "--workers", "1", "--out", str(tmp_path)]) == 0
    finally:                                                         # (never left behind by a failing test)
        other.kill()
        other.wait()
    out = capsys.readouterr().out
    assert f"waiting for 1 runs that another command (pid {other.pid}) is training in {tmp_path}" in out
    assert "2 runs trained by this command" in out and other.returncode is not None
    assert json.loads((tmp_path / "smoke.json.lock").read_text()) == {}          # no claim left behind


@pytest.mark.parametrize("name", ["attention", "ssm", "rmt", "titans", "hrm"])
def test_python_model_py_benchmarks_on_one_thread_unless_told_otherwise(name, monkeypatch):
    """`python <model>.py` sets one torch thread before its work (torch itself reads OMP_NUM_THREADS when set)."""
    class ThreadsSet(Exception):
        pass

    def stop(n):
        raise ThreadsSet(n)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", stop)              # stops the script where it sets them
    with pytest.raises(ThreadsSet) as threads:
        runpy.run_path(os.path.join(ROOT, f"{name}.py"), run_name="__main__")
    assert threads.value.args == (1,)


def workers_of(pid):
    """The worker processes of compare.py's main process `pid` that are still running (Linux: from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            state, ppid = open(stat).read().rsplit(")", 1)[1].split()[:2]
            cmdline = open(stat[:-len("stat")] + "cmdline").read()
        except OSError:                                    # ended meanwhile
            continue
        if int(ppid) == pid and state not in "ZX" and "spawn_main" in cmdline:
            found.append(int(stat.split("/")[2]))
    return found


def still_running(pids, seconds=15):
    """Those of pids that still run (neither gone nor a zombie) after waiting up to `seconds` for them to end."""
    def running(pid):
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] not in "ZX"
        except OSError:
            return False
    deadline = time.time() + seconds
    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.2)
    return [pid for pid in pids if running(pid)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the process table from /proc (Linux)")
def test_workers_end_with_the_main_process_however_it_is_stopped(tmp_path):
    """Two commands with two workers each, stopped mid-run. `kill PID` (SIGTERM) stops one as Ctrl-C does: a
    message, the finished runs kept, exit status 143 (128 + SIGTERM), its workers ended. `kill -9` cannot be
    caught: the other's workers notice that their parent is gone and end within seconds, mid-run."""
    jobs = {sig: smoke_command(tmp_path / sig.name, "--models", "attention,ssm", "--tasks", "copy,flipflop",
                               "--workers", "2", steps=300) for sig in (signal.SIGTERM, signal.SIGKILL)}
    workers, deadline = {}, time.time() + 240
    while len(workers) < len(jobs):                    # SIGTERM once a run is stored, SIGKILL once both workers run
        for sig, job in [(sig, job) for sig, job in jobs.items() if sig not in workers]:
            assert job.poll() is None and time.time() < deadline, job.communicate()
            if len(workers_of(job.pid)) == 2 and (
                    sig == signal.SIGKILL or (tmp_path / sig.name / "smoke.json").exists()):
                workers[sig] = workers_of(job.pid)
                job.send_signal(sig)
        time.sleep(0.1)
    out, err = jobs[signal.SIGTERM].communicate(timeout=120)
    assert jobs[signal.SIGTERM].returncode == 143, err[-1500:]
    stopped = re.search(r"stopped by SIGTERM: the (\d+) runs finished by this command are saved", out)
    runs = json.load(open(tmp_path / "SIGTERM" / "smoke.json"))["runs"]
    assert stopped and len(runs) == int(stopped.group(1)) >= 1 and "Traceback" not in err
    assert jobs[signal.SIGKILL].wait(timeout=60) == -signal.SIGKILL
    left = still_running(workers[signal.SIGTERM] + workers[signal.SIGKILL])
    for pid in left:                                   # (orphans of a failed test are not left behind)
        os.kill(pid, signal.SIGKILL)
    assert left == []


class CopyOracle(nn.Module):
    """A hand-made causal 'model' that copies perfectly: after `|`, predict the letter n positions back."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, self.task.vocab_size)
        for b in range(B):
            sep = (x[b] == self.task.sep).nonzero()[0, 0].item()
            for t in range(sep, T):
                logits[b, t, x[b, 1 + t - sep]] = 1.0
        return logits


def test_evaluate_stores_an_overflowed_loss_as_null():
    """A model whose logits overflow has no loss to report: null, which strict JSON can hold (NaN it cannot)."""
    task = tasks.FlipFlop()
    overflowing = lambda x: torch.full((*x.shape, task.vocab_size), float("nan"))  # noqa: E731
    overflowing.eval = overflowing.to = lambda *a, **k: overflowing
    m = compare.evaluate(overflowing, task, 16, n_examples=4)
    assert m["loss"] is None and 0 <= m["token_acc"] <= 1
    json.dumps(m, allow_nan=False)


def test_evaluate_scores_a_perfect_copier_perfectly():
    task = tasks.Copy()
    m = compare.evaluate(CopyOracle(task), task, 7, n_examples=10)
    V = task.vocab_size    # logit 1 on the right letter, 0 on the V - 1 others: loss log(V - 1 + e) - 1
    assert m == {"token_acc": 1.0, "exact": 1.0, "gen_exact": 1.0, "loss": pytest.approx(math.log(V - 1 + math.e) - 1)}


def test_evaluate_scores_a_constant_model_at_chance():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 5).index_fill_(2, torch.tensor([3]), 1.0)  # always says bit 0
    m = compare.evaluate(Constant(), tasks.FlipFlop(), 64, n_examples=200)
    assert 0.4 < m["token_acc"] < 0.6
    # the validation loss (which breaks ties between learning rates): -log softmax of the target's logit, averaged
    # over scored positions; logits (0, 0, 0, 1, 0): log(4 + e) - 1 when right, log(4 + e) when wrong
    right = m["token_acc"]
    assert m["loss"] == pytest.approx(math.log(4 + math.e) - right, rel=1e-5)


def test_exact_match_counts_only_examples_with_a_scored_position():
    """An always-wrong model scores exact 0, even on a stream where some examples ask nothing; when no example
    asks anything, exact is None rather than a perfect score."""
    class Wrong(nn.Module):
        def forward(self, x):   # flip-flop answers are bits 0/1 (ids 3, 4); say 'w' (id 0) everywhere
            return torch.zeros(*x.shape, 5).index_fill_(2, torch.tensor([0]), 1.0)
    task = tasks.TASKS["flipflop_sparse"]()
    x, y = task.sample(200, 32, seed=0)
    assert (y != tasks.IGNORE).any(1).float().mean() < 0.9        # the case: some examples score nothing
    m = compare.evaluate(Wrong(), task, 32, n_examples=200)
    assert m["token_acc"] == 0.0 and m["exact"] == 0.0

    class NothingScored(tasks.FlipFlop):
        def sample(self, batch_size, length, seed=0, device="cpu"):
            x, y = super().sample(batch_size, length, seed, device)
            return x, torch.full_like(y, tasks.IGNORE)
    assert compare.evaluate(Wrong(), NothingScored(), 16, n_examples=8)["exact"] is None


def test_evaluate_keeps_the_mazes_exact_match_by_path_length():
    """by_path against a count made here: a model right on every other test maze, each maze's path counted from y
    (its marked squares, and S and G), in bins of 20 squares named by their lowest."""
    task = tasks.Maze(canvas=17, n_train=1)
    examples = [(x, y) for xs, ys, _ in compare.test_batches(task, 8, 64, seed=3) for x, y in zip(xs, ys)]
    answers = {x.numpy().tobytes(): y.clamp(min=0) if i % 2 == 0 else torch.zeros_like(y)   # (wrong: all walls)
               for i, (x, y) in enumerate(examples)}

    class EveryOther(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot(torch.stack([answers[a.numpy().tobytes()] for a in x]), 5).float()
    expected = {}
    for i, (_, y) in enumerate(examples):
        squares = (y == tasks.Maze.PATH).sum().item() + 2
        right, n = expected.get(str(squares // 20 * 20), (0, 0))
        expected[str(squares // 20 * 20)] = (right + (i % 2 == 0), n + 1)
    m = compare.evaluate(EveryOther(), task, 8, 64, seed=3)
    assert len(expected) >= 3 and m["exact"] == 0.5                     # the case: several bins, half right
    assert m["by_path"] == {b: [right / n, n] for b, (right, n) in expected.items()}


def test_the_report_gives_the_mazes_path_bins_size_by_size():
    """The maze's table by path length: one row per model and maze size, never pooled over sizes (larger mazes
    have longer paths, so pooled bins would mix sizes: two seeds' rates at 8x8 are 1.0 and 0.0, kept apart from
    6x6's); a bin no maze of a size falls in is left empty; the first bin starts at min_path, the shortest path drawn."""
    runs = []
    for seed, rate in [(0, 1.0), (1, 0.0)]:
        metrics = {"6": {"token_acc": 0.9, "exact": 0.5, "by_path": {"20": [0.5, 4]}},
                   "8": {"token_acc": 0.9, "exact": 0.5, "by_path": {"20": [rate, 2], "40": [0.0, 3]}}}
        runs.append(stored_run(model="hrm", task="maze", test=[6, 8], train=[6, 6], steps=10, batch_size=4,
                               seed=seed, task_options={"min_path": 30}, state_size={"6": 1, "8": 1},
                               metrics=metrics))
    meta = dict(preset="depth", command="test", device_name="CPU", torch="-", commit="-", lrs=[0.003])
    text, figures = compare.report(runs, meta, ["maze"], ["hrm"])
    assert ("| model | size | 30-39 | 40-59 |\n|---|---|---|---|\n| hrm | 6x6 | 0.50±0.00 |  |\n"
            "| hrm | 8x8 | 0.50±0.50 | 0.00±0.00 |") in text
    assert figures["depth"][0]["xs"] == [20, 40]


@pytest.mark.parametrize("preset,task", [(p, t) for p in ("full", "depth") for t in compare.PRESETS[p]["tasks"]])
def test_every_model_of_the_gpu_presets_is_within_10_percent_of_attention(preset, task):
    """Matched size (README, 'How the bench is fair'): parameters within +-10% of the Transformer on that task. (The
    dial's other state sizes are left out: a larger state is more parameters, by design.)"""
    args = compare.parse_args(["--preset", preset, "--device", "cpu", "--tasks", task])
    specs = [s for s in compare.make_specs(args) if not s.get("dial")]
    vocab = tasks.TASKS[task](**compare.PRESETS[preset]["tasks"][task].options).vocab_size
    size = {s["model"]: compare.n_params(compare.build_model(s["model"], vocab, **s["model_options"])) for s in specs}
    assert "attention" in size and len(size) >= 3
    for m, n in size.items():
        assert 0.9 <= n / size["attention"] <= 1.1, f"{m} on {task}: {n:,} vs attention {size['attention']:,}"


def test_build_model_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        compare.build_model("lstm", 10)
    with pytest.raises(ValueError, match="no option"):
        compare.build_model("attention", 10, n_experts=4)
    assert compare.build_model("attention_nope", 10).config.pos == "none"


@pytest.mark.slow
def test_training_learns_flipflop():
    """The harness can teach: a tiny Transformer trained briefly reads flip-flop bits well above chance (0.5);
    150 steps reached 0.85 when this test was written."""
    torch.manual_seed(0)
    task = tasks.FlipFlop()
    model = compare.build_model("attention", task.vocab_size, d_model=32, n_layers=1)
    losses = compare.train(model, task, steps=150, batch_size=32, lr=3e-3, train_lengths=[16, 16])
    assert sum(losses[-10:]) < sum(losses[:10])
    assert compare.evaluate(model, task, 16, n_examples=256)["token_acc"] > 0.75


@pytest.mark.parametrize("name", [m for m in compare.MODELS])
def test_right_padding_changes_no_loss_and_no_gradient(name):
    """The CUDA-graph path pads a causal batch on the right with unscored positions (fewer shapes to capture):
    by causality that must leave the loss and every gradient as they were. float64, odd lengths, every model."""
    torch.manual_seed(0)
    task = tasks.FlipFlop()
    model = compare.build_model(name, task.vocab_size, d_model=16, n_layers=2).double()
    x, y = task.sample(3, 37, seed=1)
    grads = []
    for pad in (0, 27):
        model.zero_grad()
        xp, yp = nn.functional.pad(x, (0, pad)), nn.functional.pad(y, (0, pad), value=tasks.IGNORE)
        losses = [nn.functional.cross_entropy(o.flatten(0, 1), yp.flatten(), ignore_index=tasks.IGNORE)
                  for o in compare.all_logits(model, xp)]
        (sum(losses) / len(losses)).backward()
        grads.append([sum(losses).item()] + [p.grad.clone() for p in model.parameters()])
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    for g0, g1 in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(g1, g0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(compare.MODELS))
def test_every_model_makes_its_tensors_on_its_inputs_device(name, monkeypatch):
    """On PyTorch's data-free 'meta' device, a tensor made elsewhere (a torch.arange without device=) meets the
    model's tensors and fails: the forward pass, the backward pass, and a stream read in two pieces. (autocast has
    no 'meta' mode; the SSM and Titans only switch it off, so here it is replaced by nothing.)"""
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    model = compare.build_model(name, 7, d_model=16, n_layers=2).to("meta")
    x = torch.randint(0, 7, (2, 37)).to("meta")
    outputs = compare.all_logits(model, x)
    assert all(o.device.type == "meta" and o.shape == (2, 37, 7) for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert all(p.grad.device.type == "meta" for p in model.parameters() if p.grad is not None)
    if hasattr(model, "stream"):
        with torch.no_grad():
            _, state = model.stream(x[:, :32])
            logits, _ = model.stream(x[:, 32:], state)
        assert logits.device.type == "meta" and logits.shape == (2, 5, 7)


@pytest.mark.parametrize("name", list(compare.MODELS))
def test_size_options_reach_every_block(name):
    """The width, heads, MLP ratio and depth that a preset sets reach every block of every model (RMT builds its
    Blocks from a config of its own), and every model ends in the same bias-free head."""
    model = compare.build_model(name, 7, d_model=24, n_layers=2, n_heads=3, mlp_ratio=2)
    mlps = [m for m in model.modules() if type(m).__name__ == "MLP"]
    attentions = [m for m in model.modules() if type(m).__name__ == "SelfAttention"]
    assert len(mlps) == 2 and all(m.fc.in_features == 24 and m.fc.out_features == 48 for m in mlps)
    assert all(a.config.n_heads == 3 and a.config.d_model == 24 for a in attentions)
    assert model.head.bias is None and model.head.weight.shape == (7, 24)


CELLS = [(m, "flipflop") for m in compare.MODELS] + [(m, "maze") for m in compare.MODELS if compare.reads_grids(m)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,task_name", CELLS)
def test_cuda_graph_training_learns_what_the_eager_loop_learns(name, task_name):
    """The fast path (the whole step replayed from CUDA graphs, one per padded batch shape, the warm-up undone)
    gives the eager loop's losses and weights. Flip-flop lengths drawn from [20, 40] pad to 32 or 64 tokens: two
    graphs, each replayed several times; the maze (bidirectional, never padded) has one shape."""
    task, lengths = (tasks.Maze(canvas=9, n_train=50), [3, 4]) if task_name == "maze" else (tasks.FlipFlop(), [20, 40])
    results = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = compare.build_model(name, task.vocab_size, d_model=32, n_layers=2,
                                    **({"causal": False} if task_name == "maze" else {}))
        losses = compare.train(model, task, steps=12, batch_size=8, lr=3e-3, train_lengths=lengths, device="cuda",
                               graphs=graphs)
        results.append((torch.tensor(losses), [p.detach().float().cpu() for p in model.parameters()]))
    (eager, w_eager), (fast, w_fast) = results
    assert len(eager) == len(fast) == 12 and torch.isfinite(eager).all()
    torch.testing.assert_close(fast, eager, rtol=2e-3, atol=2e-3)
    for a, b in zip(w_fast, w_eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)   # Adam moves a weight ~lr a step, whatever the gradient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["rmt", "titans"])
def test_stream_graphs_read_what_the_eager_stream_reads(name, monkeypatch):
    """--scale's reading on CUDA: a recurrent model's `stream`, replayed from CUDA graphs run by run of a span
    (the first run eager, as it fixes the state's shapes; a short tail eager too), gives the eager stream's logits
    and state, in fp32 and under bf16 autocast, with a graph captured once per shape and reused."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # Titans' conv: fp32 (cuDNN's default: TF32)
    torch.manual_seed(0)
    model = compare.build_model(name, 11, d_model=32, n_layers=2).cuda().eval()
    x = torch.randint(0, 11, (2, 5 * 64 + 32), device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        graphs = compare.StreamGraphs(64)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
            eager = torch.cat([model.stream(p, s)[0] for p, s in spans(model, x, 64)], dim=1)   # the graphs' spans
            eager_state = model.stream(*spans(model, x, 64)[-1])[1]
            first, state = graphs(model, x[:, :192], None)
            second, state = graphs(model, x[:, 192:], state)
        assert len(graphs.graphs) == 1
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(torch.cat([first, second], dim=1), eager, **tol)
        for a, b in zip(compare.tensors(state), compare.tensors(eager_state)):
            torch.testing.assert_close(a, b, **tol)


def spans(model, x, span):
    """(piece, state before it) for each span of x, the state carried by the eager stream."""
    out, state = [], None
    for piece in x.split(span, dim=1):
        out.append((piece, state))
        state = model.stream(piece, state)[1]
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_stream_graphs_in_threads_read_what_the_eager_stream_reads(monkeypatch):
    """--scale on CUDA reads its cells in threads of one process, each on a CUDA stream of its own, one capturing
    its graphs while the others replay theirs: each reads what its eager stream reads."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)    # Titans' conv: fp32 as on the CPU
    x = torch.randint(0, 11, (2, 9 * 64 + 32), device="cuda")
    models, eager, out = {}, {}, {}
    for name in ("rmt", "titans", "rmt_again", "titans_again"):
        torch.manual_seed(len(models))
        models[name] = compare.build_model(name.split("_")[0], 11, d_model=32, n_layers=2).cuda().eval()
        with torch.no_grad():   # the same spans, eager: one call on the whole differs by fp32's rounding (Titans)
            eager[name] = torch.cat([models[name].stream(p, s)[0] for p, s in spans(models[name], x, 64)], dim=1)

    def read(name):
        with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream()):
            graphs, state, logits = compare.StreamGraphs(64), None, []
            for piece in x.split(128, dim=1):
                y, state = graphs(models[name], piece, state)
                logits.append(y)
            torch.cuda.current_stream().synchronize()
            out[name] = torch.cat(logits, dim=1)
    threads = [threading.Thread(target=read, args=(name,)) for name in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in models:
        torch.testing.assert_close(out[name], eager[name], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a GPU")
def test_read_streams_on_a_gpu_reads_its_cells_as_threads(tmp_path):
    """--scale's reading on CUDA end to end: three cells at once, as threads of this process on their own streams,
    give each cell's rows, marked as sharing the GPU, and about what a cell reads alone. (A smoke test: untrained
    models' logits nearly tie, and the streams' cuBLAS workspaces differ, so a few tokens may go the other way.)"""
    cells = {}
    for m in ("rmt", "titans", "ssm"):
        torch.manual_seed(0)
        torch.save(compare.build_model(m, 5, d_model=32, n_layers=2).state_dict(), tmp_path / f"{m}.pt")
        cells[m, "flipflop"] = [dict(task_options={}, model_options=dict(d_model=32, n_layers=2), weights=f"{m}.pt",
                                     train=[32, 64], diverged_at=None)]
    together, alone = [], []
    compare.read_streams(cells, [20_000, 40_000], 4, ["cuda:0"], str(tmp_path), together, lambda: None)
    compare.read_streams({("rmt", "flipflop"): cells["rmt", "flipflop"]}, [20_000, 40_000], 4, ["cuda:0"],
                         str(tmp_path), alone, lambda: None)
    assert sorted((r["model"], r["length"], r["shared"]) for r in together) == sorted(
        (m, L, True) for m in ("rmt", "titans", "ssm") for L in (20_000, 40_000))
    rmt = [r for r in together if r["model"] == "rmt"]   # (what it reads is held to the eager stream above)
    assert not alone[0]["shared"] and all(abs(a["token_acc"] - b["token_acc"]) < 0.05 for a, b in zip(rmt, alone))


def test_a_stream_read_stops_at_its_next_piece_once_told():
    """A reading thread cannot be killed: scale_read looks at STOP before each piece and raises KeyboardInterrupt."""
    model = compare.build_model("ssm", 5, d_model=16, n_layers=1).eval()
    compare.STOP.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            compare.scale_read(model, tasks.FlipFlop(), 4000, 1, 1000, "cpu", 0)
    finally:
        compare.STOP.clear()
    assert compare.scale_read(model, tasks.FlipFlop(), 4000, 1, 1000, "cpu", 0)["scored"] > 0


def test_threads_of_run_all_stop_when_it_is_stopped():
    """Threads cannot be killed like worker processes: when one run raises (Ctrl-C reaches the main thread), run_all
    sets STOP, which the others see at their next piece, waits for them, and clears it for the next command."""
    seen = []

    def work(spec):
        if spec["i"] == 0:
            time.sleep(0.1)
            raise KeyboardInterrupt
        for _ in range(3000):                         # 30 s unless told to stop
            if compare.STOP.is_set():
                seen.append(spec["i"])
                raise KeyboardInterrupt("stopped")
            time.sleep(0.01)
        return []

    with pytest.raises(KeyboardInterrupt):
        compare.run_all([dict(i=i, task="flipflop", model="ssm") for i in range(3)], 3, ["cpu"], lambda r: [],
                        work=work, threads=True)
    assert sorted(seen) == [1, 2] and not compare.STOP.is_set()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_one_process_trains_with_graphs_on_one_gpu_then_another():
    """A worker process runs one run on cuda:0, the next on cuda:1 (run_one makes the run's GPU current). The
    captures must happen on the current GPU: torch.cuda.graph's default capture stream, made at the first
    capture, belongs to cuda:0, and a capture on it failed with "operation not permitted when stream is
    capturing" (the full preset on two H200s stopped so)."""
    task = tasks.FlipFlop()
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = compare.build_model("rmt", task.vocab_size, d_model=32, n_layers=2)
        losses = compare.train(model, task, steps=6, batch_size=8, lr=3e-3, train_lengths=[20, 40], device=device)
        assert len(losses) == 6 and all(map(math.isfinite, losses)), device


def test_a_diverged_run_stops_at_its_first_non_finite_loss():
    """Losses stay on the device and are read in blocks; a non-finite one ends the list there."""
    torch.manual_seed(0)
    model = compare.build_model("attention", 5, d_model=16, n_layers=1)
    losses = compare.train(model, tasks.FlipFlop(), steps=40, batch_size=8, lr=1e12, train_lengths=[32, 32],
                           check_every=7)
    assert 1 < len(losses) < 40 and not math.isfinite(losses[-1]) and all(map(math.isfinite, losses[:-1]))


def test_a_diverged_run_is_stored_as_such_never_chosen_and_reported(tmp_path):
    """A run whose loss goes non-finite is stored with the step it diverged at and no metrics (valid JSON, no NaN);
    the lr choice passes over it, and the report says "diverged" where its numbers would be."""
    args = compare.parse_args(["--preset", "smoke", "--models", "attention", "--tasks", "flipflop", "--out",
                               str(tmp_path)])
    spec = dict(compare.make_specs(args)[0], steps=12)
    bad, good = compare.run_one(dict(spec, lr=1e12)), compare.run_one(dict(spec, lr=3e-3))
    assert bad["diverged_at"] is not None and bad["metrics"] == {} and good["diverged_at"] is None
    json.dumps(bad, allow_nan=False)
    bad = dict(bad, lr=1e-4)   # relabelled below the good rate: unguarded, its nan score could win on order alone
    later_seed = dict(bad, lr=3e-3, seed=1)            # a second seed at the chosen lr that diverged
    best = compare.best_runs([bad, good, later_seed])
    assert [(r["lr"], r["seed"]) for r in best[("attention", "flipflop")]] == [(3e-3, 0), (3e-3, 1)]
    meta = dict(preset="smoke", command="test", device_name="CPU", torch="-", commit="-", lrs=[1e-4, 3e-3])
    text, _ = compare.report([bad, good, later_seed], meta, ["flipflop"], ["attention"])
    assert "(1 diverged)" in text and f"seed 1 diverged at step {bad['diverged_at']}" in text
    assert "| flipflop | 12 | 16 | 32 | 32, 128 | - |" in text          # the budget: steps, batch, lengths
    text, _ = compare.report([bad], meta, ["flipflop"], ["attention"])    # every lr diverged
    assert "| attention | diverged |" in text


def test_curriculum_draws_lengths_stage_by_stage():
    seen = []

    class Recorder(tasks.FlipFlop):
        def sample(self, batch_size, length, seed=0, device="cpu"):
            seen.append(length)
            return super().sample(batch_size, length, seed, device)

    model = compare.build_model("attention", 5, d_model=16, n_layers=1)
    compare.train(model, Recorder(), steps=6, batch_size=2, lr=1e-3, train_lengths=[[4, 4], [8, 9], [16, 16]])
    assert seen[:2] == [4, 4] and set(seen[2:4]) <= {8, 9} and seen[4:] == [16, 16]


def test_a_stored_run_is_reused_only_while_what_defines_it_is_unchanged(tmp_path):
    """same_spec: every key of the spec but where it ran and is stored (WHERE) must match the stored record (which
    holds more, its results), and the weights a --scale run kept must still be there; spec_hash names the weights
    by the same keys; run_key names a run by model, dial, task, lr and seed."""
    spec = dict(model="ssm", task="recall", lr=3e-3, seed=0, steps=10, dial={"d_state": 4}, device="cpu",
                out=str(tmp_path))
    saved = dict(spec, device="cuda:1", out="elsewhere", metrics={"4": {}})
    assert compare.same_spec(saved, spec) and not compare.same_spec(None, spec)
    assert not compare.same_spec(dict(saved, steps=11), spec)
    assert not compare.same_spec({k: v for k, v in saved.items() if k != "dial"}, spec)
    kept = dict(spec, weights="w.pt")
    assert not compare.same_spec(dict(saved, weights="w.pt"), kept)    # its weights are gone
    (tmp_path / "w.pt").write_bytes(b"")
    assert compare.same_spec(dict(saved, weights="w.pt"), kept)
    assert compare.spec_hash(spec) == compare.spec_hash(dict(reversed(spec.items()), device="cuda:1", out="elsewhere"))
    assert compare.spec_hash(spec) != compare.spec_hash(dict(spec, lr=1e-3))
    assert compare.run_key(spec) == "ssm[d_state=4]/recall/lr=0.003/seed=0"
    assert compare.run_key({k: v for k, v in spec.items() if k != "dial"}) == "ssm/recall/lr=0.003/seed=0"


def test_commands_sharing_a_file_keep_each_others_times(tmp_path):
    """Each command's entry in meta.commands is its own: two commands saving to one file in turns keep both
    entries, each as its command last wrote it."""
    path = str(tmp_path / "smoke.json")
    a, b = compare.Store(path, "smoke", False), compare.Store(path, "smoke", False)
    ours = {"a": dict(id="a", wall_time_s=1.0, runs_run=1), "b": dict(id="b", wall_time_s=2.0, runs_run=1)}
    save = lambda store, who: store.save({"meta": dict(preset="smoke", commands=[dict(ours[who])]),  # noqa: E731
                                          "runs": store.runs})
    save(a, "a")
    save(b, "b")
    ours["a"].update(wall_time_s=5.0, runs_run=3)
    save(a, "a")
    commands = json.load(open(path))["meta"]["commands"]
    assert [(c["id"], c["wall_time_s"], c["runs_run"]) for c in commands] == [("a", 5.0, 3), ("b", 2.0, 1)]


def test_best_lr_is_chosen_on_the_sweep_seed_only():
    """A later seed at the chosen lr must not move the choice to another lr (where only seed 0 ran)."""
    run = lambda lr, seed, val, loss=1.0: dict(model="m", task="t", lr=lr, seed=seed, val_token_acc=val,  # noqa
                                               val_loss=loss)
    runs = [run(1e-3, 0, 0.9), run(3e-3, 0, 0.95), run(3e-3, 1, 0.5)]
    assert [r["seed"] for r in compare.best_runs(runs)[("m", "t")]] == [0, 1]
    assert compare.best_runs(runs)[("m", "t")][0]["lr"] == 3e-3
    tie = [run(1e-3, 0, 1.0, loss=0.2), run(3e-3, 0, 1.0, loss=0.1)]
    assert compare.best_runs(tie)[("m", "t")][0]["lr"] == 3e-3
    overflowed = [run(1e-3, 0, 1.0, loss=None), run(3e-3, 0, 1.0, loss=0.1)]   # a loss stored as null is the worst
    assert compare.best_runs(overflowed)[("m", "t")][0]["lr"] == 3e-3
    assert compare.best_runs(overflowed[::-1])[("m", "t")][0]["lr"] == 3e-3


def test_run_one_records_its_spec_its_costs_and_its_tests(tmp_path, monkeypatch):
    """run_one with training and evaluation faked: the record holds the spec, the parameters, the state size at
    each test length (copy's length n is 2n + 1 tokens), the examples seen, the mean of the last 20 losses, the
    times, the device; validation runs at the longest training length on a seed of its own, the tests at each
    test length on another, every call with the spec's examples and device; HRM is also tested at each number of
    segments; --scale's weights are kept where the spec says; the spec's thread count is set."""
    calls = []

    def fake_train(model, task, steps, batch_size, lr, train_lengths, device="cpu", seed=0, **kwargs):
        calls.append(("train", steps, batch_size, lr, train_lengths, device, seed))
        return [float(i) for i in range(1, 31)]

    def fake_evaluate(model, task, length, n_examples, device="cpu", seed=0, segments=None, **kwargs):
        calls.append(("evaluate", length, n_examples, device, seed, segments))
        return dict(token_acc=length / 100, loss=float(seed), exact=None)

    monkeypatch.setattr(compare, "train", fake_train)
    monkeypatch.setattr(compare, "evaluate", fake_evaluate)
    threads = torch.get_num_threads()
    args = compare.parse_args(["--preset", "smoke", "--models", "attention,hrm", "--tasks", "copy,maze",
                               "--out", str(tmp_path)])
    copy, maze = (next(s for s in compare.make_specs(args) if s["model"] == m and s["task"] == t)
                  for m, t in [("attention", "copy"), ("hrm", "maze")])
    try:
        record = compare.run_one(dict(copy, threads=1, weights="w.pt", out=str(tmp_path)))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    model = compare.build_model("attention", tasks.Copy().vocab_size, **copy["model_options"])
    assert {k: record[k] for k in copy} == copy
    assert record["params"] == compare.n_params(model)
    assert record["state_size"] == {str(L): model.state_size(2 * L + 1) for L in copy["test"]}
    assert record["examples_seen"] == copy["steps"] * copy["batch_size"] and record["final_loss"] == 20.5
    assert 0 <= record["train_time_s"] <= record["wall_time_s"] < 60 and record["device_name"] == "CPU"
    assert record["diverged_at"] is None
    assert calls[0] == ("train", copy["steps"], copy["batch_size"], copy["lr"], copy["train"], "cpu", copy["seed"])
    val, *tested = calls[1:]
    longest = compare.stages(copy["train"])[-1][1]
    assert val[:4] == ("evaluate", longest, copy["eval_examples"], "cpu") and val[5] is None
    assert [c[1] for c in tested] == copy["test"] and all(c[2:4] == (copy["eval_examples"], "cpu") for c in tested)
    assert len({c[4] for c in tested}) == 1 and val[4] != tested[0][4]   # one test seed, not validation's
    assert record["val_token_acc"] == longest / 100 and record["val_loss"] == val[4]
    assert record["metrics"] == {str(L): dict(token_acc=L / 100, loss=float(tested[0][4]), exact=None)
                                 for L in copy["test"]}
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))   # the trained weights, kept

    calls.clear()
    record = compare.run_one(maze)
    segments = [c[5] for c in calls if c[0] == "evaluate" and c[5]]
    assert sorted(segments) == sorted(maze["test_segments"] * len(maze["test"]))
    assert all(set(record["metrics"][str(L)]["by_segments"]) == {str(s) for s in maze["test_segments"]}
               for L in maze["test"])


def test_mean_is_over_the_numbers_only():
    """A metric over seeds: None (no such metric) and "diverged" are left out; nothing left is nan."""
    assert compare.mean([0.25, None, 0.75, compare.DIVERGED, 0.5]) == 0.5
    assert math.isnan(compare.mean([None, compare.DIVERGED])) and math.isnan(compare.mean([]))


def test_the_lr_choice_and_its_edges_leave_the_dial_out():
    """The dial's extra state sizes are not cells of the table: a dial run with a better score at another lr
    neither moves the choice nor counts in its cell's runs, nor widens the grid whose edges are marked. Each dial
    size gets its own choice among its own runs. The choice is the best score, whichever end of the grid it is
    at; a grid of one lr has no edge to mark."""
    run = lambda lr, val, seed=0, **kw: dict(model="m", task="t", lr=lr, seed=seed, val_token_acc=val,  # noqa: E731
                                             val_loss=1.0, **kw)
    runs = [run(1e-3, 0.9), run(3e-3, 0.5), run(1e-2, 0.4), run(1e-2, 1.0, dial={"n_mem": 2}),
            run(1e-4, 0.7, dial={"n_mem": 2}), run(1e-4, 0.8, dial={"n_mem": 8}), run(1e-2, 0.2, dial={"n_mem": 8})]
    best = compare.best_runs(runs)
    assert list(best) == [("m", "t")] and [(r["lr"], r.get("dial")) for r in best["m", "t"]] == [(1e-3, None)]
    dial = compare.best_runs(runs, dial=True)
    assert {cell: [r["lr"] for r in rs] for cell, rs in dial.items()} == {
        ("m", "t", (("n_mem", 2),)): [1e-2], ("m", "t", (("n_mem", 8),)): [1e-4]}
    assert compare.edge_cells(runs, best) == {("m", "t")}            # the smallest of its grid, not the dial's
    runs[0]["val_token_acc"] = 0.3
    best = compare.best_runs(runs)
    assert best["m", "t"][0]["lr"] == 3e-3 and compare.edge_cells(runs, best) == set()
    runs[2]["val_token_acc"] = 0.6
    best = compare.best_runs(runs)
    assert best["m", "t"][0]["lr"] == 1e-2 and compare.edge_cells(runs, best) == {("m", "t")}
    one = [run(1e-3, 0.9)]
    assert compare.edge_cells(one, compare.best_runs(one)) == set()


def test_bench_records_cost_and_state_against_length(tmp_path):
    assert compare.main(["--bench", "--models", "attention,ssm,hrm", "--test-lengths", "16,48",
                         "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    assert [(r["model"], r["length"]) for r in rows] == [(m, L) for m in ("attention", "ssm", "hrm") for L in (16, 48)]
    assert all({"train_ms", "infer_us_per_token"} <= set(r) for r in rows)     # every row measured both
    state = {(r["model"], r["length"]): r["state_floats"] for r in rows}
    assert state["attention", 48] == 3 * state["attention", 16]      # the KV cache grows with the sequence
    assert state["ssm", 48] == state["ssm", 16]                        # the recurrent state does not
    assert "| ssm | 48 |" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_restart_after_the_sweep_runs_only_the_owed_seeds_and_dial(tmp_path, monkeypatch):
    """Interrupted after a cell's lr sweep finished but before its extra seed and the dial's sweep ran: the restart
    runs exactly those (the seed at the chosen lr, the dial size at every lr), and the same command with the same
    seeds gives the same numbers."""
    argv = ["--preset", "smoke", "--models", "ssm", "--tasks", "recall", "--seeds", "0,1", "--lrs", "1e-3,3e-3",
            "--steps", "3", "--workers", "1", "--out", str(tmp_path)]
    real, calls = compare.run_one, []

    def stop_after_the_sweep(spec):
        if spec["seed"] == 1 or spec.get("dial"):
            raise KeyboardInterrupt
        calls.append(compare.run_key(spec))
        return real(spec)

    monkeypatch.setattr(compare, "run_one", stop_after_the_sweep)
    assert compare.main(argv) == 130
    assert sorted(calls) == ["ssm/recall/lr=0.001/seed=0", "ssm/recall/lr=0.003/seed=0"]
    calls.clear()
    monkeypatch.setattr(compare, "run_one", lambda spec: calls.append(compare.run_key(spec)) or real(spec))
    assert compare.main(argv) == 0
    lr = compare.best_runs(json.load(open(tmp_path / "smoke.json"))["runs"].values())[("ssm", "recall")][0]["lr"]
    assert sorted(calls) == sorted([f"ssm/recall/lr={lr:g}/seed=1", "ssm[d_state=4]/recall/lr=0.001/seed=0",
                                    "ssm[d_state=4]/recall/lr=0.003/seed=0"])

    first = json.load(open(tmp_path / "smoke.json"))["runs"]
    assert compare.main(argv + ["--fresh", "--out", str(tmp_path / "again")]) == 0
    again = json.load(open(tmp_path / "again" / "smoke.json"))["runs"]
    assert {k: r["metrics"] for k, r in first.items()} == {k: r["metrics"] for k, r in again.items()}  # CPU: exact


@pytest.mark.parametrize("name", ["ssm", "rmt", "titans"])
def test_scale_read_in_pieces_scores_like_one_call(name):
    """--scale reads a recurrent model's test streams piece by piece, made piece by piece: the same accuracy as
    one forward call on the whole sequence, with the answers of the task's own pieces."""
    torch.manual_seed(0)
    task = tasks.TASKS["flipflop"]()
    model = compare.build_model(name, task.vocab_size, d_model=16, n_layers=1).double().eval()
    row = compare.scale_read(model, task, 1024, 2, 128, "cpu", seed=5)
    x, y = (torch.cat(t, dim=1) for t in zip(*task.pieces(2, 1024, 128, seed=5)))
    with torch.no_grad():
        pred = model(x).argmax(-1)
    mask = y != tasks.IGNORE
    assert row["scored"] == mask.sum().item() > 50
    assert row["token_acc"] == ((pred == y) & mask).sum().item() / mask.sum().item()


def test_scale_read_scores_babilong_streams_by_the_depth_of_their_deciding_fact():
    """BABILong streams read in pieces: one answer per stream, exact match per stream, and exact match in four
    bins of the deciding fact's depth, each bin holding the streams whose depth falls in it."""
    torch.manual_seed(0)
    task = tasks.TASKS["babilong_qa1"]()
    model = compare.build_model("ssm", task.vocab_size, d_model=16, n_layers=1).double().eval()
    row = compare.scale_read(model, task, 300, 40, 64, "cpu", seed=3)
    x, y = (torch.cat(t, dim=1) for t in zip(*task.pieces(40, 300, 64, seed=3)))
    with torch.no_grad():
        right = (model(x).argmax(-1)[:, -1] == y[:, -1]).double()
    bins = (task.sample_with_depth(40, 300, seed=3)[2] * 4).long()
    assert row["scored"] == 40 and row["exact"] == row["token_acc"] == right.mean().item()
    assert row["depth_counts"] == [int((bins == k).sum()) for k in range(4)] and sum(row["depth_counts"]) == 40
    assert row["by_depth"] == [right[bins == k].mean().item() if (bins == k).any() else None for k in range(4)]


def test_wilson_interval_matches_its_formula_and_holds_the_estimate():
    """The 95% Wilson interval, against values worked out by hand: 8/10 -> [0.490, 0.943]; 0/64 -> [0, 0.0566]
    (z^2 / (n + z^2)); 64/64 -> [0.9434, 1]; none seen -> [0, 1]."""
    assert compare.wilson(0.8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert compare.wilson(0.0, 64) == pytest.approx((0.0, 0.0566), abs=1e-4)
    assert compare.wilson(1.0, 64) == pytest.approx((0.9434, 1.0), abs=1e-4)
    assert compare.wilson(0.5, 0) == (0.0, 1.0)


def test_attention_stops_at_the_predicted_time_cap_even_after_a_fast_read(tmp_path, monkeypatch):
    """--scale's attention reads until a call is predicted (time ~ T^2) to take over the cap. A read of 4 ms at 1,000
    tokens predicts 40 s at 100,000: a wall, even though the row shows its time rounded to 0.0 s."""
    model = compare.build_model("attention", 5, d_model=16, n_layers=1)
    torch.save(model.state_dict(), tmp_path / "attention.pt")
    run = dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights="attention.pt", train=[32, 64])
    read = []

    def timed_read(model, task, length, batch, piece, device, seed, shared):   # 4 ms at 1,000 tokens, as T^2
        read.append(length)
        seconds = 4e-3 * (length / 1000) ** 2
        return dict(token_acc=1.0, scored=1, tokens_per_s=batch * length / seconds, seconds=round(seconds, 2),
                    peak_mib=None)

    monkeypatch.setattr(compare, "scale_read", timed_read)
    rows = []
    compare.read_streams({("attention", "flipflop"): [run]}, [1000, 100_000, 400_000], 1, ["cpu"], str(tmp_path),
                         rows, lambda: None)
    assert read == [1000, 1000]                                     # the warm-up, then the first length only
    assert [r["length"] for r in rows] == [1000, 100_000] and rows[0]["seconds"] == 0.0
    assert "40 s predicted" in rows[1]["wall"]


def test_read_streams_reads_every_length_with_the_trained_weights(tmp_path, monkeypatch):
    """--scale's reading, with the reads faked: each cell's trained weights are loaded and read at every length,
    warm-up first, the same test streams (seeds) for every model and other ones at each length; the recurrent
    model reads even where a call is slow, attention stops at its first predicted wall or out-of-memory; a cell
    that diverged at every lr gets a row that says so; every row is saved as it comes."""
    monkeypatch.setitem(compare.SCALE, "attention_cap_s", 1.0)
    cells, trained = {}, {}
    for m in ("ssm", "attention"):
        model = compare.build_model(m, 5, d_model=16, n_layers=1)
        torch.save(model.state_dict(), tmp_path / f"{m}.pt")
        trained[type(model).__name__] = model.embed.weight.detach().clone()
        cells[m, "flipflop"] = [dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights=f"{m}.pt",
                                     train=[32, 64],
                                     diverged_at=None)]
    cells["rmt", "flipflop"] = [dict(diverged_at=7, train=compare.CURRICULUM)]
    calls, saved = [], []

    def fake_read(model, task, length, batch, piece, device, seed, shared):
        name = type(model).__name__
        assert torch.equal(model.embed.weight, trained[name]) and not model.training
        assert isinstance(task, tasks.FlipFlop)
        calls.append((name, length, batch, piece, device, seed))
        if name == "Transformer" and length == 4000:
            raise torch.OutOfMemoryError("fake")
        seconds = 0.6 if length == 1000 else 2.0                    # attention: 0.6 s at 1,000 predicts 2.4 s at 2,000
        return dict(token_acc=0.5, scored=3, tokens_per_s=batch * length / seconds, seconds=seconds, peak_mib=None)

    monkeypatch.setattr(compare, "scale_read", fake_read)
    rows = []
    compare.read_streams(cells, [1000, 2000, 4000], 1, ["cpu"], str(tmp_path), rows, lambda: saved.append(len(rows)))
    batch, piece = compare.SCALE["examples"]["flipflop"], compare.SCALE["piece"]
    warm_ups, reads = [c for c in calls if c[5] == calls[0][5]], [c for c in calls if c[5] != calls[0][5]]
    assert [c[:5] for c in warm_ups] == [(name, 1000, batch, piece, "cpu") for name in ("Mamba", "Transformer")]
    assert [c[:2] for c in reads] == [("Mamba", 1000), ("Mamba", 2000), ("Mamba", 4000), ("Transformer", 1000)]
    assert all(c[2:5] == (batch, piece, "cpu") for c in reads)
    seeds = {L: {c[5] for c in reads if c[1] == L} for L in (1000, 2000, 4000)}
    assert len(seeds[1000]) == 1 and len(set.union(*seeds.values())) == 3   # the same streams, others per length
    assert [(r["model"], r["length"], r.get("wall", "")[:5]) for r in rows] == [   # by model, whatever ends first
        ("attention", 1000, ""), ("attention", 2000, "time:"), ("ssm", 1000, ""), ("ssm", 2000, ""), ("ssm", 4000, ""),
        ("rmt", compare.CURRICULUM[-1][1], "every")]
    assert saved == [3, 5, 6] and all(r["task"] == "flipflop" for r in rows)     # saved as each cell ends
    ssm = compare.build_model("ssm", 5, d_model=16, n_layers=1)
    assert [r["state_floats"] for r in rows[2:5]] == [ssm.state_size(L) for L in (1000, 2000, 4000)]
    assert rows[2]["token_acc"] == 0.5 and rows[2]["batch"] == batch

    rows = []                                                        # a wall of memory stops attention too
    monkeypatch.setitem(compare.SCALE, "attention_cap_s", 100.0)
    compare.read_streams({("attention", "flipflop"): cells["attention", "flipflop"]}, [1000, 4000, 8000], 1, ["cpu"],
                         str(tmp_path), rows, lambda: None)
    assert [(r["length"], r.get("wall")) for r in rows] == [(1000, None), (4000, "out of memory")]


def test_read_streams_resumes_reusing_the_cells_an_earlier_command_read(tmp_path, monkeypatch):
    """A stopped --scale resumes its reading: a cell whose rows are stored (the same weights and batch, every length
    asked, or the lengths up to a wall) is not read again and its rows are kept; a cell stored with other weights,
    another batch or fewer lengths is read."""
    cells = {}
    for m in ("ssm", "attention", "rmt"):
        torch.save(compare.build_model(m, 5, d_model=16, n_layers=1).state_dict(), tmp_path / f"{m}.pt")
        cells[m, "flipflop"] = [dict(task_options={}, model_options=dict(d_model=16, n_layers=1), weights=f"{m}.pt",
                                     train=[32, 64], diverged_at=None, train_time_s=1.5)]
    batch = compare.SCALE["examples"]["flipflop"]

    def row(m, L, weights=None, wall=None, b=batch, trained_in=1.5):
        return dict(model=m, task="flipflop", length=L, batch=b, weights=weights or f"{m}.pt", token_acc=0.25,
                    scored=4, trained_in=trained_in, **({"wall": wall} if wall else {}))
    other = dict(row("ssm", 1000), task="babilong_qa1")                       # a cell not read now: kept
    stored = [other, row("ssm", 1000), row("ssm", 2000), row("ssm", 4000),     # all read: reused
              row("attention", 1000), row("attention", 2000, wall="out of memory"),   # read to a wall: reused
              row("rmt", 1000), row("rmt", 2000)]                              # not to the last length: read
    read = []

    def fake_read(model, task, length, batch, piece, device, seed, shared):
        read.append((type(model).__name__, length))
        return dict(token_acc=1.0, scored=3, tokens_per_s=1e6, seconds=0.1, peak_mib=None)
    monkeypatch.setattr(compare, "scale_read", fake_read)
    rows = []
    compare.read_streams(cells, [1000, 2000, 4000], 1, ["cpu"], str(tmp_path), rows, lambda: None, stored)
    assert {name for name, _ in read} == {"RMT"}
    kept = [r for m in ("attention", "ssm") for r in stored[1:] if r["model"] == m]  # (rows go by model, length)
    assert [r for r in rows if r["model"] != "rmt" and r is not other] == kept and other in rows
    assert [(r["length"], r["token_acc"]) for r in rows if r["model"] == "rmt"] == [(L, 1.0) for L in (1000, 2000,
                                                                                                       4000)]
    for changed in ([row("ssm", L, weights="other.pt") for L in (1000, 2000, 4000)],   # another training
                    [row("ssm", L, b=batch + 1) for L in (1000, 2000, 4000)],       # other streams
                    [row("ssm", L, trained_in=2.5) for L in (1000, 2000, 4000)]):   # the file trained again
        read.clear()
        compare.read_streams({("ssm", "flipflop"): cells["ssm", "flipflop"]}, [1000, 2000, 4000], 1, ["cpu"],
                             str(tmp_path), [], lambda: None, changed)
        assert [L for _, L in read[1:]] == [1000, 2000, 4000]                    # (after the warm-up)


@pytest.mark.slow
def test_scale_trains_keeps_the_weights_and_reads_streams(tmp_path, capsys):
    """--scale: the scale preset's runs through the usual protocol (stored, resumable, a second seed as a
    follow-up), their weights kept beside them, then every chosen model reads every stream length; the same
    command on a copy of the folder elsewhere reuses the training and reads the same streams again."""
    argv = ["--scale", "--models", "ssm,attention", "--tasks", "flipflop", "--seeds", "0,1", "--steps", "3",
            "--test-lengths", "512,1024", "--workers", "1"]
    assert compare.main(argv + ["--out", str(tmp_path / "a")]) == 0
    saved = json.load(open(tmp_path / "a" / "scale.json"))
    assert len(saved["runs"]) == 2 * len(compare.PRESETS["scale"]["lrs"]) + 2      # the sweep, then seed 1
    assert all((tmp_path / "a" / r["weights"]).exists() for r in saved["runs"].values())
    assert len({r["weights"] for r in saved["runs"].values()}) == len(saved["runs"])
    streams = saved["streams"]
    assert [(r["model"], r["length"]) for r in streams] == [(m, L) for m in ("attention", "ssm") for L in (512, 1024)]
    assert all(r["scored"] > 0 and r["tokens_per_s"] > 0 for r in streams)
    assert streams[2]["state_floats"] == streams[3]["state_floats"] < streams[1]["state_floats"]  # SSM vs KV cache
    assert "## Streams" in (tmp_path / "a" / "scale.md").read_text()
    capsys.readouterr()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copied = json.load(open(tmp_path / "b" / "scale.json"))
    compare.save_json(tmp_path / "b" / "scale.json", {**copied, "streams": []})   # the streams to be read again
    assert compare.main(argv + ["--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "6 stored runs reused, 0 to train now" in out and "0 cells read by an earlier command reused, 2 to" in out
    again = json.load(open(tmp_path / "b" / "scale.json"))["streams"]    # the same weights read the same streams
    assert [(r["token_acc"], r["scored"]) for r in again] == [(r["token_acc"], r["scored"]) for r in streams]
    assert compare.main(argv + ["--out", str(tmp_path / "b")]) == 0         # and, read, are not read a third time
    assert "2 cells read by an earlier command reused, 0 to read now" in capsys.readouterr().out


def test_compare_reads_top_down():
    """compare.py is read as a lesson: every function, class or constant it defines at module level is defined
    above the first statement that uses it (main's call at the very bottom included)."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "compare.py")).read())
    defined = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node]
        for t in targets:
            name = getattr(t, "name", None) or getattr(t, "id", None)
            if name:
                defined.setdefault(name, node.lineno)
    used_above = sorted({(use.id, node.lineno) for node in tree.body for use in ast.walk(node)
                         if isinstance(use, ast.Name) and defined.get(use.id, 0) > node.lineno})
    assert len(defined) > 40 and not used_above, f"used above their definition: {used_above}"


@pytest.mark.parametrize("chosen", [True, False])
def test_make_specs_sweeps_every_cell_and_dial_size_then_seeds_at_the_chosen_rate(chosen):
    """The protocol's runs phase by phase. The sweep: every lr on the first seed, for each cell and for each of the
    dial's sizes (its model options changed in that one field, the rest as the cell's). Then the other seeds at the
    rate chosen for a cell, only for cells that were given one, and only on the task's seeded models unless the
    models were named on the command line (the smoke preset seeds none)."""
    argv = ["--preset", "smoke", "--tasks", "recall", "--lrs", "1e-3,3e-3", "--seeds", "0,1,2"]
    command = compare.parse_args(argv + (["--models", "attention,ssm"] if chosen else []))
    sweep = compare.make_specs(command)
    base = {s["model"]: s for s in sweep if not s.get("dial") and s["lr"] == 1e-3}
    assert all(s["protocol"] == compare.PROTOCOL and s["seed"] == 0 for s in sweep)
    assert sorted(s["lr"] for s in sweep if s["model"] == "attention") == [1e-3, 3e-3]
    dial = [s for s in sweep if s.get("dial")]
    assert sorted((s["model"], s["lr"], s["dial"]["d_state"]) for s in dial) == [("ssm", 1e-3, 4), ("ssm", 3e-3, 4)]
    for s in dial:
        assert s["model_options"] == {**base["ssm"]["model_options"], "d_state": 4}, s["model_options"]
        assert {k: v for k, v in s.items() if k not in ("dial", "model_options", "lr")} == \
            {k: v for k, v in base["ssm"].items() if k not in ("model_options", "lr")}
    seeds = compare.make_specs(command, "seeds", {("ssm", "recall"): 3e-3})
    expected = [("ssm", 3e-3, 1), ("ssm", 3e-3, 2)] if chosen else []
    assert [(s["model"], s["lr"], s["seed"]) for s in seeds] == expected
    assert all(s["model_options"] == base["ssm"]["model_options"] and not s.get("dial") for s in seeds)


def test_mean_spread_is_the_mean_and_half_the_range_over_seeds():
    """The tables' cells: mean ± half of (highest - lowest), the ± only with two seeds or more; diverged seeds counted
    beside, and a cell with no run at all empty."""
    assert compare.mean_spread([0.2, 0.6, 0.4]) == "0.40±0.20"
    assert compare.mean_spread([0.5, None]) == "0.50"
    assert compare.mean_spread([0.3, compare.DIVERGED, 0.5]) == "0.40±0.10 (1 diverged)"
    assert compare.mean_spread([compare.DIVERGED]) == compare.DIVERGED and compare.mean_spread([None]) == ""


def test_a_grid_of_two_rates_has_edges():
    """Either rate of a two-rate grid is an edge: the best may lie outside it."""
    runs = [dict(model="m", task="t", lr=lr, seed=0, val_token_acc=acc, val_loss=1.0) for lr, acc in ((1e-3, 0.9),
                                                                                                    (3e-3, 0.5))]
    assert compare.edge_cells(runs, compare.best_runs(runs)) == {("m", "t")}


def test_block_calls_count_the_training_compute_per_example():
    """The depth preset's compute per example, Block applications in one training forward: a Transformer's layers;
    a looped one's layers x loops; HRM's segments x (H_cycles x L_cycles low updates + H_cycles high ones) x
    n_layers / 2 Blocks per module (every supervised segment runs in training)."""
    x = torch.randint(0, 5, (1, 9))
    count = lambda name, **options: compare.block_calls(compare.build_model(name, 5, d_model=8, **options), x)  # noqa
    assert count("attention", n_layers=3) == 3 and count("attention_looped", n_layers=3, loops=2) == 6
    assert count("hrm", n_layers=4, H_cycles=2, L_cycles=3, segments=2) == 2 * (2 * 3 + 2) * 2
    assert count("ssm") == 0


def test_test_time_depths_read_the_same_test_examples_made_once(monkeypatch):
    """HRM's test-time segments (and the looped model's loops) are read on the test examples of each length made
    once, not again for every count (a Sudoku test set takes seconds to make); read so, they score as evaluate
    with the seed alone does."""
    spec = dict(model="hrm", task="maze", task_options=dict(canvas=7, n_train=20), train=[2, 2], test=[2, 3],
                steps=2, batch_size=4, lr=1e-3, seed=0, eval_examples=8, device="cpu", test_segments=[1, 2, 3],
                model_options=dict(d_model=16, n_layers=2, causal=False))
    made, real = [], compare.test_batches
    monkeypatch.setattr(compare, "test_batches", lambda task, L, *a: made.append(L) or real(task, L, *a))
    record = compare.run_one(spec)
    assert made == [2, 2, 3]                    # validation, then once per test length (not once per count)
    task = tasks.TASKS["maze"](canvas=7, n_train=20)
    model = compare.build_model("hrm", task.vocab_size, **spec["model_options"])
    torch.manual_seed(0)
    compare.train(model, task, 2, 4, 1e-3, [2, 2])
    for L in (2, 3):
        for s in (1, 3):
            again = compare.evaluate(model, task, L, 8, seed=20_000, segments=s)
            assert record["metrics"][str(L)]["by_segments"][str(s)]["token_acc"] == again["token_acc"]
