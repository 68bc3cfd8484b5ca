"""
Tiny procedurally generated sequence tasks: the bench's test of copying against filtering.

Every task is a next-token problem: a sampler returns `x` (B, T) token ids and `y` (B, T) targets, where
y[b, t] is what the model should output after reading x[b, :t+1], and y = -100 wherever nothing is scored
(so the loss is only on answers). The answer at a scored position is never visible in x[b, :t+1]. The same
seed always gives the same batch. Nothing is downloaded; `python tasks.py` prints one example of each task.

  copy            copy a random string after a separator           copying   (Jelassi et al., arXiv 2402.01032)
  mqar            multi-query associative recall                   copying   (Zoology, arXiv 2312.04927)
  flipflop        remember the last written bit in a noisy stream  filtering (Liu et al., arXiv 2306.00946)
  selective_copy  reproduce data tokens scattered in noise         both      (Mamba §4.1, arXiv 2312.00752)
  babilong        where is a person / object, facts lost in noise  filtering (BABILong, arXiv 2406.10149)

Contract: `TASKS[name](**options)` builds a task with `.vocab_size`, `.names` (a printable name per token id)
and `.sample(batch_size, length, seed=0, device="cpu") -> (x, y)`; `seed` is an int or a torch.Generator.
What `length` means is each task's own difficulty knob (the string length for copy, the sequence length for
the rest). An impossible request raises ValueError with a message that says why.
"""
from functools import partial

import torch

IGNORE = -100  # the target value that the loss and the metrics skip


def _generator(seed):
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _check(batch_size, length, min_length, what):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if length < min_length:
        raise ValueError(f"{what}: length {length} is too short, it needs at least {min_length}")


def rand_int(n, g):
    """One integer in [0, n) from generator g."""
    return int(torch.randint(0, n, (1,), generator=g))


def render(task, x, y, b=0):
    """One example as text: the input tokens, with each scored position followed by `->answer`."""
    out = []
    for t in range(x.shape[1]):
        tok = task.names[x[b, t]]
        out.append(tok + (f"->{task.names[y[b, t]]}" if y[b, t] != IGNORE else ""))
    return " ".join(out)


class Copy:
    """Copy a string (Jelassi et al. 2024): `$ s | s`, scored on the second copy.

    length = n, the string length; x and y have T = 2n + 1 positions. Letters are a..z (n_letters of them).

    Example (n=3, scored positions shown as `input->target`):
        $ q d k |->q q->d d->k
    """
    min_length = 1

    def __init__(self, n_letters=26):
        self.n_letters = n_letters
        self.bos, self.sep = n_letters, n_letters + 1
        self.vocab_size = n_letters + 2
        self.names = [chr(ord("a") + i) for i in range(n_letters)] + ["$", "|"]

    def prompt_length(self, length):
        """Positions before the first generated token, for greedy generation: `$ s |`."""
        return length + 2

    def sample(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, "copy")
        g = _generator(seed)
        s = torch.randint(0, self.n_letters, (batch_size, length), generator=g)
        bos = torch.full((batch_size, 1), self.bos)
        sep = torch.full((batch_size, 1), self.sep)
        seq = torch.cat([bos, s, sep, s], dim=1)                  # (B, 2n + 2)
        x = seq[:, :-1]                                           # the last letter is only ever a target
        y = torch.full_like(x, IGNORE)
        y[:, length + 1:] = s                                     # from `|` on, predict the next copied letter
        return x.to(device), y.to(device)


