"""
Grade a submission: for instructors.

    python tests/grade.py SUBMISSION [--seeds 1234]   # SUBMISSION: a student's copy; its five model files are graded
    python tests/grade.py --seeds 0-199               # no submission: the original solutions, seed after seed

It merges each of the submission's five model files into a copy of this repository in a temporary folder (splice):
the blanked functions, and every other statement, function, method or class the submission added or changed, are
the submission's; the rest is ours. Then, once per seed:
- the isolated checks decide the grade: this process, its reference imported before any of the submission's code
  runs, draws fresh inputs (not from the seed: from the operating system) and compares with its reference what a
  confined child process computes on them with the submission's files: outputs and gradients in float64 on odd
  shapes, float32 and bf16 autocast at lengths past 2,048 drawn anew each time, torch.no_grad(), a sequence in two
  pieces with the state carried, RMT and HRM whole (the order of HRM's updates decides its logits), the operations
  a core dispatches at lengths and chunk sizes drawn anew (`chain`: no loop over time steps, no (T, T) work where it
  has chunks), SDPA, and the 'meta' device;
- the suite (the five files' tests, tests/test_cores.py and tests/test_oracles.py with GRADE_SEED set, see
  tests/conftest.py) is feedback for the student and a gate: the grader counts its report against the tests it
  collects from its own files, so a failure, a missing test or an early exit fails the seed whatever the exit
  status. Tests that draw nothing from GRADE_SEED run at the first seed only.
A seed passes when both pass. With no submission it is the check that no correct solution fails at any seed. It
exits non-zero when anything failed at any seed, and removes its temporary folder on every way out.
"""
import argparse
import ast
import concurrent.futures
import glob
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types

import torch
import torch.nn.functional as F

import make_assignment as ma

TESTS = [f"tests/test_{m}.py" for m in ma.MODULES] + ["tests/test_oracles.py", "tests/test_cores.py"]
SEEDLESS = ("not trains_on_a_bench_task and not memory_does_not_grow and not dt_init and not state_size "
            "and not bad_config")
# Grading runs on the CPU, on a GPU machine too: the cases are small, and a CUDA driver starts threads of its own,
# which the child's watch would take for the submission's (every honest copy refused on an H200).
ON_A_CPU = {"CUDA_VISIBLE_DEVICES": ""}


def seeds(text):
    """"1234", "0-199" or "1,5,9" -> a list of ints; an empty item, a range that runs down or nothing at all is
    refused (argparse.ArgumentTypeError, one line)."""
    out = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} in {text!r} is not a seed or a range like 0-199") \
                from None
        if high < low:
            raise argparse.ArgumentTypeError(f"the range {part.strip()} in {text!r} runs down: nothing to grade")
        out += list(range(low, high + 1))
    return out


def positive(text):
    """An int >= 1, for --jobs."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def core_names(original, module):
    """The blanked functions of a file, as "Class.function" (or "function")."""
    return {name.split(".", 1)[1] for _, _, name in ma.regions(original.splitlines(keepends=True), module)}


def key(node, first):
    """What a statement defines, to pair it with its counterpart in another version of the file: a def or class
    by its name, an assignment (annotated or not) by its targets, the docstring and the __main__ block by what
    they are, anything else by its whole text."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return "d " + node.name
    if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
        return "= " + " ".join(t.id for t in node.targets)
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return "= " + node.target.id
    if first and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return "docstring"
    if isinstance(node, ast.If) and "__main__" in ast.dump(node.test):
        return "__main__"
    return ast.dump(node)


def units(body, lines, start):
    """The statements of a module's or a class's body as {key: (node, text)} in order; a statement's text runs
    from the end of the one before it (`start` for the first), so it takes the comments above it along, and the
    comments indented under its last line."""
    out = {}
    for i, node in enumerate(body):
        first = all(isinstance(b, ast.ImportFrom) and b.module == "__future__" for b in body[:i])
        k, n = key(node, first), 1
        while (k if n == 1 else f"{k} #{n}") in out:          # the same statement twice: keep both
            n += 1
        end = node.end_lineno                              # and the comments indented under it (### END SOLUTION)
        while end < len(lines) and lines[end].strip().startswith("#") \
                and len(lines[end]) - len(lines[end].lstrip()) > node.col_offset:
            end += 1
        out[k if n == 1 else f"{k} #{n}"] = (node, "".join(lines[start:end]))
        start = end
    return out


def header_end(node, lines):
    """The number of lines up to a class's first statement, the comments and blank lines just above it left out."""
    end = node.body[0].lineno - 1
    while end > node.lineno and (lines[end - 1].strip().startswith("#") or not lines[end - 1].strip()):
        end -= 1
    return end


def merge(ours, base, theirs, cores, prefix=""):
    """Three-way merge of two bodies, statement by statement: ours is this repository's, base the hand-out, theirs
    the submission. A blanked function is always theirs; any other statement is ours where the submission left it
    as handed out, theirs where it changed it or added it; ours alone (deleted by the submission) stays. The
    order is the submission's. Returns the text and the names of the statements carried from the submission."""
    (o_body, o_lines, o_start), (b_body, b_lines, b_start), (t_body, t_lines, t_start) = ours, base, theirs
    o, b, t = units(o_body, o_lines, o_start), units(b_body, b_lines, b_start), units(t_body, t_lines, t_start)
    out, carried = [], []
    for k, (node, text) in t.items():
        name = prefix + getattr(node, "name", "")
        mine, handed = o.get(k), b.get(k)
        if isinstance(node, ast.ClassDef) and mine and handed and isinstance(mine[0], ast.ClassDef) \
                and ast.dump(ast.ClassDef(**{**vars(node), "body": []})) == \
                ast.dump(ast.ClassDef(**{**vars(mine[0]), "body": []})):   # the same class: merge its members
            lead = len(text) - len("".join(t_lines[header_end(node, t_lines):node.end_lineno]))
            body, inner = merge((mine[0].body, o_lines, header_end(mine[0], o_lines)),
                                (handed[0].body, b_lines, header_end(handed[0], b_lines)),
                                (node.body, t_lines, header_end(node, t_lines)), cores, name + ".")
            out.append((k, text[:lead] + body))
            carried += inner
        elif name in cores or not mine or not handed or ast.dump(node) != ast.dump(handed[0]):
            out.append((k, text))
            if name not in cores:
                carried.append(prefix + (k.split(" #")[0][2:] if k.startswith(("d ", "= ")) else
                                         f"`{ast.unparse(node).splitlines()[0][:60]}`"))
        else:
            out.append((k, mine[1]))
    keys = [k for k, _ in out]
    for i, (k, (node, text)) in enumerate(o.items()):     # deleted by the submission: ours, after its predecessor
        if k not in keys:
            before = [j for j, kk in enumerate(keys) if kk in list(o)[:i]]
            at = before[-1] + 1 if before else 0
            out.insert(at, (k, text))
            keys.insert(at, k)
    futures = [u for u in out if u[0].startswith("ImportFrom(module='__future__'")]
    rest = [u for u in out if u not in futures]
    at = 1 if rest and rest[0][0] == "docstring" else 0   # __future__ imports first, after the docstring
    return "".join(text for _, text in rest[:at] + futures + rest[at:]), carried


