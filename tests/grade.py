"""
Grade a submission with this repository's tests, the grader-only oracles included: for instructors.

    python tests/grade.py SUBMISSION [--seeds 1234]   # SUBMISSION: a student's copy; its five model files are graded
    python tests/grade.py --seeds 0-199               # no submission: the original solutions, seed after seed

It writes a fresh copy of this repository to a temporary folder (solutions in, tests/test_oracles.py included)
and merges each of the submission's five model files into it (splice): the blanked functions, and every other
statement, function, method or class the submission added or changed, are the submission's; the rest is ours.
Then, once per seed with GRADE_SEED set (tests/conftest.py), it runs the five files' tests, tests/test_cores.py
and tests/test_oracles.py there, and the isolated checks (below): the submission computes outputs, gradients and
operation counts on this process's inputs in a child process, and this process compares them with its own
reference, out of the submission's reach. A seed passes when both pass. Tests that draw nothing from GRADE_SEED
(tests/test_cores.py, training, sizes, configs) run at the first seed only. With no submission it is the check
that no correct solution fails at any seed. It exits non-zero when anything failed at any seed.
"""
import argparse
import ast
import concurrent.futures
import os
import random
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

import make_assignment as ma

TESTS = [f"tests/test_{m}.py" for m in ma.MODULES] + ["tests/test_oracles.py", "tests/test_cores.py"]
SEEDLESS = ("not trains_on_a_bench_task and not memory_does_not_grow and not dt_init and not state_size "
            "and not bad_config")


def seeds(text):
    """"1234", "0-199" or "1,5,9" -> a list of ints."""
    out = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


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
# The checks a submission cannot reach. pytest runs the submission inside the test process, where it could patch
# the tests' helpers, torch.testing or the operation counter. So the verdict also needs these: this process draws
# the inputs and weights, a child process with the submission's files (and the reference loops replaced by a
# raise) computes the outputs, gradients and operation counts and hands them back as tensors (torch.save), and
# this process compares them with its own reference, which the submission's code never runs beside.
# ---------------------------------------------------------------------------------------------------------

REFERENCES = {"attention": "attention_ref", "ssm": "ssd_scan_ref", "titans": "neural_memory_ref"}


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


def draw(seed):
    """The grader's cases at a seed: [(what, case)], a case being a dict that the child can run: module, call (a
    function, or a method of `model`), args, kwargs, and what to hand back (counted ops, a device)."""
    import hrm
    import rmt
    def lengths(written):                          # tests/conftest.py's, at this seed
        return written + sorted(random.Random(seed).sample(range(1, 150), 3))
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)   # noqa: E731
    out = []
    for T in lengths([1, 13, 37]):
        for causal in (True, False):
            for window in (None, 1, 4, 12, 40):
                out.append((f"attention.attention(T={T}, causal={causal}, window={window})",
                            dict(module="attention", call="attention", args=list(r(3, 2, 3, T, 8).unbind(0)),
                                 kwargs=dict(causal=causal, window=window))))
    for i, T in enumerate(lengths([1, 7, 64, 131])):
        for j, chunk in enumerate((1, 4, 16, 64)):
            for given in [(i + j) % 2 == 1]:                 # with and without, every length and chunk size
                x, dt, A, B, C, h0 = r(2, T, 3, 5), F.softplus(r(2, T, 3) - 1), -(u(3) + 0.1), r(2, T, 4), \
                    r(2, T, 4), r(2, 3, 5, 4)
                out.append((f"ssm.ssd_scan(T={T}, chunk_size={chunk}, initial_state={'given' if given else None})",
                            dict(module="ssm", call="ssd_scan", args=[x, dt, A, B, C],
                                 kwargs=dict(chunk_size=chunk, initial_state=h0 if given else None))))
    for T in lengths([1, 13, 64]):
        for memory, chunk, clip, momentum in [("linear", 4, None, True), ("mlp", 1 if T < 64 else 2, 3.0, True),
                                              ("mlp", 16, None, False), ("mlp", 4, 0.5, True)]:
            q, k = F.normalize(r(2, 2, T, 4), dim=-1), F.normalize(r(2, 2, T, 4), dim=-1)
            gates = [0.03 * u(2, 2, T), 0.05 + 0.9 * u(2, 2, T), 0.1 * u(2, 2, T)]
            weights = (0.3 * r(2, 2, 4, 4),) if memory == "linear" else (0.5 * r(2, 2, 4, 6), 0.3 * r(2, 2, 6, 4))
            S0 = tuple(0.1 * r(*W.shape) for W in weights) if momentum else None
            out.append((f"titans.neural_memory({memory} memory, T={T}, chunk_size={chunk}, max_grad_norm={clip}, "
                        f"momentum={'given' if momentum else None})",
                        dict(module="titans", call="neural_memory", args=[q, k, r(2, 2, T, 4), *gates, weights, S0],
                             kwargs=dict(chunk_size=chunk, max_grad_norm=clip))))
    def model(module, name, config):
        torch.manual_seed(seed)
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
            out.append((f"hrm.HRM({gradient=}, {causal=}), 3 segments",
                        dict(model(hrm, "HRM", config), call="forward", args=[torch.randint(0, 7, (2, 11), generator=g)],
                             kwargs=dict(segments=3))))
    return out


