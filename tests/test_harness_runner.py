"""harness/runner.py: runs side by side in worker processes or threads, stopped cleanly however the command ends."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from harness import runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_command(out, *args, steps=2):
    """`python compare.py --preset smoke` in its own process: a thread a worker, one worker unless args say."""
    return subprocess.Popen([sys.executable, "compare.py", "--preset", "smoke", "--steps", str(steps), "--out",
                             str(out), *(args if "--workers" in args else args + ("--workers", "1"))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))   # a thread each: the cores are shared


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
    """Two commands with two workers each, stopped mid-run. `kill PID` (SIGTERM, however many) stops one as Ctrl-C
    does: a message, the finished runs kept, exit status 143 (128 + SIGTERM), its workers ended. `kill -9` cannot be
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
                while sig == signal.SIGTERM and job.poll() is None:   # twice at once, as `timeout` does (the
                    job.send_signal(sig)    # process, then its group), then every 1 ms until it has ended: each
                    time.sleep(0.001)       # later one is ignored
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


def test_threads_of_run_all_stop_when_it_is_stopped():
    """Threads cannot be killed like worker processes: when one run raises (Ctrl-C reaches the main thread), run_all
    sets STOP, which the others see at their next piece, waits for them, and clears it for the next command."""
    seen, started = [], threading.Barrier(3)

    def work(spec):
        started.wait(timeout=10)                      # all three running (a loaded machine may start one late)
        if spec["i"] == 0:
            raise KeyboardInterrupt
        for _ in range(3000):                         # 30 s unless told to stop
            if runner.STOP.is_set():
                seen.append(spec["i"])
                raise KeyboardInterrupt("stopped")
            time.sleep(0.01)
        return []

    with pytest.raises(KeyboardInterrupt):
        runner.run_all([dict(i=i, task="flipflop", model="ssm") for i in range(3)], 3, ["cpu"], work, print,
                       threads=True)
    assert sorted(seen) == [1, 2] and not runner.STOP.is_set()


def test_each_run_goes_to_the_device_with_the_fewest_in_flight():
    """Two GPUs, four runs at once: two on each (names only: the work here touches no device)."""
    started = threading.Barrier(4)

    def work(spec):
        started.wait(timeout=10)                      # all four in flight together
        return spec["device"]

    done = []
    runner.run_all([dict(i=i, task="copy", model="ssm") for i in range(4)], 4, ["cuda:0", "cuda:1"], work,
                   done.append, threads=True)
    assert sorted(done) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_a_run_out_of_memory_beside_others_goes_back_in_the_queue_and_fewer_run_at_once():
    """Runs share a GPU's memory: one that runs out of it while others run is not lost but queued again, and from then
    on fewer run at once (here: one, so it runs alone and fits). Out of memory alone stops the command."""
    active, most, lock, attempts = [0], {}, threading.Lock(), []
    both_started = threading.Barrier(2)

    def work(spec):
        with lock:
            active[0] += 1
        try:
            attempts.append(spec["i"])
            if spec["i"] < 2 and attempts.count(spec["i"]) == 1:
                both_started.wait(timeout=10)         # the first two start side by side
            alongside = active[0]
            if spec["model"] == "big" and alongside > 1:
                raise torch.OutOfMemoryError("fake: CUDA out of memory")
            time.sleep(0.05)
            most[spec["i"]] = alongside
            return {"i": spec["i"]}
        finally:
            with lock:
                active[0] -= 1

    def within(seconds, *args, **kwargs):   # run_all, failing (not hanging) if it does not end in time
        outcome = []

        def call():
            try:
                outcome.append(runner.run_all(*args, **kwargs))
            except BaseException as error:
                outcome.append(error)
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(seconds)
        assert outcome, f"run_all did not end in {seconds} s"
        if isinstance(outcome[0], BaseException):
            raise outcome[0]

    done = []
    specs = [dict(i=0, model="big", task="recall"), dict(i=1, model="small", task="recall"),
             dict(i=2, model="small", task="copy")]
    within(20, specs, 2, ["cpu"], work, done.append, threads=True)
    assert sorted(r["i"] for r in done) == [0, 1, 2]        # nothing lost, each stored once
    assert attempts.count(0) == 2 and most[0] == 1          # the big run, once more, alone
    oom = lambda spec: (_ for _ in ()).throw(torch.OutOfMemoryError("fake"))   # noqa: E731
    for workers in (1, 2):                                  # here, and alone in a pool of two
        with pytest.raises(torch.OutOfMemoryError, match="alone"):
            within(20, [dict(i=5, model="big", task="recall")], workers, ["cpu"], oom, print, threads=True)