class MQAR:
    """Multi-query associative recall (Zoology's `multiquery_ar`): P key-value pairs, then the P keys again as
    queries in a stream of zeros; at each query, output its value. Keys come from [1, V/2), values from
    [V/2, V); query gaps follow a power law (power_a), so most queries come soon after the pairs.

    length = T, the sequence length; it must be at least 4P. n_pairs = P is a constructor option.

    Example (V=16, P=2, T=8): keys 3, 5 -> values 12, 9:
        3 12 5 9 5->9 0 3->12 0
    """

    def __init__(self, n_pairs=8, vocab_size=256, power_a=0.01):
        if n_pairs < 1 or n_pairs > vocab_size // 2 - 1:
            raise ValueError(f"mqar: n_pairs={n_pairs} needs 1 <= P <= vocab_size/2 - 1 = {vocab_size // 2 - 1} "
                             "distinct keys")
        self.n_pairs, self.vocab_size, self.power_a = n_pairs, vocab_size, power_a
        self.min_length = 4 * n_pairs
        self.names = [str(i) for i in range(vocab_size)]

    def sample(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, f"mqar with {self.n_pairs} pairs")
        g = _generator(seed)
        B, P, V = batch_size, self.n_pairs, self.vocab_size
        keys = torch.rand(B, V // 2 - 1, generator=g).argsort(dim=1)[:, :P] + 1       # distinct, in [1, V/2)
        values = torch.randint(V // 2, V, (B, P), generator=g)
        context = torch.stack([keys, values], dim=2).reshape(B, 2 * P)               # k1 v1 k2 v2 ...
        n_slots = (length - 2 * P) // 2                                             # query slots, even offsets
        gaps = torch.arange(1, n_slots + 1, dtype=torch.float64)
        weights = (gaps ** (self.power_a - 1)).expand(B, n_slots)
        slots = torch.multinomial(weights, P, replacement=False, generator=g)       # (B, P), distinct per row
        queries = torch.zeros(B, length - 2 * P, dtype=torch.long)
        targets = torch.full((B, length - 2 * P), IGNORE)
        queries.scatter_(1, 2 * slots, keys)                                        # query i asks for key i
        targets.scatter_(1, 2 * slots, values)
        x = torch.cat([context, queries], dim=1)
        y = torch.cat([torch.full((B, 2 * P), IGNORE), targets], dim=1)
        return x.to(device), y.to(device)


class FlipFlop:
    """Flip-flop language (Liu et al. 2023): pairs (instruction, bit) with instructions write / ignore / read.
    After `r`, the next bit is the bit of the last `w`; everything else is noise. p_ignore sets the sparsity:
    0.8 is the paper's training distribution, 0.98 its sparse test, 0.1 its dense test.

    length = T. The first instruction is always a write, so every read has an answer.

    Example (T=11):
        w 1 i 0 r->1 1 w 0 i 1 r->0
    """
    min_length = 4

    def __init__(self, p_ignore=0.8):
        if not 0 <= p_ignore < 1:
            raise ValueError(f"flipflop: p_ignore must be in [0, 1), got {p_ignore}")
        self.p_ignore = p_ignore
        self.w, self.i, self.r, self.zero = 0, 1, 2, 3
        self.vocab_size = 5
        self.names = ["w", "i", "r", "0", "1"]

    def sample(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, "flipflop")
        g = _generator(seed)
        n_pairs = length // 2 + 1                                 # enough pairs for T + 1 tokens
        p_rw = (1 - self.p_ignore) / 2
        u = torch.rand(batch_size, n_pairs, generator=g)
        instr = torch.where(u < p_rw, self.w, torch.where(u < 2 * p_rw, self.r, self.i))
        instr[:, 0] = self.w
        bits = torch.randint(0, 2, (batch_size, n_pairs), generator=g)
        # The bit of the last write so far: carry the index of the latest write forward with cummax.
        idx = torch.arange(n_pairs).expand(batch_size, n_pairs)
        last_write = torch.where(instr == self.w, idx, 0).cummax(dim=1).values
        bits = torch.where(instr == self.r, bits.gather(1, last_write), bits)
        seq = torch.stack([instr, bits + self.zero], dim=2).reshape(batch_size, 2 * n_pairs)[:, :length + 1]
        x, nxt = seq[:, :-1], seq[:, 1:]
        y = torch.where(x == self.r, nxt, IGNORE)                 # x[t] = r is always an instruction (even t)
        return x.contiguous().to(device), y.to(device)


class SelectiveCopy:
    """Selective copying (Mamba §4.1, `torch_copying_data` of state-spaces/s4): M data tokens scattered among
    noise, then M markers; at the i-th marker output the i-th data token.

    length = T = stream + M markers; the stream holds the M data tokens among T - 2M noise tokens.
    Token 0 is noise, 1..vocab_size-2 are data, vocab_size-1 is the marker.

    Example (M=3, T=10):
        . 4 . . 7 2 . #->4 #->7 #->2
    """

    def __init__(self, n_data=8, vocab_size=16):
        if n_data < 1 or vocab_size < 3:
            raise ValueError("selective_copy needs n_data >= 1 and vocab_size >= 3")
        self.n_data, self.vocab_size = n_data, vocab_size
        self.marker = vocab_size - 1
        self.min_length = 2 * n_data
        self.names = ["."] + [str(i) for i in range(1, vocab_size - 1)] + ["#"]

    def sample(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, f"selective_copy with {self.n_data} data tokens")
        g = _generator(seed)
        B, M = batch_size, self.n_data
        data = torch.randint(1, self.vocab_size - 1, (B, M), generator=g)
        where = torch.rand(B, length - M, generator=g).argsort(dim=1)[:, :M].sort(dim=1).values
        stream = torch.zeros(B, length - M, dtype=torch.long).scatter_(1, where, data)
        x = torch.cat([stream, torch.full((B, M), self.marker)], dim=1)
        y = torch.cat([torch.full((B, length - M), IGNORE), data], dim=1)
        return x.to(device), y.to(device)


class BabiLong:
    """A tiny BABILong: 3-token facts in a long stream of noise, then a question about the latest state.

    Facts: `P move L` (person P goes to place L), `P grab O`, `P drop O` (the object stays where P is).
    Persons move repeatedly, so the latest fact wins. Questions, asked after all facts:
      `? P =` where is person P (qa1: their last move);
      `? O =` where is object O (qa2: its holder's place now, or where it was dropped), a two-fact chain.
    The answer, one of the places, is scored at the `=` token. `sample_with_depth` also returns, per example,
    the relative depth in [0, 1) of the deciding fact (0 = the start of the stream), for accuracy by depth.

    length = T; facts per example are drawn from [min_facts, max_facts]; T must hold 3 * max_facts + 3.

    Example (T=20, noise shown as `.`):
        . P1 move L3 . P0 move L1 . P1 grab O2 P1 move L0 . . ? O2 =->L0
    """

    def __init__(self, n_persons=4, n_places=6, n_objects=4, n_noise=16, min_facts=2, max_facts=8):
        if not 1 <= min_facts <= max_facts:
            raise ValueError(f"babilong needs 1 <= min_facts <= max_facts, got {min_facts}, {max_facts}")
        self.min_facts, self.max_facts = min_facts, max_facts
        self.n_persons, self.n_places, self.n_objects = n_persons, n_places, n_objects
        self.names = ["."] * n_noise
        self.person = self._add([f"P{i}" for i in range(n_persons)])
        self.place = self._add([f"L{i}" for i in range(n_places)])
        self.object = self._add([f"O{i}" for i in range(n_objects)])
        self.move, self.grab, self.drop, self.question, self.answer = self._add(["move", "grab", "drop", "?", "="])
        self.vocab_size = len(self.names)
        self.n_noise = n_noise
        self.min_length = 3 * max_facts + 3

    def _add(self, names):
        first = len(self.names)
        self.names += names
        return range(first, first + len(names)) if len(names) > 1 else first

    def _story(self, k, g):
        """Simulate k facts; return the facts as token triples, the question entity, answer, deciding fact."""
        rand = partial(rand_int, g=g)
        where, last_move, holder, obj_at, obj_fact = {}, {}, {}, {}, {}
        facts = []
        for f in range(k):
            free = [o for o in range(self.n_objects) if o not in holder]
            held = list(holder)
            kind = rand(3) if where else 0                         # the first fact is always a move
            if kind == 1 and free:
                p, o = list(where)[rand(len(where))], free[rand(len(free))]
                holder[o], obj_fact[o] = p, f
                facts.append((self.person[p], self.grab, self.object[o]))
            elif kind == 2 and held:
                o = held[rand(len(held))]
                p = holder.pop(o)
                obj_at[o], obj_fact[o] = where[p], f
                facts.append((self.person[p], self.drop, self.object[o]))
            else:
                p, place = rand(self.n_persons), rand(self.n_places)
                where[p], last_move[p] = place, f
                facts.append((self.person[p], self.move, self.place[place]))
        if obj_fact and rand(2):                                  # qa2: where is an object
            o = list(obj_fact)[rand(len(obj_fact))]
            if o in holder:
                p = holder[o]
                return facts, self.object[o], self.place[where[p]], max(obj_fact[o], last_move[p])
            return facts, self.object[o], self.place[obj_at[o]], obj_fact[o]
        p = list(where)[rand(len(where))]                         # qa1: where is a person
        return facts, self.person[p], self.place[where[p]], last_move[p]

    def sample_with_depth(self, batch_size, length, seed=0, device="cpu"):
        _check(batch_size, length, self.min_length, f"babilong with up to {self.max_facts} facts")
        g = _generator(seed)
        x = torch.randint(0, self.n_noise, (batch_size, length), generator=g)
        y = torch.full((batch_size, length), IGNORE)
        depth = torch.zeros(batch_size)
        for b in range(batch_size):
            k = self.min_facts + rand_int(self.max_facts - self.min_facts + 1, g)
            facts, entity, answer, deciding = self._story(k, g)
            n_noise = length - 3 - 3 * k
            gaps = torch.randint(0, n_noise + 1, (k,), generator=g).sort().values  # noise before each fact
            starts = gaps + 3 * torch.arange(k)
            for s, fact in zip(starts.tolist(), facts):
                x[b, s:s + 3] = torch.tensor(fact)
            x[b, -3:] = torch.tensor([self.question, entity, self.answer])
            y[b, -1] = answer
            depth[b] = starts[deciding] / length
        return x.to(device), y.to(device), depth.to(device)

    def sample(self, batch_size, length, seed=0, device="cpu"):
        x, y, _ = self.sample_with_depth(batch_size, length, seed, device)
        return x, y


TASKS = {
    "copy": Copy,
    "mqar": MQAR,
    "flipflop": FlipFlop,
    "flipflop_sparse": partial(FlipFlop, p_ignore=0.98),
    "selective_copy": SelectiveCopy,
    "babilong": BabiLong,
}


if __name__ == "__main__":
    examples = {"copy": 5, "mqar": 40, "flipflop": 24, "flipflop_sparse": 24, "selective_copy": 20,
                "babilong": 40}
    for name, make in TASKS.items():
        task = make()
        x, y = task.sample(1, examples[name], seed=0)
        print(f"{name} (vocab {task.vocab_size}, length {examples[name]}):\n    {render(task, x, y)}")