def splice(original, submitted, module):
    """The submission's file as graded: this repository's file, with the blanked functions replaced by the
    submission's and every other statement, function, method or class that the submission added or changed
    carried in (merge). Returns the text and the names carried; SyntaxError when the submission does not parse,
    lacks a blanked function, or the result does not compile."""
    cores = core_names(original, module)
    handout = ma.blank(original, module)
    trees = [ast.parse(text) for text in (original, handout)]
    theirs = ast.parse(submitted)
    found = set()
    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                found.add(prefix + child.name)
                visit(child, prefix + child.name + ".")
    visit(theirs, "")
    if cores - found:
        raise SyntaxError(f"it has no {', '.join(sorted(cores - found))}, the function to write")
    lines = [text.splitlines(keepends=True) for text in (original, handout, submitted)]
    text, carried = merge((trees[0].body, lines[0], 0), (trees[1].body, lines[1], 0), (theirs.body, lines[2], 0),
                          cores)
    text += original[sum(len(text) for _, text in units(trees[0].body, lines[0], 0).values()):]   # the last comments
    try:
        compile(text, f"{module}.py", "exec")
    except SyntaxError as e:
        raise SyntaxError(f"merged into this repository's {module}.py it does not compile ({e.msg})") from None
    return text, carried


# ---------------------------------------------------------------------------------------------------------
# The grade. pytest runs the submission inside the test process, where it can patch the tests, pytest's reports or
# the exit status, so pytest is only a gate here (below). The verdict comes from the isolated checks: this process
# imports its own reference before any of the submission's code runs and draws fresh inputs at every grading (from
# the operating system's randomness: no seed a submission can know); a child process, confined (confine), runs the
# submission on them one case at a time, so that no case exists in it before the one before is answered; this
# process compares what comes back with its reference.
# ---------------------------------------------------------------------------------------------------------

REFERENCES = {"attention": "attention_ref", "ssm": "ssd_scan_ref", "titans": "neural_memory_ref"}
REFUSED = {"subprocess.Popen": "start a process", "os.system": "start a process", "os.fork": "start a process",
           "os.forkpty": "start a process", "os.exec": "start a process", "os.posix_spawn": "start a process",
           "os.spawn": "start a process", "os.kill": "signal a process", "os.killpg": "signal a process",
           "ctypes.dlopen": "load C code", "ctypes.dlsym": "call C code", "ctypes.dlsym/handle": "call C code",
           "ctypes.call_function": "call C code", "ctypes.addressof": "read memory by address",
           "ctypes.string_at": "read memory by address", "gc.get_objects": "search the process's objects",
           "gc.get_referrers": "search the process's objects", "gc.get_referents": "search the process's objects",
           "socket.__new__": "open a socket"}
CHANGES = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown", "os.link", "os.symlink",
           "os.truncate", "os.utime", "os.chflags", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
           "shutil.copytree", "shutil.move", "shutil.rmtree"}
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CASE_SECONDS = 120   # one case takes a correct core a second or two (the first, with the child's imports, a few)
TEST_SECONDS = 1200  # the suite, the gate, takes a minute or two: a submission that hangs it fails the seed
LIVE = set()   # the processes this grader started and has not yet seen end: killed on the way out (main)


def spawn(command, **options):
    """subprocess.Popen, the process noted in LIVE."""
    process = subprocess.Popen(command, **options)
    LIVE.add(process)
    return process


def finished(command, seconds=None, **options):
    """Run a command to its end, or stop it after `seconds`; its stdout and stderr together, as text, and whether
    it was stopped."""
    process = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options)
    try:
        out, late = process.communicate(timeout=seconds)[0], False
    except subprocess.TimeoutExpired:
        process.kill()
        out, late = process.communicate()[0], True
    LIVE.discard(process)
    return out, late