def counted():
    """The cases whose operations are counted (tests/test_cores.py's rules 2 and 3, its inputs), and the cases
    run on the data-free 'meta' device (rule 5), every default argument left to the core."""
    import test_cores as tc
    out = []
    for name, (module, core, _, make, pairs, work) in tc.CORES.items():
        for rule, lengths in (("ops", pairs), ("work", work)):
            for T, options in lengths or []:
                args, kwargs = make(T, "cpu", **options)
                out.append((f"{module.__name__}.{core}(T={T}{tc.described(options)})",
                            dict(module=module.__name__, call=core, args=list(args), kwargs=kwargs, count=(name, rule))))
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
        model.load_state_dict(case["state"])
        leaves = list(model.parameters())
        args = [a.to(device) for a in case["args"]] if device else case["args"]
        return getattr(model.to(device) if device else model, case["call"]), args, case["kwargs"], leaves
    def leaf(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device) if device else t.clone()
        return t.requires_grad_() if t.is_floating_point() and not device and case.get("grad", True) else t
    args, kwargs = tree_map(leaf, case["args"]), tree_map(leaf, case["kwargs"])
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    return getattr(module, case["call"]), args, kwargs, leaves


def gradients(outs, case, leaves):
    """The gradients of sum(output * probe) w.r.t. the leaves (the probes: random, drawn by the grader)."""
    pairs = [(o, p) for o, p in zip(outs, case["probes"]) if o.shape == p.shape and o.requires_grad]
    if not leaves or not pairs:
        return []
    grads = torch.autograd.grad(sum((o * p).sum() for o, p in pairs), leaves, allow_unused=True)
    return [None if g is None else g.detach() for g in grads]


