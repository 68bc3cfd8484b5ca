# OUT=dir CFGS="ssm:0.025:1:steps=[4000,4000,2000] rmt:0.0002:0:n_mem=32" python gpu/stages.py : recall runs at the
# full preset's settings (its budget unless a run names train=[[lo,hi],...] and steps=[...]; other key=value pairs are
# model options), at once, 2 CPU threads each; each run's training loss per 500 steps on batches of <=8 / 9-32 / more.
import json, os, sys, time, multiprocessing as mp
sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp")
CFGS = [c.split(":") for c in os.environ["CFGS"].split()]


def one(cfg):
    import torch, compare, tasks
    torch.set_num_threads(2)
    model, lr, seed = cfg[0], float(cfg[1]), int(cfg[2])
    opts = dict(kv.split("=", 1) for kv in cfg[3:])
    opts = {k: int(v) if v.isdigit() else json.loads(v) if v[:1] == "[" else v for k, v in opts.items()}
    full, budget = compare.PRESETS["full"], compare.PRESETS["full"]["tasks"]["recall"]
    train, steps = opts.pop("train", budget.train), opts.pop("steps", budget.steps)
    spec = dict(model=model, task="recall", task_options=compare.HARD_RECALL,
                model_options={**compare.model_config(full, "recall", model), **opts}, train=train,
                test=[4, 8, 16, 32, 64, 128, 255], steps=steps, batch_size=full["batch_size"],
                eval_examples=full["eval_examples"], protocol=compare.PROTOCOL, device="cuda", lr=lr, seed=seed)
    if os.environ.get("SMOKE"):
        spec.update(steps=[2] * len(train), test=[4, 8], device="cpu", eval_examples=64)
    Ls, caught, prev, prev_train = [], [], tasks.TASKS["recall"].sample, compare.train

    def record(self, b, L, seed=0, device="cpu"):   # each training batch's pair count (tests come after)
        if isinstance(seed, torch.Generator):
            Ls.append(L)
        return prev(self, b, L, seed, device)
    tasks.TASKS["recall"].sample = record
    compare.train = lambda *a, **k: caught.append(prev_train(*a, **k)) or caught[-1]
    t = time.time()
    r = compare.run_one(spec)
    curve = []
    for a in range(0, len(caught[0]), 500):
        win = list(zip(Ls[a:a + 500], caught[0][a:a + 500]))
        curve.append([round(sum(l for L, l in win if lo <= L <= hi) / max(1, sum(lo <= L <= hi for L, _ in win)), 2)
                      for lo, hi in ((0, 8), (9, 32), (33, 999))])
    return dict(model=model, lr=lr, seed=seed, opts=opts, train=train, steps=steps,
                val=None if r["val_token_acc"] is None else round(r["val_token_acc"], 4), curve=curve,
                s=round(time.time() - t), acc={k: round(v["token_acc"], 3) for k, v in r["metrics"].items()},
                device=r["device_name"], torch=torch.__version__)


if __name__ == "__main__":
    with open(os.path.join(OUT, "stages.jsonl"), "a") as out, mp.get_context("spawn").Pool(len(CFGS)) as pool:
        for r in pool.imap_unordered(one, CFGS):
            print(json.dumps(r), flush=True)
            out.write(json.dumps(r) + "\n")
            out.flush()