def under(path, roots):
    """Whether `path` is one of the folders `roots` or inside one (by whole names: <root>-venv is not under root)."""
    return any(path == r.rstrip(os.sep) or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def outside(paths, root):
    """The entries of `paths` (sys.path) that lie outside the folder `root`, such as a virtual environment beside
    it at <root>-venv."""
    return [p for p in paths if p and not under(os.path.realpath(p), [os.path.realpath(root)])]


def confine(writable, hidden, refused, readable=(), strict=False):
    """Confine this process before a submission's code runs in it, with an audit hook (which nothing can remove)
    and the thread starters replaced: no file written or changed outside `writable` (folders), nothing under
    `hidden` (the grader's repository, the solutions; its working folder) read or listed but what lies in `readable`
    or `writable`, no other process's /proc entries, no thread or process started (nor a fresh copy of their
    starters' modules loaded), no socket or shared memory (a channel to another process), no C code loaded or
    called, no search of the objects in memory, no folder opened outside `readable` and `writable` (a folder's
    descriptor opens files by relative names); with `strict` (the child), no change of the working folder either, and a
    thread of its own looks for threads that slipped through. Each refusal raises PermissionError and is noted in
    `refused` (a list), which the child hands back with every case.
    What Python alone cannot stop (code that rewrites this process's memory, or a compiled extension already
    loaded) needs an operating-system sandbox; README, "For instructors"."""
    import _imp
    import _posixshmem
    import _posixsubprocess
    import _thread
    import threading
    real = lambda p: os.path.realpath(os.fsdecode(p))                    # noqa: E731
    writable = tuple(real(p) + os.sep for p in [*writable, os.devnull])
    hidden, readable = tuple(real(p) for p in hidden), tuple(real(p) for p in [*readable, *writable])
    mine = f"/proc/{os.getpid()}"
    def refuse(what):
        refused.append(what)
        raise PermissionError(f"grade: the submission's process may not {what}")
    def hook(event, args):
        if event in REFUSED:
            refuse(REFUSED[event])
        if strict and event == "os.chdir":                 # relative names stay relative to the scratch folder
            refuse("change its working folder")
        if strict and event in ("sys.addaudithook", "sys._current_frames"):   # a hook of its own, or the frames of
            refuse(f"call {event} (the grader's watch runs beside it)")        # other threads: both reach the watch
        paths = []
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            paths = [(path, bool(mode and set(mode) & set("wax+")) or bool((flags or 0) & WRITING))]
        elif event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes, os.PathLike)):
            paths = [(args[0], False)]
        elif event in CHANGES:
            paths = [(a, True) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        for path, write in paths:
            where = real(path)
            if event == "open" and os.path.isdir(where) and not under(where, readable):   # a folder's descriptor
                refuse(f"open the folder {os.fsdecode(path)} (its descriptor would reach around these checks)")
            if under(where, hidden) and not under(where, readable):
                refuse(f"{'write' if write else 'read'} {os.fsdecode(path)} (the grader's "
                       f"{'repository' if under(where, hidden[:1]) else 'working folder'})")
            if where.startswith("/proc/") and where.split("/")[2].isdigit() and not under(where, [mine]):
                refuse(f"read {os.fsdecode(path)} (another process)")
            if write and not under(where, writable):
                refuse(f"write {os.fsdecode(path)}")
    sys.addaudithook(hook)
    thread = "start a thread (a loop in another thread is out of the operation counter's sight)"
    def no_thread(*args, **kwargs):
        refuse(thread)
    seen = "run another thread (seen by the grader's watch)"
    born = "start a process (seen by the grader's watch)"
    known = set(os.listdir(f"{mine}/task"))
    # The watch, for a route to the starters around the guards below: every millisecond, any operating-system thread
    # that was not there at the start (one running no Python too), and any child process. What it calls is bound
    # here (a submission may replace os.listdir), and it runs on a bare thread (not in threading.enumerate()).
    def look(notes, listdir=os.listdir, opener=open, sleep=time.sleep, me=_thread.get_native_id):
        known.add(str(me()))
        def children(task):
            try:
                with opener(f"{mine}/task/{task}/children") as f:
                    return f.read()
            except OSError:                    # a thread that ended since the listing (the watch must not die)
                return ""
        while True:
            tasks = listdir(f"{mine}/task")
            if seen not in notes and set(tasks) - known:
                notes.append(seen)
            if born not in notes and any(children(t) for t in tasks):
                notes.append(born)
            sleep(0.001)
    if strict:
        _thread.start_new_thread(look, (refused,))
    _thread.start_new_thread = _thread.start_new = threading._start_new_thread = no_thread
    def no_process(*args, **kwargs):
        refuse("start a process")
    _posixsubprocess.fork_exec = subprocess._fork_exec = no_process   # what subprocess and multiprocessing use
    def no_shared_memory(*args, **kwargs):
        refuse("open shared memory (a channel to another process)")
    _posixshmem.shm_open = no_shared_memory                             # (it raises no audit event)
    # A fresh copy of _thread, _posixsubprocess or _imp would bring the starters (or the loaders) back: every module
    # that _imp's loaders make or run is looked at, whatever its name says, and one with a starter is refused.
    starters = {"start_new_thread", "start_new", "fork_exec", "shm_open", "create_builtin", "create_dynamic"}
    def guarded(real):
        def load(arg, *rest):
            out = real(arg, *rest)
            module = out if real.__name__.startswith("create") else arg
            if isinstance(module, types.ModuleType) and starters & set(object.__getattribute__(module, "__dict__")):
                refuse(f"load a fresh copy of {module.__name__} (its starters would not be the replaced ones)")
            return out
        return load
    for name in ("create_builtin", "create_dynamic", "exec_builtin", "exec_dynamic"):
        setattr(_imp, name, guarded(getattr(_imp, name)))
    sys.dont_write_bytecode = True


def without_references(text, module):
    """A file's text with its reference loop's body replaced by a raise, so that no spelling of a call reaches it."""
    ref = REFERENCES.get(module)
    lines = text.splitlines(keepends=True)
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == ref:
            indent = " " * node.body[0].col_offset
            lines[node.body[0].lineno - 1:node.end_lineno] = [
                f"{indent}raise AssertionError('{module}.{ref} is the reference loop: the graded core called it')\n"]
    return "".join(lines)


# Tolerances suited to each kind of case (rtol, atol x the scale of the expected values): float64 cores agree with
# their loops to rounding; RMT and HRM build their RoPE tables in float32, where two correct spellings (cos/sin or
# torch.polar) differ in the last bit (6e-8), which segments, Blocks and gradients with random weights grow to 5e-6
# (measured on 20 seeds: 1e-6 failed 4), in a model's gradients in proportion to their size (up to ~20 with the
# grader's random weights: an absolute 1e-5 failed a correct torch.polar RMT once, 1.9e-5 off), so there atol is
# times the largest |expected|; float32 at long T rounds over thousands of steps; bf16 keeps 8 bits.
TOLERANCE = dict(float64=(1e-8, 1e-10), model=(1e-4, 1e-5), float32=(1e-4, 1e-4), bf16=(3e-2, 3e-2))


def draw(rng):
    """The grader's cases, drawn from `rng` (a random.Random seeded from the operating system at each grading):
    [(what, case)], a case being a dict the child can run: module, call (a function, or a method of `model`), args,
    kwargs, and how (dtype: float32, or bf16 under autocast, with no gradients; no_grad; pieces: the time step at
    which the sequence is cut in two, the state carried; count: operations counted; device)."""
    import hrm
    import rmt
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)   # noqa: E731
    def lengths(written, most=150):
        return written + sorted(rng.sample(range(1, most), 3))
    long_T = rng.randrange(2049, 3072)                 # past any fixed threshold a core might hide behind
    out = []
    for T in lengths([1, 13, 37]):
        for causal in (True, False):
            for window in (None, 1, 4, 12, 40):
                out.append((f"attention.attention(T={T}, causal={causal}, window={window})",
                            dict(module="attention", call="attention", args=list(r(3, 2, 3, T, 8).unbind(0)),
                                 kwargs=dict(causal=causal, window=window))))
    for how, window in (("float32", None), ("float32", rng.randrange(2, 600)), ("bf16", None)):
        out.append((f"attention.attention(T={long_T}, window={window}) in {how}",
                    dict(module="attention", call="attention", args=list(r(3, 1, 2, long_T, 8).unbind(0)),
                         kwargs=dict(causal=True, window=window), dtype=how)))
    out.append(("attention.attention(T=29, causal=True) under torch.no_grad()",
                dict(module="attention", call="attention", args=list(r(3, 2, 2, 29, 8).unbind(0)),
                     kwargs=dict(causal=True), no_grad=True)))
    def ssm_args(T, strong=False):
        A = -(u(3) + 0.1) * (8 if strong else 1)
        return [r(2, T, 3, 5), F.softplus(r(2, T, 3) - 1), A, r(2, T, 4), r(2, T, 4)]
    for i, T in enumerate(lengths([1, 7, 64, 131])):
        for j, chunk in enumerate((1, 4, 16, 64)):
            given = (i + j) % 2 == 1                   # with and without, every length and chunk size
            out.append((f"ssm.ssd_scan(T={T}, chunk_size={chunk}, initial_state={'given' if given else None})",
                        dict(module="ssm", call="ssd_scan", args=ssm_args(T),
                             kwargs=dict(chunk_size=chunk, initial_state=r(2, 3, 5, 4) if given else None))))
    T, at = rng.randrange(40, 150), rng.randrange(1, 39)
    out.append((f"ssm.ssd_scan(T={T}, chunk_size=16) in two pieces cut at t={at}, the state carried",
                dict(module="ssm", call="ssd_scan", args=ssm_args(T), kwargs=dict(chunk_size=16, initial_state=None),
                     pieces=at)))
    out.append((f"ssm.ssd_scan(T={long_T}, chunk_size=64, strong decays) in float32",
                dict(module="ssm", call="ssd_scan", args=ssm_args(long_T, strong=True),
                     kwargs=dict(chunk_size=64, initial_state=None), dtype="float32")))
    out.append(("ssm.ssd_scan(T=29, chunk_size=8) under torch.no_grad()",
                dict(module="ssm", call="ssd_scan", args=ssm_args(29), kwargs=dict(chunk_size=8), no_grad=True)))
    def titans_args(T, memory="mlp", momentum=True):
        q, k = F.normalize(r(2, 2, T, 4), dim=-1), F.normalize(r(2, 2, T, 4), dim=-1)
        gates = [0.03 * u(2, 2, T), 0.05 + 0.9 * u(2, 2, T), 0.1 * u(2, 2, T)]
        weights = (0.3 * r(2, 2, 4, 4),) if memory == "linear" else (0.5 * r(2, 2, 4, 6), 0.3 * r(2, 2, 6, 4))
        return [q, k, r(2, 2, T, 4), *gates, weights, tuple(0.1 * r(*W.shape) for W in weights) if momentum else None]
    for T in lengths([1, 13, 64]):
        for memory, chunk, clip, momentum in [("linear", 4, None, True), ("mlp", 1 if T < 64 else 2, 3.0, True),
                                              ("mlp", 16, None, False), ("mlp", 4, 0.5, True)]:
            out.append((f"titans.neural_memory({memory} memory, T={T}, chunk_size={chunk}, max_grad_norm={clip}, "
                        f"momentum={'given' if momentum else None})",
                        dict(module="titans", call="neural_memory", args=titans_args(T, memory, momentum),
                             kwargs=dict(chunk_size=chunk, max_grad_norm=clip))))
    T, at = rng.randrange(40, 100), 8 * rng.randrange(1, 5)   # cut between chunks (inside one, the tokens after
    # the cut would take their gradients at other weights than the whole sequence's)
    out.append((f"titans.neural_memory(mlp memory, T={T}, chunk_size=8) in two pieces cut at t={at}, the state "
                "carried", dict(module="titans", call="neural_memory", args=titans_args(T), kwargs=dict(chunk_size=8),
                                pieces=at)))
    T = rng.randrange(300, 500)
    out.append((f"titans.neural_memory(mlp memory, T={T}, chunk_size=16) in float32",
                dict(module="titans", call="neural_memory", args=titans_args(T), kwargs=dict(chunk_size=16),
                     dtype="float32")))
    out.append(("titans.neural_memory(T=29, chunk_size=8) under torch.no_grad()",
                dict(module="titans", call="neural_memory", args=titans_args(29), kwargs=dict(chunk_size=8),
                     no_grad=True)))
    def model(module, name, config):
        torch.manual_seed(rng.getrandbits(62))
        m = getattr(module, name)(getattr(module, name + "Config")(**config)).double()
        with torch.no_grad():                      # every weight drawn: no norm of 1 or bias of 0 hides a term
            for p in m.parameters():
                p.copy_(0.5 * r(*p.shape))
        return dict(module=module.__name__, model=(name, config), state=m.state_dict())
    for pos in ("rope", "none"):
        for depth in (None, 2):
            config = dict(vocab_size=13, d_model=16, n_heads=2, n_mem=3, segment_len=5, pos=pos, bptt_depth=depth)
            tokens = torch.randint(0, 13, (2, 23), generator=g)
            out.append((f"rmt.RMT({pos=}, bptt_depth={depth}) on 23 tokens (segments of 5, M=3)",
                        dict(model(rmt, "RMT", config), call="forward", args=[tokens], kwargs=dict(return_memory=True))))
        out.append((f"rmt.RMT.segment_step({pos=}, a segment of 2 of S=5 tokens)",
                    dict(model(rmt, "RMT", config), call="segment_step",
                         args=[torch.randint(0, 13, (2, 2), generator=g), r(2, 3, 16)], kwargs={})))
    for gradient in ("one_step", "last_cycle"):
        for causal in (True, False):
            config = dict(vocab_size=7, d_model=16, n_layers=4, n_heads=2, H_cycles=2, L_cycles=3, segments=2,
                          causal=causal, gradient=gradient)
            out.append((f"hrm.HRM({gradient=}, {causal=}), 3 segments (the order of its updates decides the logits)",
                        dict(model(hrm, "HRM", config), call="forward", args=[torch.randint(0, 7, (2, 11), generator=g)],
                             kwargs=dict(segments=3))))
    out.append(("hrm.HRM, 2 segments under torch.no_grad()",
                dict(model(hrm, "HRM", config), call="forward", args=[torch.randint(0, 7, (2, 11), generator=g)],
                     kwargs=dict(segments=2), no_grad=True)))
    return out


