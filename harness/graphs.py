"""CUDA graphs: the whole training step, and a recurrent model's `stream`, recorded once and replayed.

The models are so small that an eager step is all kernel-launch overhead: replaying the step as one graph makes
training 3-6x faster on a GPU on the sequence tasks (results/README.md, "Performance"). compare.train chooses this
path in one line, on CUDA; the eager loop it replaces is what the code reads as, and tests/test_harness_graphs.py
holds the two equal.
"""
import functools
import threading

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map_only

import tasks


@functools.cache
def side_stream(device, use="warm-up"):
    """One side stream per GPU and use (warm-ups, captures), made once: cuBLAS keeps a workspace for every stream it
    runs on, and torch.cuda.graph's own capture stream is made on whichever GPU is current at first use."""
    return torch.cuda.Stream(device)


CAPTURING = threading.Lock()   # threads reading streams side by side (harness/scale.py) capture one at a time


def capture(fn, inputs, device, pool=None, undo=None):
    """fn(*inputs) recorded as a CUDA graph, after one warm-up call on a side stream (lazy inits) and undo() of what
    it changed. Returns the graph and the outputs it overwrites at each replay."""
    device = torch.device(device)
    with CAPTURING:
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if undo:
            undo()
        # Only kernels launched on the capture stream join the graph; thread_local keeps other threads' unsafe calls
        # meanwhile (a synchronise, a cudaMalloc) from spoiling the capture.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool, stream=side_stream(device, "capture"), capture_error_mode="thread_local"):
            outputs = fn(*inputs)
    return graph, outputs


class StepGraphs:
    """step(x, y) (forward, loss, backward, clipping, AdamW) replayed from one CUDA graph per batch shape. The lr is
    a tensor the graphs read. The warm-up before a capture is undone (weights and optimiser state put back), so the
    graphs learn what the eager loop learns. A curriculum draws many lengths, so when task and model are causal the
    batch is padded on the right to a multiple of `bucket` with unscored targets: logits at t see only tokens <= t,
    so loss and gradients are unchanged (tested for every model), and 32..256 tokens make 8 graphs, not 225."""

    def __init__(self, step, model, opt, bucket=None):
        self.step, self.model, self.opt, self.bucket = step, model, opt, bucket
        self.graphs, self.pool = {}, torch.cuda.graph_pool_handle()

    def __call__(self, x, y):
        if self.bucket:
            pad = -x.shape[1] % self.bucket
            x, y = F.pad(x, (0, pad)), F.pad(y, (0, pad), value=tasks.IGNORE)
        if x.shape not in self.graphs:
            self.capture(x, y)
        graph, static_x, static_y, loss = self.graphs[x.shape]
        static_x.copy_(x.pin_memory(), non_blocking=True)     # pinned: the copy does not wait for the GPU
        static_y.copy_(y.pin_memory(), non_blocking=True)
        graph.replay()
        return loss

    def capture(self, x, y):
        device = next(self.model.parameters()).device
        static_x, static_y = x.to(device), y.to(device)
        state = [*self.model.parameters(), *self.model.buffers()]
        saved = [t.detach().clone() for t in state]
        saved_opt = {p: {k: v.clone() for k, v in s.items()} for p, s in self.opt.state.items()}

        @torch.no_grad()
        def undo():
            for t, s in zip(state, saved):
                t.copy_(s)
            for p, s in self.opt.state.items():                 # a state made by the warm-up starts at zero
                for k, v in s.items():
                    v.copy_(saved_opt[p][k]) if p in saved_opt else v.zero_()
            self.opt.zero_grad(set_to_none=True)                # the graph's backward makes its own gradients
        graph, loss = capture(self.step, (static_x, static_y), device, self.pool, undo)
        self.graphs[x.shape] = (graph, static_x, static_y, loss)


def tensors(tree):
    """The tensors of a nested tuple/list, such as a stream's state, in order."""
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class StreamGraphs:
    """A model's `stream` on CUDA without gradients, each `span` of tokens after the first (which fixes the state's
    shapes) replayed from a CUDA graph, one per shape, dtype and autocast setting: one launch instead of the
    thousands of RMT's loop over segments and Titans' over chunks. `span` is a multiple of the segment and the
    chunk, so the pieces give what one call gives. The graphs hold the weights' addresses: one StreamGraphs a model."""

    def __init__(self, model, span):
        self.model, self.span, self.graphs = model, span, {}

    def __call__(self, tokens, state=None):
        logits = []
        for piece in tokens.split(self.span, dim=1):
            if state is None or piece.shape[1] < self.span:
                out, state = self.model.stream(piece, state)
            else:
                out, state = self.replay(piece, state)
            logits.append(out)
        return torch.cat(logits, dim=1), state

    def replay(self, tokens, state):
        cast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = (tuple(tokens.shape), *((t.shape, t.dtype) for t in tensors(state)), *cast)
        if key not in self.graphs:
            inputs = (tokens.clone(), tree_map_only(torch.Tensor, torch.clone, state))
            with torch.autocast("cuda", dtype=cast[1], enabled=cast[0], cache_enabled=False):
                self.graphs[key] = (inputs, *capture(self.model.stream, inputs, tokens.device))
        inputs, graph, outputs = self.graphs[key]
        for static, new in zip(tensors(inputs), tensors((tokens, state))):
            static.copy_(new)
        graph.replay()
        return tree_map_only(torch.Tensor, torch.clone, outputs)
