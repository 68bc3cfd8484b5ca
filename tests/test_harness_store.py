"""harness/store.py: one command at a time on a results file, every run written as it finishes, a bad file refused."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import compare
from harness import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


RECORD = dict(model="attention", task="copy", lr=3e-3, seed=0, test=[6, 12], train=[2, 6], steps=15, batch_size=16,
              task_options={}, model_options={}, val_token_acc=0.5, val_loss=1.0, params=1000, examples_seen=240,
              state_size={"6": 10, "12": 20}, wall_time_s=1.0, diverged_at=None,
              metrics={"6": {"token_acc": 1.0}, "12": {"token_acc": 0.5}})


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not a readable results file"),
    ("", "is not a readable results file"),
    ('{"runs": [1, 2]}', "does not hold compare.py runs"),
    ('{"meta": {"preset": "quick"}, "runs": {}}', "holds runs of preset 'quick', not 'smoke'"),
    *[(json.dumps({"meta": {"preset": "smoke"}, "runs": {"attention/copy/lr=0.003/seed=0": dict(
        RECORD, metrics=metrics)}}), "holds a damaged run, attention/copy/lr=0.003/seed=0")   # scores it can't read
      for metrics in ["high", {"6": {"token_acc": 1.0}}, {"6": {"token_acc": "high"}, "12": {"token_acc": 0.5}}]],
    *[(json.dumps({"meta": {"preset": "smoke"}, "runs": {"attention/copy/lr=0.003/seed=0": {
        k: v for k, v in RECORD.items() if k != gone}}}), f"holds a damaged run, attention/copy/lr=0.003/seed=0 (no "
       f"{gone})") for gone in ["val_token_acc", "params", "state_size"]],   # read by best_runs, by the report
])
def test_a_bad_results_file_stops_with_one_line_and_is_kept(tmp_path, content, message, capsys):
    (tmp_path / "smoke.json").write_text(content)
    with pytest.raises(SystemExit) as exit:
        compare.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert exit.value.code not in (0, None) and message in str(exit.value) and "move it away" in str(exit.value)
    assert "\n" not in str(exit.value) and (tmp_path / "smoke.json").read_text() == content


@pytest.mark.slow
def test_a_second_command_on_the_same_file_stops_at_once_with_one_line(tmp_path):
    """Two commands on one --out: the second, started while the first holds the results file, exits at once with one
    line naming the first's process; the first goes on and stores every run; no temporary file is left behind."""
    argv = [sys.executable, "compare.py", "--preset", "smoke", "--models", "attention", "--tasks", "copy,flipflop",
            "--steps", "60", "--workers", "1", "--out", str(tmp_path)]
    first = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "smoke.json.lock"
    try:
        for _ in range(2400):               # until it holds the lock and wrote its pid (importing torch takes seconds)
            if (lock.exists() and lock.read_text() == str(first.pid)) or first.poll() is not None:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)   # paused while it holds the lock: a slow start of the second cannot let
        try:                                # the first finish before the second asks (CI's load once did)
            second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err[-1500:]
    assert second.returncode != 0 and second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"smoke.json is in use by compare.py, pid {first.pid}; wait for it or use another --out" in second.stderr
    runs = json.load(open(tmp_path / "smoke.json"))["runs"]
    assert sorted(runs) == ["attention/copy/lr=0.003/seed=0", "attention/flipflop/lr=0.003/seed=0"]
    assert sorted(os.listdir(tmp_path)) == ["smoke.json", "smoke.json.lock", "smoke.md"] + sorted(
        p for p in os.listdir(tmp_path) if p.endswith(".png"))              # no temporary file left


def test_a_lock_left_by_a_killed_command_does_not_block(tmp_path):
    """The kernel drops a flock when its holder ends, however it ends (kill -9 too): the pid its file still names
    stops nobody. Within one process too, a second hold of the same file is refused."""
    path = str(tmp_path / "smoke.json")
    (tmp_path / "smoke.json.lock").write_text("999999999")           # what a killed holder leaves
    with store.locked(path):
        assert (tmp_path / "smoke.json.lock").read_text() == str(os.getpid())
        with pytest.raises(SystemExit, match=f"in use by compare.py, pid {os.getpid()};"):
            with store.locked(path):
                pass
    with store.locked(path):                                          # released when the block ends
        pass


def test_load_reads_streams_and_refuses_streams_that_are_not_rows(tmp_path):
    path = tmp_path / "scale.json"
    path.write_text(json.dumps({"meta": {"preset": "scale"}, "runs": {}, "streams": [{"model": "ssm"}]}))
    assert store.load(str(path), "scale") == {"runs": {}, "streams": [{"model": "ssm"}]}
    path.write_text(json.dumps({"meta": {"preset": "scale"}, "runs": {}, "streams": {"a": 1}}))
    with pytest.raises(SystemExit, match="does not hold --scale's streams as a list of rows"):
        store.load(str(path), "scale")