def chain(name, rng):
    """The points (T, options) at which a core's operations are counted, drawn now (tests/test_cores.py counts at
    fixed ones, which a core could single out), and the pairs the rules compare: [(rule, i, j)].
    A chunked core: (T, c), (4T, 4c), (4T, c), (16T, 4c), T from 64 to 128, c 8 or 16; rule 2 (the same number of
    chunks) on points 0-1 and 2-3, rule 3 (the same chunk size) on 0-2 and 1-3. So a core that changes its form at
    some length, chunk size or number of chunks (a (T, T) form below it, a loop over time steps above) meets a
    rule on either side: two points in the (T, T) form share a chunk size, two in the loop a number of chunks.
    Attention (no chunks): T, 4T, 16T from 16 to 512, rule 2 on each step, a window of 3 to 6 where it has one."""
    import test_cores as tc
    options = dict(tc.CORES[name][4][0][1])
    if "window" in options:
        options["window"] = rng.randint(3, 6)
    if "chunk_size" not in options:
        T = rng.randint(16, 32)
        return [(T * f, options) for f in (1, 4, 16)], [("ops", 0, 1), ("ops", 1, 2)]
    c = rng.choice([8, 16])
    T = c * rng.randint(64 // c, 128 // c)
    points = [(T, c), (4 * T, 4 * c), (4 * T, c), (16 * T, 4 * c)]
    return [(T, dict(chunk_size=c)) for T, c in points], [("ops", 0, 1), ("ops", 2, 3), ("work", 0, 2), ("work", 1, 3)]


def counted(rng):
    """The cases whose operations are counted (tests/test_cores.py's rules 2 and 3, at the points and on inputs
    drawn from `rng`: `chain`), and the cases run on the data-free 'meta' device (rule 5), every default argument
    left to the core."""
    import test_cores as tc
    out = []
    for name, (module, core, _, make, _, _) in tc.CORES.items():
        points, pairs = chain(name, rng)
        for k, (T, options) in enumerate(points):   # each point once; `pairs` say which two each rule compares
            args, kwargs = make(T, "cpu", seed=rng.getrandbits(62), **options)
            out.append((f"{module.__name__}.{core}(T={T}{tc.described(options)})",
                        dict(module=module.__name__, call=core, args=list(args), kwargs=kwargs, count=(name, k),
                             pairs=pairs)))
    meta = [("attention", dict(window=4)), ("attention", dict(causal=False)), ("attention", {}),
            ("ssm", dict(chunk_size=16, initial_state=None)), ("titans", dict(chunk_size=16))]
    for name, options in meta:
        module, core, _, make, _, _ = tc.CORES[name]
        args, kwargs = make(37, "meta", **({} if name == "attention" else dict(chunk_size=16)))
        args = list(args)[:7] + [None] if name == "titans" else list(args)      # titans: momentum None
        kwargs = {**kwargs, **options}
        out.append((f"{module.__name__}.{core} on 'meta'{tc.described({k: v for k, v in options.items()})}",
                    dict(module=module.__name__, call=core, args=args, kwargs=kwargs, device="meta")))
    return out


def prepared(module, case, device=None):
    """The callable, its arguments and the leaves to differentiate for a case, on `device` (default: CPU)."""
    from torch.utils._pytree import tree_flatten, tree_map
    if "model" in case:
        name, config = case["model"]
        model = getattr(module, name)(getattr(module, name + "Config")(**config)).double()
        loaded = model.load_state_dict(case["state"], strict=False)   # buffers of its own (tables) are its own
        missing = [k for k in loaded.missing_keys if k in dict(model.named_parameters())]
        if missing or loaded.unexpected_keys:
            raise RuntimeError(f"its {name}'s weights are not this repository's: missing {missing or 'none'}, "
                               f"unexpected {loaded.unexpected_keys or 'none'}")
        leaves = [] if case.get("no_grad") else list(model.parameters())
        args = [a.to(device) for a in case["args"]] if device else case["args"]
        return getattr(model.to(device) if device else model, case["call"]), args, case["kwargs"], leaves
    def leaf(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device) if device else t.clone()
        wanted = case.get("grad", True) or "count" in case      # a counted case's autograd graph is counted too
        return t.requires_grad_() if t.is_floating_point() and not device and wanted else t
    args, kwargs = tree_map(leaf, case["args"]), tree_map(leaf, case["kwargs"])
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    return getattr(module, case["call"]), args, kwargs, leaves


def in_pieces(fn, module, args, kwargs, at):
    """A core called on time steps [0, at), then on the rest with the state it handed back (ssd_scan's final state,
    neural_memory's weights and momentum): what streaming a sequence in pieces does."""
    if module == "ssm":
        x, dt, A, B, C = args
        y1, h = fn(x[:, :at], dt[:, :at], A, B[:, :at], C[:, :at], **kwargs)
        y2, h = fn(x[:, at:], dt[:, at:], A, B[:, at:], C[:, at:], **{**kwargs, "initial_state": h})
        return torch.cat([y1, y2], 1), h
    *seq, weights, momentum = args                     # titans: q, k, v and the gates, (B, H, T, ...)
    y1, (weights, momentum) = fn(*[t[:, :, :at] for t in seq], weights, momentum, **kwargs)
    y2, state = fn(*[t[:, :, at:] for t in seq], weights, momentum, **kwargs)
    return torch.cat([y1, y2], 2), state


def called(fn, case, args, kwargs):
    """Run a case's call as the case says: under autocast (bf16) or torch.no_grad(), or in pieces."""
    from contextlib import nullcontext
    context = torch.autocast("cpu", dtype=torch.bfloat16) if case.get("dtype") == "bf16" else \
        torch.no_grad() if case.get("no_grad") else nullcontext()
    with context:
        if case.get("pieces"):
            return in_pieces(fn, case["module"], args, kwargs, case["pieces"])
        return fn(*args, **kwargs)


def graph_size(outs):
    """The nodes of the autograd graph behind the outputs: one per differentiable operation recorded."""
    seen, todo = {}, [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            todo += [n for n, _ in node.next_functions]
    return len(seen)


def gradients(outs, case, leaves):
    """The gradients of sum(output * probe) w.r.t. the leaves (the probes: random, drawn by the grader); none for a
    case without them (a counted case's inputs require grad only so that its autograd graph is counted)."""
    if not case.get("grad", True):
        return []
    pairs = [(o, p) for o, p in zip(outs, case["probes"]) if o.shape == p.shape and o.requires_grad]
    if not leaves or not pairs:
        return []
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in pairs), leaves, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def expected(cases, rng):
    """This process's reference for every case (the reference loops; for RMT and HRM this repository's model, the
    whole sequence at once), and the probes of each case's outputs put into it. A float32 or bf16 case's inputs are
    rounded to float32 here, then compared in float64 with what the core makes of the float32 ones."""
    import importlib
    from torch.utils._pytree import tree_flatten, tree_map
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    out = []
    for _, case in cases:
        if case.get("device"):
            out.append(None)
            continue
        if case.get("dtype"):
            to32 = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            case["args"], case["kwargs"] = tree_map(to32, case["args"]), tree_map(to32, case["kwargs"])
            case["grad"] = False
        module = importlib.import_module(case["module"])
        fn, args, kwargs, leaves = prepared(module, {**case, "grad": case.get("grad", True)
                                                     and not case.get("no_grad")})
        if case.get("dtype"):
            to64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
            args, kwargs = tree_map(to64, args), tree_map(to64, kwargs)
        if "model" not in case:
            fn = getattr(module, REFERENCES[case["module"]])
        outs = [t for t in tree_flatten(fn(*args, **kwargs))[0] if isinstance(t, torch.Tensor)]
        case["probes"] = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        out.append(([o.detach() for o in outs], gradients(outs, case, leaves)))
    return out


# The letters of each output's dimensions (the glossary's), to name where a value differs; titans: y, then the
# final weights and momentum, each (B, H, in, out).
DIMS = {("attention", "attention"): ["BHTK"], ("ssm", "ssd_scan"): ["BTHK", "BHKN"],
        ("titans", "neural_memory"): ["BHTK"] + ["BHIO"] * 4, ("rmt", "forward"): ["BTV", "BMD"],
        ("rmt", "segment_step"): ["BTV", "BMD"], ("hrm", "forward"): ["BTV"]}


def compare(cases, wanted, results):
    """The failures, one line each: what the process was refused, values against the reference, gradients, the
    operation-count rules of tests/test_cores.py, SDPA, and the device."""
    from conftest import close
    failures, counts, rules = [], {}, {}
    refusal, later, again = None, 0, []
    for (what, case), want, got in zip(cases, wanted, results):
        if refusal:             # once refused, the process is not trusted: the later cases are not graded (nor
            later += 1          # counted against their cores, which the student may have written well)
            again += got.get("refused", [])
            continue
        if got.get("refused"):  # what it was refused in this case (on the first, while its files were imported too)
            refusal = "importing the submission's files" if got.get("at_import") else what
            failures.append(f"{refusal}: the submission tried to {'; to '.join(dict.fromkeys(got['refused']))}; "
                            "refused, and graded as failed")
            continue
        if case.get("device") == "meta" and "error" in got and "see the docstring" not in got["error"] and (
                got["error"].startswith("NotImplementedError") or "device" not in got["error"]):
            continue                      # it reads values back, so it cannot run on 'meta' (a skip in test_cores)
        if "error" in got:
            failures.append(f"{what}: {got['error']}")
            continue
        if case["module"] == "attention" and not got["sdpa"]:
            failures.append(f"{what}: does not call F.scaled_dot_product_attention (its docstring asks for it)")
        if case.get("device"):
            off = got["off_device"]
            if off or any(d != case["device"] for d in got["devices"]):
                failures.append(f"{what}: built {len(off)} kind(s) of tensor off the inputs' device: "
                                f"{'; '.join(off[:3])}; outputs on {got['devices']}. Create tensors with device= "
                                "the inputs' device")
            continue
        if "count" in case:
            counts[case["count"]] = what, got
            rules[case["count"][0]] = case["pairs"]
        if case.get("no_grad") and any(got["requires_grad"]):
            failures.append(f"{what}: an output requires grad: something turned gradients back on")
            continue
        rtol, atol = TOLERANCE[case.get("dtype") or ("model" if "model" in case else "float64")]
        try:
            (outs, grads), (g_outs, g_grads) = want, (got["outputs"], got["grads"])
            assert len(g_outs) == len(outs), f"{what}: {len(g_outs)} output tensors, expected {len(outs)}"
            dims = DIMS.get((case["module"], case["call"]), [])
            for i, (a, b) in enumerate(zip(g_outs, outs)):
                scale = 1.0 if not case.get("dtype") else b.abs().max().item()
                close(a.to(b.dtype) if a.shape == b.shape else a, b, f"{what}: output {i}",
                      dims[i] if i < len(dims) and a.dim() == len(dims[i]) else "", rtol=rtol, atol=atol * scale)
            assert len(g_grads) == len(grads), f"{what}: no gradient reaches the inputs"
            for i, (a, b) in enumerate(zip(g_grads, grads)):
                if (a is None) != (b is None):
                    raise AssertionError(f"{what}: input {i} {'gets no' if a is None else 'gets a'} gradient, "
                                         f"the reference's {'does' if a is None else 'does not'}")
                if a is not None:   # a whole model's rounding grows with its gradients' size: atol scales with it
                    scale = max(1.0, b.abs().max().item()) if "model" in case else 1.0
                    close(a, b, f"{what}: the gradient w.r.t. input {i}", rtol=rtol, atol=atol * scale)
        except AssertionError as e:
            failures.append(str(e))
    for name, pairs in rules.items():
        for rule, i, j in pairs:
            if (name, i) not in counts or (name, j) not in counts:
                continue                           # (a point that failed otherwise is named above)
            (what1, a), (what2, b) = counts[name, i], counts[name, j]
            if rule == "ops" and b["ops"] > 2 * a["ops"]:
                failures.append(f"{what1} dispatched {a['ops']} operations and {what2} {b['ops']}: "
                                f"{b['ops'] / max(a['ops'], 1):.1f}x for 4x the length at the same number of "
                                "chunks; it loops over time steps (tests/test_cores.py, rule 2)")
            if rule == "ops" and b["profiled"] > 2 * a["profiled"]:
                failures.append(f"{what1} ran {a['profiled']} ATen operations and {what2} {b['profiled']} "
                                f"(PyTorch's profiler): {b['profiled'] / max(a['profiled'], 1):.1f}x for 4x the length "
                                f"at the same number of chunks, while the dispatch counter saw {a['ops']} and "
                                f"{b['ops']}; it loops over time steps out of the counter's sight "
                                "(tests/test_cores.py, rule 2)")
            if rule == "ops" and b["graph"] > 2 * max(a["graph"], 1):
                failures.append(f"{what1} recorded {a['graph']} autograd operations and {what2} {b['graph']}: "
                                f"{b['graph'] / max(a['graph'], 1):.1f}x for 4x the length at the same number of "
                                "chunks; it loops over time steps (tests/test_cores.py, rule 2; autograd records "
                                "operations that the counters can be kept from seeing)")
            if rule == "work" and b["elements"] > 8 * a["elements"]:
                failures.append(f"{what1} wrote {a['elements']:,} tensor elements and {what2} {b['elements']:,}: "
                                f"{b['elements'] / a['elements']:.1f}x for 4x the length; its work grows like T^2 "
                                "(tests/test_cores.py, rule 3)")
            elif rule == "work" and b["allocated"] > 8 * max(a["allocated"], 1):
                failures.append(f"{what1} allocated {a['allocated']:,} bytes and {what2} {b['allocated']:,} "
                                f"(PyTorch's profiler): {b['allocated'] / max(a['allocated'], 1):.1f}x for 4x the "
                                f"length, while the dispatch counter saw {a['elements']:,} and {b['elements']:,} "
                                "elements written; its work grows like T^2 out of the counter's sight (tests/"
                                "test_cores.py, rule 3)")
    if later:
        failures.append(f"{later} later case(s) not graded (after the refusal in {refusal})" + (
            f"; refused again: to {'; to '.join(list(dict.fromkeys(again))[:3])}" if again else ""))
    return failures


def send(pipe, obj):
    """One message on a pipe: its length (8 bytes), then torch.save's bytes."""
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    pipe.write(len(buffer.getvalue()).to_bytes(8, "little") + buffer.getvalue())
    pipe.flush()


def receive(pipe):
    """The next message on a pipe (None when it is closed); tensors, numbers and strings only (weights_only), so
    nothing the submission made runs here."""
    import io
    head = pipe.read(8)
    if len(head) < 8:
        return None
    return torch.load(io.BytesIO(pipe.read(int.from_bytes(head, "little"))), weights_only=True)


def isolated(sealed, first, keep=None, rng=None, seconds=CASE_SECONDS):
    """Grade the submission in `sealed` by the checks above, on cases drawn now (from `rng`, else the operating
    system's randomness); the counted and 'meta' cases too when `first`; only those for which keep(what, case) holds
    when given (the tests' shortcut); the child is stopped when one case takes more than `seconds`. Returns the
    failures, one line each."""
    rng = rng or random.Random(int.from_bytes(os.urandom(8), "little"))
    cases = [(what, case) for what, case in draw(rng) + (counted(rng) if first else [])
             if keep is None or keep(what, case)]
    for _, case in cases:
        case.setdefault("grad", "count" not in case)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # tiny tensors: a second thread only waits (100x slower on a busy CPU)
    try:
        wanted = expected(cases, rng)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="child-", dir=os.path.dirname(sealed)) as scratch, \
            tempfile.TemporaryFile(dir=os.path.dirname(sealed)) as errors:   # (beside sealed: the grader's folder)
        child = spawn([sys.executable, os.path.realpath(__file__), "--child", sealed, scratch], cwd=scratch,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                                 env={**os.environ, **ON_A_CPU, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": scratch,
                                      "TORCHINDUCTOR_CACHE_DIR": scratch})
        results, late, timer = [], [], None
        try:
            for _, case in cases:                  # one case at a time: the next exists only once this one is back
                timer = threading.Timer(seconds, lambda: late.append(True) or child.kill())
                timer.start()
                send(child.stdin, case)
                results.append(receive(child.stdout))
                timer.cancel()
                if results[-1] is None:
                    break
        except (BrokenPipeError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
            child.kill()
            kind = "something other than plain tensors" if isinstance(e, pickle.UnpicklingError) else "no result"
            return [f"the submission's process handed back {kind} for case {len(results)} of {len(cases)} "
                    f"({cases[len(results) - 1][0] if results else cases[0][0]}); a tensor subclass or a result "
                    "it wrote itself is refused"]
        finally:
            if timer:
                timer.cancel()
            for pipe in (child.stdin, child.stdout):
                pipe.close()
            child.kill()    # nothing it does now counts (its own exit took 0.7 s); one that ended keeps its status
            child.wait()
            LIVE.discard(child)
        if len(results) < len(cases) or None in results:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
            return [f"the submission's process ended after {len([r for r in results if r])} of {len(cases)} cases "
                    + (f"(stopped: one case ran past {seconds} s)" if late else
                       f"(exit status {child.returncode}) {tail[0][:300]}")]
    bad = [what for (what, _), got in zip(cases, results) for t in got.get("outputs", []) + [
        g for g in got.get("grads", []) if g is not None] if type(t) is not torch.Tensor]
    if bad:
        return [f"{bad[0]}: the submission handed back a tensor subclass, not a plain tensor; refused"]
    return compare(cases, wanted, results)


def child(sealed, scratch):
    """In the child process: confined (it may write only in `scratch`, an empty folder of its own), the submission's
    files in `sealed` imported, then each case read from the grader's pipe, run, and its results written back
    before the next case is read."""
    from contextlib import nullcontext
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._pytree import tree_flatten
    import importlib
    cases, results = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)           # the submission reads nothing from the grader
    os.dup2(2, 1)                                           # and what it prints goes to stderr
    refused = []
    with profile(activities=[ProfilerActivity.CPU]):   # the profiler's thread started before the watch's first look
        torch.ones(1).add(1)
    # hidden: the grader's repository, and the rest of its working folder (the test process's folders and the
    # unsealed copy there: a red-team pass answered the child's cases from the test process through them)
    confine(writable=[scratch], hidden=[ma.ROOT, os.path.dirname(sealed)], refused=refused, readable=[sealed],
            strict=True)
    sys.path[:] = [sealed, os.path.join(sealed, "tests")] + outside(sys.path, ma.ROOT)
    torch.set_num_threads(1)
    from conftest import Calls, Trace   # bound before the submission is imported (test_cores.py imports it)
    # Copies of the profiler's method and of this module's graph_size, which the submission could replace (a red-team
    # pass), and the operation counts kept again: all out of its reach but through the interpreter's internals.
    events = profile.events
    count_graph = types.FunctionType(graph_size.__code__, {"torch": torch, "__builtins__": __builtins__})
    tally = [0, 0]

    class Tallied(Trace):
        """Trace, its counts kept again here, where a plain write to the mode's own (a red-team pass) does not reach."""
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops, elements = self.ops, self.elements
            out = super().__torch_dispatch__(func, types, args, kwargs)
            tally[0], tally[1] = tally[0] + self.ops - ops, tally[1] + self.elements - elements
            return out

    def canary():
        """What the three counters and Calls make of a fixed computation. Taken before the submission is imported and
        again after each case: a difference means that its code changed PyTorch's machinery under them (a red-team
        pass replaced the dispatch modes' __enter__ and the profiler's events at import, and every count read 0)."""
        try:
            tally[:] = [0, 0]
            trace, calls, profiler = Tallied(), Calls(), profile(activities=[ProfilerActivity.CPU])
            with profiler, calls, trace:
                out = (torch.ones(3, dtype=torch.float64, requires_grad=True) * 2).exp().sum()
            return (f"dispatched {trace.ops} operations writing {trace.elements} elements (kept again: {tally[0]}, "
                    f"{tally[1]}), called {' '.join(sorted(calls.names))}, {count_graph([out])} autograd nodes, "
                    f"{sum(e.name.startswith('aten::') for e in events(profiler))} profiled")
        except Exception as e:                                          # noqa: BLE001 -- the submission's doing
            return f"{type(e).__name__}: {str(e)[:200]}"
    untouched = canary()
    modules, shown = {}, 0
    for name in REFERENCES.keys() | {"rmt", "hrm"}:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as e:                                          # noqa: BLE001 -- the submission's error
            modules[name] = f"importing {name}.py: {type(e).__name__}: {str(e)[:300]}"
    imported = len(refused)
    while (case := receive(cases)) is not None:
        try:
            module = modules[case["module"]]
            if isinstance(module, str):
                raise ImportError(module)
            device = case.get("device")
            fn, args, kwargs, leaves = prepared(module, case, device)
            trace, calls = Tallied(device), Calls()
            tally[:] = [0, 0]
            # The counted cases are also profiled: the profiler sees every ATen operation and the memory it allocates,
            # those run with PyTorch's dispatch modes switched off (which hides them from Trace) included.
            profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if "count" in case else \
                nullcontext()
            with profiler, calls, trace:
                outs = tree_flatten(called(fn, case, args, kwargs))[0]
            graph = count_graph(outs)        # autograd's record of the work, which no dispatch switch turns off
            if [trace.ops, trace.elements] != tally:
                raise RuntimeError(f"the operation counter was written from inside the submission ({trace.ops:,} "
                                   f"operations shown, {tally[0]:,} counted); refused")
            seen = [e for e in events(profiler) if e.name.startswith("aten::")] if "count" in case else []
            result = dict(ops=trace.ops, elements=trace.elements, off_device=sorted(set(trace.off_device)),
                          profiled=len(seen), allocated=sum(max(e.self_cpu_memory_usage, 0) for e in seen),
                          graph=graph, sdpa="scaled_dot_product_attention" in calls.names,
                          devices=[str(t.device) for t in outs if isinstance(t, torch.Tensor)])
            if not device:
                outs = [t for t in outs if isinstance(t, torch.Tensor)]
                result["requires_grad"] = [o.requires_grad for o in outs]
                result["outputs"], result["grads"] = [o.detach() for o in outs], gradients(outs, case, leaves)
        except Exception as e:                                          # noqa: BLE001 -- the submission's error
            result = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        if (now := canary()) != untouched:
            refused.append(f"change what PyTorch's counters see (a fixed computation: {untouched} before its import; "
                           f"{now} after this case)")
        result["refused"], result["at_import"] = refused[shown:], shown == 0 and imported > 0
        shown = len(refused)                                       # each case hands back what is new since the last
        send(results, result)


