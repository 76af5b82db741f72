"""What the benchmark times: cases, inputs, and the competitors as step functions.

Shape legend: T time steps, B batch, I input features, H hidden, D directions, G gates.
A case names its cell (gru, lstm, or rnn: tanh); every competitor of one case shares the same
weights (varlen_rnn.GRU/LSTM/RNN loads nn.GRU/LSTM/RNN's state_dict) and the same inputs, drawn
fresh from a seeded generator (random, never zeros).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

# Competitor keys in display order; the first is the baseline every speedup is measured against.
COMPETITORS = ("baseline", "padded", "varlen", "varlen_packed")
# Ragged competitors take their input as stored (no padded batch) and return rows [N, D*H].
RAGGED = ("varlen_packseq", "varlen_nested")
# X is the case's cell: GRU, LSTM or RNN.
LABELS = {
    "baseline": "nn.X + pack/pad (baseline)",
    "padded": "nn.X padded, no lengths (wrong results)",
    "varlen": "varlen_rnn.X(x, lengths=)",
    "varlen_host": "varlen_rnn.X(x, lengths=) with the lengths on the CPU (on CUDA a training "
    "call then runs on the valid rows only)",
    "varlen_packed": "varlen_rnn.X(PackedSequence), packed from and padded back to x",
    "varlen_packseq": "varlen_rnn.X(PackedSequence) -> PackedSequence",
    "varlen_nested": "varlen_rnn.X(jagged nested tensor)",
}
# A case's cell: the torch.nn / varlen_rnn class name and the gate blocks G of its weights.
CELLS = {"gru": ("GRU", 3), "lstm": ("LSTM", 4), "rnn": ("RNN", 1)}
MODES = ("infer", "train")
DISTRIBUTIONS = ("uniform", "full", "skewed", "one_long")


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    dist: str = "uniform"
    dtype: str = "float32"
    device: str = "cpu"
    modes: tuple = MODES
    competitors: tuple = COMPETITORS
    cell: str = "gru"

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def name(self) -> str:
        s = f"B={self.B} T={self.T} I={self.I} H={self.H} L={self.layers}"
        if self.bidirectional:
            s += " bi"
        s = f"{s} {self.dist} {self.dtype}"
        return s if self.cell == "gru" else f"{CELLS[self.cell][0]} {s}"

    def asdict(self) -> dict:
        d = dataclasses.asdict(self)
        d["modes"] = list(self.modes)
        d["competitors"] = list(self.competitors)
        return d

    @staticmethod
    def fromdict(d: dict) -> Case:
        d = dict(d)
        d["modes"] = tuple(d.get("modes", MODES))
        d["competitors"] = tuple(d.get("competitors", COMPETITORS))
        return Case(**d)


def add_case_arguments(parser) -> None:
    """One case's command-line options (--B --T --I --H --layers --bi --cell --dist --dtype
    --threads), for the single-case tools (bench_profile.py, bench_perf.py);
    case_from_arguments reads them."""
    for name, default in (("B", 64), ("T", 100), ("I", 256), ("H", 256), ("layers", 1)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--bi", action="store_true", help="bidirectional")
    parser.add_argument("--cell", default="gru", choices=sorted(CELLS))
    parser.add_argument("--dist", default="uniform")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    parser.add_argument("--threads", type=int, default=2)


def case_from_arguments(a, device: str = "cpu") -> Case:
    """The Case of add_case_arguments' options; sets torch's thread count from --threads."""
    torch.set_num_threads(a.threads)
    return Case(
        B=a.B,
        T=a.T,
        I=a.I,
        H=a.H,
        layers=a.layers,
        bidirectional=a.bi,
        dist=a.dist,
        dtype=a.dtype,
        cell=a.cell,
        device=device,
    )


def make_lengths(dist: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Lengths in caller order (never sorted): uniform in [1, T], all T, skewed (most short, a few long),
    or one_long (one sequence of T, the rest T/50)."""
    if dist == "uniform":
        return torch.randint(1, T + 1, (B,), generator=gen)
    if dist == "full":
        return torch.full((B,), T, dtype=torch.int64)
    if dist == "skewed":
        # ~90% of rows in [1, T/10], ~10% in [T/2, T], and one row at exactly T so the batch is T long.
        short = torch.randint(1, max(1, T // 10) + 1, (B,), generator=gen)
        n_long = max(1, round(0.1 * B))
        long_ = torch.randint(max(1, T // 2), T + 1, (n_long,), generator=gen)
        long_[0] = T
        where = torch.randperm(B, generator=gen)[:n_long]
        short[where] = long_
        return short
    if dist == "one_long":  # issue 10's skewed batch: one sequence of T, every other of T/50
        lengths = torch.full((B,), max(1, T // 50), dtype=torch.int64)
        lengths[torch.randint(0, B, (1,), generator=gen)] = T
        return lengths
    raise ValueError(f"unknown length distribution {dist!r}; expected one of {DISTRIBUTIONS}")


def layer_flops(case: Case, lengths: torch.Tensor) -> float:
    """Forward FLOPs spent on valid tokens: per token, layer and direction, 2 * G*H * (I_layer + H)
    (the input and recurrent GEMMs; the gate pointwise math is a rounding error next to them)."""
    tokens = int(lengths.sum())
    G = CELLS[case.cell][1]
    per_token = 0
    for layer in range(case.layers):
        i = case.I if layer == 0 else case.D * case.H
        per_token += case.D * 2 * G * case.H * (i + case.H)
    return float(tokens * per_token)


def train_flops(case: Case, lengths: torch.Tensor) -> float:
    # Convention: backward costs twice the forward (grad wrt inputs and wrt weights).
    return 3.0 * layer_flops(case, lengths)


class Bench:
    """One case, built once: models with identical weights, inputs, and a step function per
    (mode, competitor). Step functions return nothing, so timing measures the work only."""

    def __init__(self, case: Case, seed: int = 0):
        import varlen_rnn  # imported late so `bench.py --help` works before the package is built

        self.case = case
        dev = torch.device(case.device)
        dtype = getattr(torch, case.dtype)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        name = CELLS[case.cell][0]
        self.ref = getattr(nn, name)(
            case.I, case.H, case.layers, bidirectional=case.bidirectional
        ).to(dev, dtype)
        self.var = getattr(varlen_rnn, name).from_torch(self.ref)
        self.lengths = make_lengths(case.dist, case.B, case.T, gen)  # [B] int64, CPU
        self.lengths_dev = self.lengths.to(dev)  # [B] on device: no host sync
        self.x = torch.randn(case.T, case.B, case.I, generator=gen).to(dev, dtype)  # [T, B, I]
        # Random weights for the scalar loss, so gradients are not all ones.
        self.w_out = torch.randn(case.T, case.B, case.D * case.H, generator=gen).to(dev, dtype)
        n_states = 2 if case.cell == "lstm" else 1  # h_n, and the LSTM's c_n
        self.w_h = [
            torch.randn(case.layers * case.D, case.B, case.H, generator=gen).to(dev, dtype)
            for _ in range(n_states)
        ]
        self.x_train = self.x.detach().clone().requires_grad_(True)
        self._ragged_inputs(dev)

    def _ragged_inputs(self, dev):
        """The same valid positions stored ragged: a PackedSequence and a jagged nested tensor's
        values [N, I] (sequence-major), with their leaves for training and the loss weights of
        w_out at the same rows."""
        lengths = self.lengths.tolist()
        t = torch.cat([torch.arange(L) for L in lengths])  # [N]
        b = torch.cat([torch.full((L,), i) for i, L in enumerate(lengths)])  # [N]
        self.nested_rows = (t.to(dev), b.to(dev))
        self.offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=dev)
        self.max_len = max(lengths)
        values = self.x[self.nested_rows].contiguous()  # [N, I]
        self.packed = pack_padded_sequence(self.x, self.lengths, enforce_sorted=False)
        self.leaf = {
            "varlen_packseq": self.packed.data.detach().clone().requires_grad_(True),
            "varlen_nested": values.requires_grad_(True),
        }
        self.w_rows = {
            "varlen_packseq": self.rows("varlen_packseq", self.w_out),
            "varlen_nested": self.rows("varlen_nested", self.w_out),
        }

    def rows(self, name: str, padded: torch.Tensor) -> torch.Tensor:
        """padded [T, B, F] at the valid positions, in competitor name's row order: [N, F]."""
        if name == "varlen_packseq":
            return pack_padded_sequence(padded, self.lengths, enforce_sorted=False).data
        return padded[self.nested_rows]

    def input_bytes(self, name: str) -> int:
        """What the competitor's input holds: the padded batch, or only the valid rows."""
        x = self.leaf[name] if name in RAGGED else self.x
        return x.numel() * x.element_size()

    def ragged_input(self, name: str, data: torch.Tensor):
        if name == "varlen_packseq":
            p = self.packed
            return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        return torch.nested.nested_tensor_from_jagged(data, self.offsets, max_seqlen=self.max_len)

    # -- forward of each competitor: (out [T, B, D*H], states: (h_n [L*D, B, H],) or the LSTM's
    # (h_n, c_n)) ---------------------------------------------------------------------------------
    def _packed(self, rnn, x):
        packed = pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        out, state = rnn(packed)  # with enforce_sorted=False, states come back in caller order
        out, _ = pad_packed_sequence(out, total_length=self.case.T)
        return out, state

    def forward(self, name: str, x: torch.Tensor):
        out, state = self._forward(name, x)
        return out, state if isinstance(state, tuple) else (state,)

    def _forward(self, name: str, x: torch.Tensor):
        if name == "baseline":
            return self._packed(self.ref, x)
        if name == "padded":
            return self.ref(x)
        if name == "varlen":
            return self.var(x, lengths=self.lengths_dev)
        if name == "varlen_host":
            return self.var(x, lengths=self.lengths)
        if name == "varlen_packed":
            return self._packed(self.var, x)
        if name in RAGGED:  # x: a PackedSequence or a nested tensor; returns rows [N, D*H]
            out, state = self.var(x)
            return (out.data if name == "varlen_packseq" else out.values()), state
        raise ValueError(f"unknown competitor {name!r}; expected one of {tuple(LABELS)}")

    def step(self, mode: str, name: str):
        gru = self.ref if name in ("baseline", "padded") else self.var
        params = list(gru.parameters())
        if mode == "infer":
            # Built outside inference_mode: torch.nested cannot view a normal tensor inside it.
            x_in = self.ragged_input(name, self.leaf[name].detach()) if name in RAGGED else self.x

            def infer_step():
                with torch.inference_mode():
                    self.forward(name, x_in)

            return infer_step
        if mode == "train":
            x = self.leaf[name] if name in RAGGED else self.x_train
            w_out = self.w_rows[name] if name in RAGGED else self.w_out

            def clear_grads():
                for p in params:
                    p.grad = None
                x.grad = None

            def train_step():
                clear_grads()
                out, states = self.forward(
                    name, self.ragged_input(name, x) if name in RAGGED else x
                )
                loss = (out * w_out).sum() + sum((s * w).sum() for s, w in zip(states, self.w_h))
                loss.backward()

            train_step.reset = clear_grads
            return train_step
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    def max_abs_diff(self, name: str) -> float:
        """Largest |output - baseline| over out and the states (padding positions included; for a
        ragged competitor, the valid positions it returns)."""
        x_in = self.ragged_input(name, self.leaf[name].detach()) if name in RAGGED else None
        with torch.inference_mode():
            ro, rh = self.forward("baseline", self.x)
            if name in RAGGED:
                o, h = self.forward(name, x_in)
                ro = self.rows(name, ro)
            else:
                o, h = self.forward(name, self.x)
            diffs = [(o - ro).abs().max().item()]
            diffs += [(a - b).abs().max().item() for a, b in zip(h, rh, strict=True)]
            return max(diffs)