def test_runs_that_run_out_of_memory_together_lower_the_limit_once():
    """Four runs that start side by side and all run out of memory are one event: at most three run at once from
    then on (not one: lowering it once per failed run would leave a GPU mostly idle for the rest of the command)."""
    active, most, lock, attempts = [0], [], threading.Lock(), []
    four_started = threading.Barrier(4)

    def work(spec):
        with lock:
            active[0] += 1
            attempts.append(spec["i"])
            first = attempts.count(spec["i"]) == 1
        try:
            if first:
                four_started.wait(timeout=10)
            alongside = active[0]
            if first:
                four_started.wait(timeout=10)          # each has counted the four before any fails
            if alongside > 3:
                raise torch.OutOfMemoryError("fake: CUDA out of memory")
            time.sleep(0.2)                             # long enough for the runs started together to overlap
            with lock:
                most.append(active[0])
            return {"i": spec["i"]}
        finally:
            with lock:
                active[0] -= 1

    done = []
    runner.run_all([dict(i=i, model="big", task="recall") for i in range(4)], 4, ["cpu"], work, done.append,
                   threads=True)
    assert sorted(r["i"] for r in done) == [0, 1, 2, 3] and len(attempts) == 8
    assert max(most) == 3


def test_a_worker_process_that_dies_stops_the_command_with_one_line(tmp_path, monkeypatch):
    """The system kills a worker that takes more host memory than there is: the command says so in one line and
    names the runs in flight, instead of a BrokenProcessPool traceback; a run that finished first is kept."""
    (tmp_path / "dying.py").write_text("import os, time\n\n\ndef work(spec):\n    if spec['i'] == 1:\n"
                                       "        time.sleep(0.5)\n        os._exit(9)\n    return {'i': spec['i']}\n")
    monkeypatch.syspath_prepend(str(tmp_path))                # (the spawned workers import it from there)
    import dying
    done = []
    with pytest.raises(SystemExit) as stop:
        runner.run_all([dict(i=i, model="ssm", task="copy") for i in range(2)], 2, ["cpu"], dying.work,
                       done.append)
    message = str(stop.value.code)
    assert message.startswith("compare.py: error: a worker process died") and "\n" not in message
    assert "model=ssm task=copy" in message and done == [{"i": 0}]


def test_a_finished_run_hands_its_cached_gpu_memory_back(monkeypatch):
    """Each worker process empties its CUDA cache after a run, out of memory or not (without it, finished runs kept
    16-26 GiB each cached and the next run beside them ran out); threads share one cache and leave it alone."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    assert runner.freeing(lambda spec: spec["i"], dict(i=3)) == 3 and emptied == [1]
    oom = lambda spec: (_ for _ in ()).throw(torch.OutOfMemoryError("fake"))   # noqa: E731
    assert isinstance(runner.freeing(oom, dict(i=4)), runner.OutOfMemory) and emptied == [1, 1]
    runner.freeing(lambda spec: spec["i"], dict(i=5), empty_cache=False)
    assert emptied == [1, 1]


def test_a_run_in_a_line_names_its_state_size():
    """Two dial sizes of one model at one rate are two runs: the line that says one ran out of memory tells which."""
    spec = dict(model="titans", task="recall", lr=5e-3, seed=0, steps=10)
    assert runner.describe(spec) == "model=titans task=recall lr=0.005 seed=0"
    assert runner.describe(dict(spec, dial={"memory_expand": 4})) == \
        "model=titans memory_expand=4 task=recall lr=0.005 seed=0"


def test_the_limit_comes_back_once_the_runs_out_of_memory_have_finished():
    """Two heavy runs that start together and run out of memory run again one at a time; once both are done, the
    light runs after them run two at once again, as asked (each pair waits for its partner: with the limit left at
    one, the wait times out and the test fails); not before both are done: the second runs alone too."""
    lock, heavy, active, attempts, again = threading.Lock(), [0], [0], [], []
    heavy_started, pairs = threading.Barrier(2), threading.Barrier(2)

    def work(spec):
        with lock:
            attempts.append(spec["i"])
            first = attempts.count(spec["i"]) == 1
            heavy[0] += spec["model"] == "big"
            active[0] += 1
        try:
            if spec["model"] == "big":
                if first:
                    heavy_started.wait(timeout=10)     # both heavy runs in flight...
                    alongside = heavy[0]
                    heavy_started.wait(timeout=10)     # ...and counted before either fails
                    if alongside > 1:
                        raise torch.OutOfMemoryError("fake: CUDA out of memory")
                else:
                    time.sleep(0.3)
                    again.append(active[0])             # what ran beside it meanwhile
            else:
                pairs.wait(timeout=5)                  # two light runs in flight together
            return {"i": spec["i"]}
        finally:
            with lock:
                heavy[0] -= spec["model"] == "big"
                active[0] -= 1

    done = []
    specs = [dict(i=0, model="big", task="maze"), dict(i=1, model="big", task="maze"),
             *[dict(i=i, model="small", task="copy") for i in range(2, 6)]]
    runner.run_all(specs, 2, ["cpu"], work, done.append, threads=True)
    assert sorted(r["i"] for r in done) == list(range(6)) and sorted(attempts) == [0, 0, 1, 1, 2, 3, 4, 5]
    assert again == [1, 1]                              # each heavy run, the second time, alone