def copies(graded, work):
    """Write the two copies that grade a submission into `work`: repo, this repository with the graded files (the
    tests run there), and sealed, the graded files with their reference loops raising (the child runs there)."""
    repo, sealed = os.path.join(work, "repo"), os.path.join(work, "sealed")
    ma.make_assignment(repo, only=set())                       # everything in, nothing blanked
    shutil.copy(os.path.join(ma.ROOT, "tests", "test_oracles.py"), os.path.join(repo, "tests"))
    os.makedirs(os.path.join(sealed, "tests"))
    for name in ("conftest.py", "test_cores.py"):
        shutil.copy(os.path.join(ma.ROOT, "tests", name), os.path.join(sealed, "tests"))
    for module, text in graded.items():
        with open(os.path.join(repo, module + ".py"), "w") as f:
            f.write(text)
        with open(os.path.join(sealed, module + ".py"), "w") as f:
            f.write(without_references(text, module))
    return repo, sealed


# ---------------------------------------------------------------------------------------------------------
# The gate: the suite as feedback for the student. The grader counts its outcome itself from a report that pytest
# writes (JUnit XML) against the tests it collects from this repository's own files at the same seed: every test
# there, none failed, skips only where tests/test_cores.py allows them ('meta'), and a report at all (an early exit
# leaves none). A submission that forges the report still meets the isolated checks.
# ---------------------------------------------------------------------------------------------------------

