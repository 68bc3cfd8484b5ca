"""The results file of a preset, <out>/<preset>.json: one command at a time, each run written as it finishes.

A command holds <preset>.json.lock for as long as it runs; a second command on the same file stops at once with one
line. Every finished run is written straight away (a temporary file, then a rename: never a half-written file), so
Ctrl-C, `kill` or a crash loses nothing that finished, and the same command goes on from there.
"""
import contextlib
import fcntl
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit():
    """The commit of this code (+dirty if tracked files changed), or $GIT_COMMIT when set (a copied working tree may
    have no history, or a stale one)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10)  # noqa
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def save_json(path, obj):
    """Write a temporary file, then rename it over `path`: a reader never sees half a file."""
    save_text(path, json.dumps(obj, indent=1))


def save_text(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path):
    """Hold <path>.lock (fcntl.flock, which the kernel releases however the holder ends) for the whole block, or stop
    at once with one line naming the process that holds it. The file stays (removing it would let a later command
    lock a new file of that name while another still holds the old one); only the lock on it says who holds it."""
    with open(path + ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            sys.exit(f"compare.py: error: {path} is in use by compare.py, pid {lock.read().strip() or '?'}; wait for "
                     "it or use another --out")
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


READ = {"model", "task", "lr", "seed", "metrics", "test", "train", "steps", "batch_size", "task_options",
        "model_options", "val_token_acc", "val_loss", "params", "state_size", "examples_seen", "wall_time_s"}


def load(path, preset):
    """What `path` holds: {"runs": {run key: record}, "streams": [rows of --scale's reading]}. A file that is not a
    results file of this preset stops the command with one line saying what to do."""
    if not os.path.exists(path):
        return {"runs": {}, "streams": []}

    def stop(why):
        sys.exit(f"compare.py: error: {path} {why}; move it away or point --out at another folder")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        stop(f"is not a readable results file ({type(e).__name__})")
    runs = results.get("runs") if isinstance(results, dict) else None
    fields = {"model", "task", "lr", "seed", "metrics"}
    if not isinstance(runs, dict) or not all(isinstance(r, dict) and fields <= set(r) for r in runs.values()):
        stop("does not hold compare.py runs")
    if not isinstance(results.get("meta"), dict) or results["meta"].get("preset") != preset:
        stop(f"holds runs of preset {(results.get('meta') or {}).get('preset')!r}, not {preset!r}")
    for key, r in runs.items():   # what choosing a rate and the report read, and each test length's scores
        if missing := READ - set(r):
            stop(f"holds a damaged run, {key} (no {', '.join(sorted(missing))})")
        m, lengths = r["metrics"], r["test"] if r.get("diverged_at") is None else []   # (a diverged run has none)
        if not isinstance(m, dict) or not isinstance(lengths, list) or not all(
                isinstance(m.get(str(L)), dict) and isinstance(m[str(L)].get("token_acc", 0.0), (int, float))
                for L in lengths):
            stop(f"holds a damaged run, {key} (its scores at its test lengths)")
    streams = results.get("streams", [])
    if not isinstance(streams, list) or not all(isinstance(r, dict) for r in streams):
        stop("does not hold --scale's streams as a list of rows")
    return {"runs": runs, "streams": streams}
