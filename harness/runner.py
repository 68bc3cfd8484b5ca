"""Many runs at once: worker processes that share the GPU (tiny models leave it mostly idle) or the CPU's cores.

A graphed training step keeps a GPU busy on its own (processes time-slice a GPU, their kernels never overlapping
unless NVIDIA's MPS daemon runs), so a few workers a GPU overlap one run's host work with another's kernels. Reading
long streams is the exception: there the cells run as threads of one process, each on a CUDA stream of its own, so
their kernels do overlap (harness/scale.py). Ctrl-C stops the workers; every run that finished has been stored by then.

Runs that share a GPU share its memory: a run that runs out of it beside others goes back in the queue, and fewer run
at once until it has finished (a few heavy runs started together need not slow the rest). A run out of memory alone
is a real error and stops the command, as does a worker process that dies (the system kills one that takes more host
memory than there is).
"""
import functools
import gc
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import torch
from tqdm import tqdm


def usable_cores():
    """The CPU cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(workers):
    """torch threads per worker: never more in all than the cores, nor more than this process has, since threads
    waiting for busy cores spin and slow everything down (README, "Threads")."""
    return max(1, min(usable_cores() // workers, torch.get_num_threads()))


def slow_first(spec):
    """Scheduling order: the grids, then the models with loops inside a step, so no long run starts last."""
    return spec["task"] != "maze", spec["model"] not in ("titans", "titans_lmm", "hrm", "hrm_last_cycle")


def describe(spec):
    """A run in a line of output: its model, its state size if the dial's, task, rate and seed."""
    fields = [f"{k}={spec[k]}" for k in ("model", "task", "lr", "seed") if k in spec]
    fields[1:1] = [f"{k}={v}" for k, v in spec.get("dial", {}).items()]
    return " ".join(fields) or "a run"


def worker_start(parent):
    """Each worker process ignores Ctrl-C (the main process stops the workers and keeps every finished run), and
    ends as soon as the main process is gone, however it ended (kill -9 included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


class OutOfMemory:
    """What a run that ran out of GPU memory returns from its worker in place of its record."""


def freeing(work, spec, empty_cache=True):
    """work(spec), then this process's cached GPU memory handed back, so that the runs in other processes can have
    it (each process keeps what its last run freed otherwise). Out of memory comes back as an OutOfMemory."""
    try:
        result = work(spec)
    except torch.OutOfMemoryError:
        result = OutOfMemory()            # (the failed run's tensors are freed with the error, after this block)
    if empty_cache and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
    return result


STOP = threading.Event()   # set when run_all is stopped: its threads (not processes) must see it and return


def run_all(specs, workers, devices, work, on_done, threads=False):
    """work(spec) for every spec, `workers` at a time: here (one worker) or in a pool of processes (or threads),
    each on the device with the fewest in flight; on_done(result) as each one ends, in this process."""
    bar = tqdm(total=len(specs), desc="runs", disable=not specs)
    # running: future -> its run: the spec, its device, whether another run was on that device at any time while it
    # ran ("shared"), and how many times the limit of runs at once had changed when it started ("turn")
    queue, running = sorted(specs, key=slow_first), {}
    asked, changes, squeezed = workers, 0, {}   # squeezed: id -> a run that ran out of memory, not yet finished
    cpu = None if threads else cpu_threads(workers)              # (threads share this process's torch threads)
    # threads share one allocator: emptying it while another thread captures a CUDA graph would break that capture
    run = functools.partial(freeing, work, empty_cache=not threads)
    pool = None
    if workers > 1 and threads:
        pool = ThreadPoolExecutor(workers)
    elif workers > 1:
        # a worker stopped mid-run leaves its queue's semaphores to the resource tracker, which would warn at exit
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=worker_start,
                                   initargs=(os.getpid(),))
    try:
        while queue or running:
            while queue and len(running) < workers:
                busy = [r["device"] for r in running.values()]
                device = min(devices, key=busy.count)
                spec = queue.pop(0)
                for other in running.values():
                    other["shared"] |= other["device"] == device
                job = dict(spec, device=device, threads=cpu)
                if pool:
                    future = pool.submit(run, job)
                else:                                             # one worker: run it here and now
                    future = Future()
                    future.set_result(run(job))
                running[future] = dict(spec=spec, device=device, shared=device in busy, turn=changes)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                done = running.pop(future)
                spec, device = done["spec"], done["device"]
                try:
                    result = future.result()
                except BrokenProcessPool:
                    in_flight = "; ".join(describe(r["spec"]) for r in [done, *running.values()])
                    sys.exit(f"compare.py: error: a worker process died (the system kills one that takes more memory "
                             f"than there is: try fewer --workers or shorter lengths) with these runs in flight: "
                             f"{in_flight}; the runs that finished are saved")
                if isinstance(result, OutOfMemory):
                    if not done["shared"]:
                        raise torch.OutOfMemoryError(f"{describe(spec)} ran out of memory on {device}, alone on it")
                    if done["turn"] == changes:       # runs started side by side that fail together lower it once
                        workers, changes = max(1, workers - 1), changes + 1
                    queue.insert(0, spec)
                    squeezed[id(spec)] = spec
                    tqdm.write(f"{describe(spec)} ran out of memory on {device} beside other runs: it goes back in "
                               f"the queue, and at most {workers} run at once until it has finished")
                    continue
                if squeezed.pop(id(spec), None) is not None and not squeezed:   # they are done: as many as asked
                    workers, changes = asked, changes + 1
                on_done(result)
                bar.update()
    except BaseException:
        STOP.set()                                                 # threads: each stops at its next piece
        for process in list(getattr(pool, "_processes", {}).values()):   # no public way to stop a running task
            process.terminate()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        STOP.clear()
        bar.close()