def collected(tests, only, seed):
    """The test ids pytest collects from this repository's files at this seed."""
    out, _ = finished([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *only,
                       *tests], cwd=ma.ROOT, env={**os.environ, **ON_A_CPU, "GRADE_SEED": str(seed),
                                                  "PYTHONDONTWRITEBYTECODE": "1"})
    return {line.strip() for line in out.splitlines() if "::" in line}


def gate(report, expected):
    """What the suite's report says against the tests expected: "" when every one passed, else one line."""
    import xml.etree.ElementTree as ET
    try:
        cases = list(ET.parse(report).iter("testcase"))
    except (OSError, ET.ParseError):
        return "the test run ended without its report (an early exit)"
    seen, failed, skipped = set(), [], []
    for case in cases:
        name = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        seen.add(name)
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None and "meta" not in name:
            skipped.append(name)
    missing = expected - seen
    if failed or skipped or missing:
        return (f"{len(failed)} failed" + (f", {len(skipped)} skipped" if skipped else "") +
                (f", {len(missing)} of {len(expected)} never ran" if missing else "") + " (counted by the grader)")
    return ""


def snapshot():
    """The grader's own files and their bytes, to show the grading left them as they were."""
    out = {}
    for pattern in ma.SHIPPED + ma.INSTRUCTOR_ONLY:
        for path in glob.glob(os.path.join(ma.ROOT, pattern)):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, ma.ROOT)] = f.read()
    return out


