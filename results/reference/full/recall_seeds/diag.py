# OUT=dir python gpu/diag.py : the SSM default's recall seeds at the full budget (how often short contents fail);
# 8 runs at once, 2 threads each; saves the weights of any run below 0.9 at 4 pairs. SMOKE=1: 2 tiny runs on CPU.
# CFGS="ssm:0.025:1:log,attention:0.005:0:uniform" overrides the list (draw "log": each batch's pair count drawn
# log-uniformly within its stage, instead of uniformly); key=value after the draw: train=2-8/2-32/2-255 and
# steps=4000/2000/2000 (the curriculum and budget of the reference run, the defaults), or a model option (n_mem=32).
import json, math, os, sys, time, multiprocessing as mp
sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp")
CFGS = [("ssm", 0.025, s, "uniform") for s in (1, 3, 4, 5, 6)] + [("ssm", 0.005, s, "uniform") for s in (1, 2, 3)] + [("ssm", 0.025, 1, "log")]
if os.environ.get("CFGS"):
    CFGS = [(m, float(lr), int(s), d, *kv)
            for m, lr, s, d, *kv in (c.split(":") for c in os.environ["CFGS"].split(","))]


def one(cfg):
    import torch, compare, tasks
    torch.set_num_threads(2)
    model, lr, seed, draw, *kv = cfg
    opts = dict(dict(train="2-8/2-32/2-255", steps="4000/2000/2000"), **dict(o.split("=") for o in kv))
    train = [[int(n) for n in st.split("-")] for st in opts.pop("train").split("/")]
    steps = [int(n) for n in opts.pop("steps").split("/")]
    opts = {k: int(v) if v.isdigit() else v for k, v in opts.items()}
    full = compare.PRESETS["full"]
    spec = dict(model=model, task="recall", task_options=compare.HARD_RECALL,
                model_options={**compare.model_config(full, "recall", model), **opts}, train=train,
                test=[4, 8, 16, 32, 64, 128, 255], steps=steps, batch_size=full["batch_size"],
                eval_examples=full["eval_examples"], protocol=compare.PROTOCOL, device="cuda", lr=lr, seed=seed)
    if os.environ.get("SMOKE"):
        spec.update(steps=[4] + [2] * (len(train) - 1), test=[4, 8], device="cpu", eval_examples=64)
    if draw in ("log", "mix"):   # remap each uniform draw L in [lo, hi] to a log-uniform one (mix: every other
        # batch, by a coin from the same stream); the stage from the call count
        plan, calls = [tuple(st) for st, n in zip(spec["train"], spec["steps"]) for _ in range(n)], [0]
        Task = tasks.TASKS["recall"]
        orig = Task.sample

        def sample(self, b, L, seed=0, device="cpu"):
            if isinstance(seed, torch.Generator) and calls[0] < len(plan):
                lo, hi = plan[calls[0]]
                calls[0] += 1
                u = (L - lo + torch.rand(1, generator=seed).item()) / (hi - lo + 1)
                if draw == "log" or torch.rand(1, generator=seed).item() < 0.5:
                    L = min(hi, max(lo, int(math.exp(math.log(lo) + u * math.log((hi + 1) / lo)))))
            return orig(self, b, L, seed, device)
        Task.sample = sample
    Ls, caught, prev, prev_train = [], [], tasks.TASKS["recall"].sample, compare.train

    def record(self, b, L, seed=0, device="cpu"):   # each training batch's pair count (tests come after)
        if isinstance(seed, torch.Generator):
            Ls.append(L)
        return prev(self, b, L, seed, device)
    tasks.TASKS["recall"].sample = record
    compare.train = lambda *a, **k: caught.append(prev_train(*a, **k)) or caught[-1]
    name = f"{model}_lr{lr:g}_seed{seed}_{draw}" + "".join("_" + o.replace("/", "+") for o in kv)
    spec.update(out=OUT, weights=f"{name}.pt")   # run_one saves them; removed below unless the run failed at 4
    t = time.time()
    r = compare.run_one(spec)
    acc = {k: round(v["token_acc"], 3) for k, v in r["metrics"].items()}
    if acc.get("4", 0) >= 0.9:
        os.remove(os.path.join(OUT, f"{name}.pt"))
    curve = []   # per 500 steps: the mean training loss of batches of <= 8 pairs, of 9-32, of more
    for a in range(0, len(caught[0]), 500):
        win = list(zip(Ls[a:a + 500], caught[0][a:a + 500]))
        curve.append([round(sum(l for L, l in win if lo <= L <= hi) / max(1, sum(lo <= L <= hi for L, _ in win)), 2)
                      for lo, hi in ((0, 8), (9, 32), (33, 999))])
    return dict(model=model, lr=lr, seed=seed, draw=draw, opts=opts, train=train, steps=steps,
                val=round(r["val_token_acc"], 3), curve=curve,
                final_loss=round(r["final_loss"], 3), s=round(time.time() - t), acc=acc,
                loss4=round(r["metrics"]["4"]["loss"], 2), device=r["device_name"])


if __name__ == "__main__":
    cfgs = CFGS[:2] if os.environ.get("SMOKE") else CFGS
    with open(os.path.join(OUT, "diag.jsonl"), "a") as out, mp.get_context("spawn").Pool(len(cfgs)) as pool:
        for r in pool.imap_unordered(one, cfgs):
            print(json.dumps(r), flush=True)
            out.write(json.dumps(r) + "\n")
            out.flush()
