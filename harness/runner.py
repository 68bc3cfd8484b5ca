"""Many runs at once: worker processes that share the GPU (tiny models leave it mostly idle) or the CPU's cores.

A graphed training step keeps a GPU busy on its own (processes time-slice a GPU: their kernels never overlap), so a
few workers a GPU are enough to overlap one run's host work with another's kernels. Reading long streams is the
exception: there the cells run as threads of one process, each on a CUDA stream of its own, so their kernels do
overlap (harness/scale.py). Ctrl-C stops the workers; every run that finished has been stored by then.
"""
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
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


def worker_start(parent):
    """Each worker process ignores Ctrl-C (the main process stops the workers and keeps every finished run), and
    ends as soon as the main process is gone, however it ended (kill -9 included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


STOP = threading.Event()   # set when run_all is stopped: its threads (not processes) must see it and return


def run_all(specs, workers, devices, work, on_done, threads=False):
    """work(spec) for every spec, `workers` at a time: here (one worker) or in a pool of processes (or threads),
    each on the device with the fewest in flight; on_done(result) as each one ends, in this process."""
    bar = tqdm(total=len(specs), desc="runs", disable=not specs)
    queue, running = sorted(specs, key=slow_first), {}           # running: future -> its device
    cpu = None if threads else cpu_threads(workers)              # (threads share this process's torch threads)
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
                device = min(devices, key=list(running.values()).count)
                spec = dict(queue.pop(0), device=device, threads=cpu)
                if pool:
                    future = pool.submit(work, spec)
                else:                                             # one worker: run it here and now
                    future = Future()
                    future.set_result(work(spec))
                running[future] = device
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                del running[future]
                on_done(future.result())
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