def run_tests(work, repo, args):
    """In the pytest process: confined (writes only under work's pytest-* folders), then pytest on `args`."""
    import pytest
    refused = []
    os.chdir(repo)
    confine(writable=[os.path.join(work, d) for d in os.listdir(work) if d.startswith("pytest-")],
            hidden=[ma.ROOT, work], refused=refused, readable=[repo])
    sys.path[:] = [repo, os.path.join(repo, "tests")] + outside(sys.path, ma.ROOT)
    sys.exit(pytest.main(args))


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(*sys.argv[2:4])
    if sys.argv[1:2] == ["--pytest"]:
        return run_tests(sys.argv[2], sys.argv[3], sys.argv[4:])
    sys.path.insert(0, ma.ROOT)                                 # this process: this repository's modules
    parser = argparse.ArgumentParser(description="Grade a submission (or the original solutions) over seeds.",
                                     allow_abbrev=False)
    parser.error = lambda message: parser.exit(2, f"grade: error: {message}\n")   # one line, as compare.py's
    parser.add_argument("submission", nargs="?", help="a student's copy; none: the original solutions")
    parser.add_argument("--seeds", type=seeds, default=os.environ.get("GRADE_SEED") or "1",
                        help="GRADE_SEED values for the tests: 1234, 0-199 or 1,5,9 (default: $GRADE_SEED or 1); "
                        "the isolated checks draw fresh inputs at every seed")
    parser.add_argument("--jobs", type=positive, default=1, help="seeds graded at once (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and say where it is")
    args = parser.parse_args()
    if args.submission and not os.path.isdir(args.submission):
        parser.error(f"{args.submission} is not a folder; a submission is a student's copy of the repository")
    graded, unchanged = {}, []
    for module in ma.MODULES:
        with open(os.path.join(ma.ROOT, module + ".py")) as f:
            graded[module] = original = f.read()
        if not args.submission:
            continue
        path = os.path.join(args.submission, module + ".py")
        try:
            with open(path) as f:
                graded[module], carried = splice(original, f.read(), module)
        except OSError as e:
            sys.exit(f"grade: cannot read {path} ({e.strerror}); a submission is a student's copy of the repository")
        except (SyntaxError, ValueError) as e:
            where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            sys.exit(f"grade: {path} cannot be graded{where}: {getattr(e, 'msg', e)}")
        if carried:
            print(f"{module}.py: graded with the submission's own {', '.join(carried)} (added or changed)")
        unchanged += [module] * (graded[module] == original)
    if unchanged:        # (a copy made with --only hands the other cores out written: their pass is not the student's)
        print(f"the same as this repository's (handed out written by --only, or copied): "
              f"{', '.join(m + '.py' for m in unchanged)}")
    # (the submission so far only read as text;) now the reference, before any of the submission's code runs
    sys.pycache_prefix = tempfile.mkdtemp(prefix="grade-pycache-")     # the reference from its source, never from a
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix              # cached .pyc in the repository (a poisoned one)
    sys.dont_write_bytecode = True     # nor to one there: the solutions' bytecode, where a submission could read it
    import attention, hrm, rmt, ssm, titans, conftest, test_cores      # noqa: E401,F401 -- the reference, first
    before = snapshot()
    work = tempfile.mkdtemp(prefix="grade-")
    def stop(*_):                   # a signal: the graders' processes and the temporary folder go, then this one
        for process in list(LIVE):
            process.kill()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sys.pycache_prefix, ignore_errors=True)
        print("grade: stopped; nothing graded is kept", file=sys.stderr, flush=True)
        os._exit(130)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        failed = grade_all(args, graded, work, unchanged)
        changed = sorted(k for k in before.keys() | snapshot().keys() if before.get(k) != snapshot().get(k))
        if changed:
            print(f"grade: the grader's repository changed while grading ({', '.join(changed[:5])}): nothing passes; "
                  f"restore it (git checkout) before grading again")
            failed = args.seeds
        print(f"{len(args.seeds) - len(failed)} of {len(args.seeds)} seeds passed every test and every isolated check"
              + (f"; failed at {', '.join(map(str, failed))}" if failed else ""))
    finally:
        if args.keep:
            print(f"the graded copy: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sys.pycache_prefix, ignore_errors=True)
    sys.exit(1 if failed else 0)


def by_core_line(failures, unchanged=()):
    """The isolated checks' failures by core, those of no core, and the line that counts them core by core (a file
    the same as this repository's is marked so: its pass is not the student's)."""
    by_core = {m: [f for f in failures if f.startswith(m + ".")] for m in ma.MODULES}
    loose = [f for f in failures if f.split(".")[0] not in by_core]    # (the child ended early, say)
    return by_core, loose, "  the isolated checks, core by core: " + ", ".join(
        f"{m} {len(fs)} failed" if fs else f"{m} {'not all run' if loose else 'passed'}"
        + " (this repository's own)" * (m in unchanged) for m, fs in by_core.items())


def grade_all(args, graded, work, unchanged=()):
    """Grade every seed (args.jobs at once): the gate and the isolated checks; print a line per seed and what failed.
    Returns the seeds that failed."""
    repo, sealed = copies(graded, work)
    def grade(i):
        seed = args.seeds[i]
        tests, only = (TESTS, []) if i == 0 else (TESTS[:-1], ["-k", SEEDLESS])
        # a name nobody can guess (the child may not list this folder): a red-team pass answered the child's cases
        # from the test process through files there, and a file's existence alone, which no audit event shows,
        # could carry them from a folder whose name is known
        tmp = tempfile.mkdtemp(prefix=f"pytest-{i}-", dir=work)
        report = os.path.join(tmp, "report.xml")
        # OMP_NUM_THREADS: tiny tensors, and the isolated checks run beside: a thread each
        env = {**os.environ, **ON_A_CPU, "GRADE_SEED": str(seed), "COLUMNS": "400", "PYTHONDONTWRITEBYTECODE": "1",
               "TMPDIR": tmp, "OMP_NUM_THREADS": "1"}
        with concurrent.futures.ThreadPoolExecutor(1) as side:     # the isolated checks beside the tests
            checks = side.submit(isolated, sealed, i == 0)
            expected_tests = collected(tests, only, seed)
            out, late = finished([sys.executable, os.path.realpath(__file__), "--pytest", work, repo, "-p",
                                  "no:cacheprovider", "--tb=line", "-rf", f"--basetemp={tmp}/t",
                                  f"--junitxml={report}", *only, *tests], TEST_SECONDS, cwd=repo, env=env)
            try:
                failures = checks.result()
            except Exception as e:                              # noqa: BLE001 -- results the grader cannot read
                failures = [f"the submission's results could not be compared: {type(e).__name__}: {e}"]
        return out, f"stopped after {TEST_SECONDS} s (an honest run takes a minute or two)" if late else \
            gate(report, expected_tests), failures
    failed = []
    torch.set_num_threads(1)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for seed, (out, verdict, failures) in zip(args.seeds, pool.map(grade, range(len(args.seeds)))):
            print(f"GRADE_SEED={seed}: the tests: {verdict or 'all passed (counted by the grader)'}; the isolated "
                  f"checks: {len(failures) or 'no'} failure(s)", flush=True)
            if verdict or failures:
                failed.append(seed)
                by_core, loose, summary = by_core_line(failures, unchanged)
                print(summary)                              # first: a blank copy fails some 300 tests
                for line in out.splitlines():
                    if line.startswith("FAILED"):
                        print("  " + line[:600])
                for fs in [loose, *by_core.values()]:
                    for line in fs[:6]:                     # a few of each core's, so that every core shows
                        print("  ISOLATED " + line[:600])
                    if len(fs) > 6:
                        print(f"  ... and {len(fs) - 6} more")
    return failed


if __name__ == "__main__":
    main()