def expected(cases, seed):
    """This process's reference for every case (the reference loops; for RMT and HRM this repository's model),
    and the probes of each case's outputs put into it."""
    import importlib
    from torch.utils._pytree import tree_flatten
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _, case in cases:
        if case.get("device"):
            out.append(None)
            continue
        module = importlib.import_module(case["module"])
        fn, args, kwargs, leaves = prepared(module, case)
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
    """The failures, one line each: values against the reference, gradients, the operation-count rules of
    tests/test_cores.py, SDPA, and the device."""
    from conftest import close
    failures, counts = [], {}
    for (what, case), want, got in zip(cases, wanted, results):
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
            counts.setdefault(case["count"], []).append((what, got))
        try:
            (outs, grads), (g_outs, g_grads) = want, (got["outputs"], got["grads"])
            assert len(g_outs) == len(outs), f"{what}: {len(g_outs)} output tensors, expected {len(outs)}"
            dims = DIMS.get((case["module"], case["call"]), [])
            for i, (a, b) in enumerate(zip(g_outs, outs)):
                close(a, b, f"{what}: output {i}", dims[i] if i < len(dims) and a.dim() == len(dims[i]) else "",
                      rtol=1e-8, atol=1e-10)
            assert len(g_grads) == len(grads), f"{what}: no gradient reaches the inputs"
            for i, (a, b) in enumerate(zip(g_grads, grads)):
                if (a is None) != (b is None):
                    raise AssertionError(f"{what}: input {i} {'gets no' if a is None else 'gets a'} gradient, "
                                         f"the reference's {'does' if a is None else 'does not'}")
                if a is not None:
                    close(a, b, f"{what}: the gradient w.r.t. input {i}", rtol=1e-8, atol=1e-10)
        except AssertionError as e:
            failures.append(str(e))
    for (name, rule), ((what1, a), (what2, b)) in counts.items():
        if rule == "ops" and b["ops"] > 2 * a["ops"]:
            failures.append(f"{what1} dispatched {a['ops']} operations and {what2} {b['ops']}: "
                            f"{b['ops'] / a['ops']:.1f}x for 4x the length at the same number of chunks; it loops "
                            "over time steps (tests/test_cores.py, rule 2)")
        if rule == "ops" and b["profiled"] > 2 * a["profiled"]:
            failures.append(f"{what1} ran {a['profiled']} ATen operations and {what2} {b['profiled']} (PyTorch's "
                            f"profiler): {b['profiled'] / a['profiled']:.1f}x for 4x the length at the same number "
                            f"of chunks, while the dispatch counter saw {a['ops']} and {b['ops']}; it loops over time "
                            "steps out of the counter's sight (tests/test_cores.py, rule 2)")
        if rule == "work" and b["elements"] > 8 * a["elements"]:
            failures.append(f"{what1} wrote {a['elements']:,} tensor elements and {what2} {b['elements']:,}: "
                            f"{b['elements'] / a['elements']:.1f}x for 4x the length; its work grows like T^2 "
                            "(tests/test_cores.py, rule 3)")
    return failures


def isolated(repo, seed, first, modules=None):
    """Grade the submission in `repo` at one seed by the checks above; the counted and 'meta' cases only at the
    first seed (they draw nothing from it); only the cases of `modules` when given (the tests' shortcut).
    Returns the failures."""
    cases = [(what, case) for what, case in draw(seed) + (counted() if first else [])
             if modules is None or case["module"] in modules]
    for _, case in cases:
        case.setdefault("grad", "count" not in case)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # tiny tensors: a second thread only waits (100x slower on a busy CPU)
    try:
        wanted = expected(cases, seed)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="grade-child-") as tmp:
        torch.save([case for _, case in cases], os.path.join(tmp, "cases.pt"))
        run = subprocess.run([sys.executable, os.path.realpath(__file__), "--child", os.path.join(tmp, "cases.pt"),
                              os.path.join(tmp, "results.pt"), repo], capture_output=True, text=True,
                             env={**os.environ, "GRADE_SEED": str(seed)}, timeout=900)
        if not os.path.exists(os.path.join(tmp, "results.pt")):
            return [f"the submission's process ended without results (exit status {run.returncode}): "
                    f"{run.stderr.strip()[-300:]}"]
        results = torch.load(os.path.join(tmp, "results.pt"), weights_only=True)
    if len(results) != len(cases):
        return [f"the submission's process handed back {len(results)} results for {len(cases)} cases"]
    return compare(cases, wanted, results)


