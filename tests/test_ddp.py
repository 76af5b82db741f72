"""DistributedDataParallel and FSDP2 (fully_shard) over 2 CPU processes (gloo, 127.0.0.1 only),
for a model holding a varlen_rnn.GRU and one holding a varlen_rnn.LSTM (with a projection) and a
varlen_rnn.RNN: the averaged gradients equal one process on the whole batch, training stays
identical to single-process training, and the GRU's parameters are the same objects from
construction to the last step."""

import copy
import faulthandler
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import varlen_rnn

WORLD = 2
B, T, VOCAB, E, H, C = 8, 7, 30, 5, 6, 3  # B splits evenly: each rank gets B // WORLD rows
STEPS = 3
ROWS = [slice(r * (B // WORLD), (r + 1) * (B // WORLD)) for r in range(WORLD)]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
F64 = dict(dtype=torch.float64)


class GruModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E, **F64)
        self.gru = varlen_rnn.GRU(E, H, num_layers=2, batch_first=True, bidirectional=True, **F64)
        self.fc = nn.Linear(2 * H, C, **F64)

    def forward(self, tokens, lengths):
        out, h_n = self.gru(self.emb(tokens), lengths=lengths)
        return self.fc(torch.cat([h_n[-2], h_n[-1]], 1)) + out.sum(1)[:, :C]

    def recurrent(self):
        return [self.gru]


class CellsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E, **F64)
        self.lstm = varlen_rnn.LSTM(
            E, H, 2, batch_first=True, bidirectional=True, proj_size=4, **F64
        )
        self.rnn = varlen_rnn.RNN(8, H, nonlinearity="relu", batch_first=True, **F64)
        self.fc = nn.Linear(H, C, **F64)

    def forward(self, tokens, lengths):
        out, (h_n, c_n) = self.lstm(self.emb(tokens), lengths=lengths)
        _, h = self.rnn(out, lengths=lengths)
        return self.fc(h[-1] + c_n[-1])

    def recurrent(self):
        return [self.lstm, self.rnn]


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([7, 0, 3, 5, 1, 7, 2, 6]).roll(step)  # unsorted, with an empty row
    labels = torch.randint(0, C, (B,), generator=g)
    return tokens, lengths, labels


def _loss(model, tokens, lengths, labels):
    return nn.functional.cross_entropy(model(tokens, lengths), labels)  # mean over rows


def _close(actual, expected, what):
    torch.testing.assert_close(
        actual, expected, atol=1e-12, rtol=1e-10, msg=lambda m: f"{what}: {m}"
    )


def _check_ddp_gru(rank):
    """DDP broadcasts rank 0's parameters (the ranks start from different seeds on purpose);
    every rank then holds the same averaged gradient, equal to one process's on all rows, and
    the GRU keeps its parameter objects throughout."""
    torch.manual_seed(rank)
    model = GruModel()
    single = copy.deepcopy(model) if rank == 0 else None
    params_before = list(model.parameters())
    gru_params_before = dict(model.gru.named_parameters())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9) if single else None
    for step in range(STEPS):
        tokens, lengths, labels = _data(step)
        opt.zero_grad()
        _loss(ddp, tokens[ROWS[rank]], lengths[ROWS[rank]], labels[ROWS[rank]]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        gathered = [[torch.empty_like(g) for g in grads] for _ in range(WORLD)]
        for i, g in enumerate(grads):  # every rank holds the same averaged gradient
            dist.all_gather([gathered[r][i] for r in range(WORLD)], g)
        for r in range(1, WORLD):
            for a, b in zip(gathered[0], gathered[r]):
                assert torch.equal(a, b), "ranks disagree on the averaged gradient"
        if single is not None:
            single_opt.zero_grad()
            _loss(single, tokens, lengths, labels).backward()
            for (name, p), g in zip(single.named_parameters(), grads):
                _close(g, p.grad, f"step {step}, grad of {name}")
            single_opt.step()
        opt.step()
    assert all(p is q for p, q in zip(model.parameters(), params_before))
    assert all(getattr(model.gru, n) is p for n, p in gru_params_before.items())
    assert all(a is b for a, b in zip(model.gru._flat_weights, gru_params_before.values()))
    if single is not None:
        for (name, p), q in zip(single.named_parameters(), model.parameters()):
            _close(q, p, f"after {STEPS} steps, {name}")


def _ddp(model):
    return nn.parallel.DistributedDataParallel(model)


def _fsdp2(model):
    """fully_shard swaps the modules' parameters for DTensor shards and back for each forward;
    the modules look their weights up by name on every call, so they see whichever is current."""
    from torch.distributed.fsdp import fully_shard

    for m in model.recurrent():
        fully_shard(m)
        assert type(next(m.parameters())).__name__ == "DTensor"
    return fully_shard(model)


def _full(t):
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _check_against_single(rank, model_cls, wrap):
    """STEPS steps of the wrapped model on this rank's rows against one process on all of
    them: the same gradients and the same weights after every step."""
    torch.manual_seed(0)
    model = model_cls()
    single = copy.deepcopy(model)
    wrapped = wrap(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    for step in range(STEPS):
        tokens, lengths, labels = _data(step)
        opt.zero_grad()
        _loss(wrapped, tokens[ROWS[rank]], lengths[ROWS[rank]], labels[ROWS[rank]]).backward()
        single_opt.zero_grad()
        _loss(single, tokens, lengths, labels).backward()
        for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
            _close(_full(p.grad), q.grad, f"{wrap.__name__} step {step}, grad of {name}")
        opt.step()
        single_opt.step()
    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        _close(_full(p), q, f"{wrap.__name__} after {STEPS} steps, {name}")


def _worker(rank, port, errors, which):
    faulthandler.enable(all_threads=True)  # a crash prints every thread's Python stack
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        if which == "gru":
            _check_ddp_gru(rank)
            _check_against_single(rank, GruModel, _fsdp2)
        else:
            _check_against_single(rank, CellsModel, _ddp)
            _check_against_single(rank, CellsModel, _fsdp2)
        dist.barrier()
    except BaseException as e:  # reported by the parent with the rank that failed
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every check has passed. Leave without the interpreter's finalization: destroy_process_group
    # does not stop gloo's worker threads while Python objects (DDP, FSDP2's device mesh) still
    # hold the process group, and a thread that drops the last reference to a finished
    # collective's tensors then needs the GIL while the main thread finalizes the interpreter:
    # Python ends that thread by unwinding it through a noexcept destructor, and the rank dies
    # of "terminate called without an active exception" (SIGABRT) after its checks passed. A core
    # of it showed ~AsyncBarrierWork -> ~AsyncAllgatherCoalescedWork -> decref_pyobject ->
    # take_gil -> pthread_exit on the thread of ProcessGroupGloo::runLoop, the main thread in
    # Py_FinalizeEx. It hit about one run in three of the whole suite.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("which", ["gru", "lstm_and_rnn"])
def test_ddp_and_fsdp2_match_single_process(which):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _worker,
            args=(_free_port(), errors, which),
            nprocs=WORLD,
            join=True,
            start_method="spawn",
        )
    except Exception as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or str(e))
