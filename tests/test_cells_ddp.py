"""DistributedDataParallel and FSDP2 (fully_shard) over 2 CPU processes (gloo, 127.0.0.1 only)
with a model holding a varlen_rnn.LSTM (with a projection) and a varlen_rnn.RNN: the averaged
gradients and the updates equal one process on the whole batch (tests/test_ddp.py is the
GRU's)."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import varlen_rnn

WORLD = 2
B, T, VOCAB, E, H, C = 8, 7, 30, 5, 6, 3  # B splits evenly: each rank gets B // WORLD rows
STEPS = 2

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        f64 = dict(dtype=torch.float64)
        self.emb = nn.Embedding(VOCAB, E, **f64)
        self.lstm = varlen_rnn.LSTM(
            E, H, 2, batch_first=True, bidirectional=True, proj_size=4, **f64
        )
        self.rnn = varlen_rnn.RNN(8, H, nonlinearity="relu", batch_first=True, **f64)
        self.fc = nn.Linear(H, C, **f64)

    def forward(self, tokens, lengths):
        out, (h_n, c_n) = self.lstm(self.emb(tokens), lengths=lengths)
        _, h = self.rnn(out, lengths=lengths)
        return self.fc(h[-1] + c_n[-1])


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([7, 0, 3, 5, 1, 7, 2, 6]).roll(step)  # unsorted, with an empty row
    return tokens, lengths, torch.randint(0, C, (B,), generator=g)


def _loss(model, tokens, lengths, labels):
    return nn.functional.cross_entropy(model(tokens, lengths), labels)


def _train(rank, wrap, grad_of):
    """STEPS steps of the wrapped model on this rank's rows against one process on all of
    them: the same gradients (grad_of(p) reads a possibly sharded gradient) and weights."""
    torch.manual_seed(0)
    model = Model()
    single = copy.deepcopy(model)
    wrapped = wrap(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    rows = slice(rank * (B // WORLD), (rank + 1) * (B // WORLD))
    for step in range(STEPS):
        tokens, lengths, labels = _data(step)
        opt.zero_grad()
        _loss(wrapped, tokens[rows], lengths[rows], labels[rows]).backward()
        single_opt.zero_grad()
        _loss(single, tokens, lengths, labels).backward()
        for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
            torch.testing.assert_close(
                grad_of(p), q.grad, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}"
            )
        opt.step()
        single_opt.step()


def _worker(rank, port, errors):
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        _train(rank, nn.parallel.DistributedDataParallel, lambda p: p.grad)
        from torch.distributed.fsdp import fully_shard

        def shard(model):
            fully_shard(model.lstm)
            fully_shard(model.rnn)
            return fully_shard(model)

        _train(rank, shard, lambda p: p.grad.full_tensor())
        dist.barrier()
    except BaseException as e:  # reported by the parent with the rank that failed
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_match_single_process():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(_free_port(), errors), nprocs=WORLD, join=True, start_method="spawn"
        )
    except Exception as e:
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        pytest.fail("\n".join(msgs) or str(e))