def child(cases_path, results_path, repo):
    """In the child process: run each case on the submission's files in `repo`, save what it computed."""
    sys.path[:0] = [repo, os.path.join(repo, "tests")]
    torch.set_num_threads(1)
    from contextlib import nullcontext
    from test_cores import Calls, Trace
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._pytree import tree_flatten
    import importlib
    results = []                              # (what the checks use is bound before the submission is imported)
    for case in torch.load(cases_path, weights_only=True):
        try:
            module = importlib.import_module(case["module"])
            device = case.get("device")
            fn, args, kwargs, leaves = prepared(module, case, device)
            trace, calls = Trace(device), Calls()
            # The counted cases are also profiled: the profiler sees every ATen operation, those run with PyTorch's
            # dispatch modes switched off (which hides them from Trace) included.
            profiler = profile(activities=[ProfilerActivity.CPU]) if "count" in case else nullcontext()
            with profiler, calls, trace:
                outs = tree_flatten(fn(*args, **kwargs))[0]
            result = dict(ops=trace.ops, elements=trace.elements, off_device=sorted(set(trace.off_device)),
                          profiled=sum(e.name.startswith("aten::") for e in profiler.events()) if "count" in case
                          else 0,
                          sdpa="scaled_dot_product_attention" in calls.names,
                          devices=[str(t.device) for t in outs if isinstance(t, torch.Tensor)])
            if not device:
                outs = [t for t in outs if isinstance(t, torch.Tensor)]
                result["outputs"], result["grads"] = [o.detach() for o in outs], gradients(outs, case, leaves)
        except Exception as e:                                          # noqa: BLE001 -- the submission's error
            result = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        results.append(result)
    torch.save(results, results_path)


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


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(*sys.argv[2:5])
    sys.path.insert(0, ma.ROOT)                                 # this process: this repository's modules
    parser = argparse.ArgumentParser(description="Grade a submission (or the original solutions) over seeds.")
    parser.add_argument("submission", nargs="?", help="a student's copy; none: the original solutions")
    parser.add_argument("--seeds", type=seeds, default=seeds(os.environ.get("GRADE_SEED") or "1"),
                        help="GRADE_SEED values: 1234, 0-199 or 1,5,9 (default: $GRADE_SEED or 1)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds graded at once (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy and say where it is")
    args = parser.parse_args()
    graded = {}
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
    work = tempfile.mkdtemp(prefix="grade-")
    repo, sealed = copies(graded, work)
    def grade(i):
        tests, only = (TESTS, []) if i == 0 else (TESTS[:-1], ["-k", SEEDLESS])
        env = {**os.environ, "GRADE_SEED": str(args.seeds[i]), "COLUMNS": "400"}   # COLUMNS: whole failure lines
        if args.jobs > 1:
            env["OMP_NUM_THREADS"] = "1"
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--tb=line", "-rf", *only,
                              *tests], cwd=repo, capture_output=True, text=True, env=env)
        try:
            failures = isolated(sealed, args.seeds[i], i == 0)
        except Exception as e:                                  # noqa: BLE001 -- results the grader cannot read
            failures = [f"the submission's results could not be compared: {type(e).__name__}: {e}"]
        return run, failures
    failed = []
    if args.jobs > 1:
        torch.set_num_threads(1)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for seed, (run, failures) in zip(args.seeds, pool.map(grade, range(len(args.seeds)))):
            lines = run.stdout.strip().splitlines()
            summary = lines[-1].strip("= ") if lines else run.stderr.strip()[-300:]
            print(f"GRADE_SEED={seed}: {summary}; {len(failures) or 'no'} failure(s) in the isolated checks",
                  flush=True)
            if run.returncode or failures:
                failed.append(seed)
                for line in lines:
                    if line.startswith("FAILED"):
                        print("  " + line[:600])
                for line in failures[:20]:
                    print("  ISOLATED " + line[:600])
                if len(failures) > 20:
                    print(f"  ... and {len(failures) - 20} more")
    print(f"{len(args.seeds) - len(failed)} of {len(args.seeds)} seeds passed every test and every isolated check"
          + (f"; failed at {', '.join(map(str, failed))}" if failed else ""))
    if args.keep:
        print(f"the graded copy: {repo}")
    else:
        shutil.rmtree(work)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
