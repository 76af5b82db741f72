"""DistributedDataParallel over 2 CPU processes (gloo, 127.0.0.1 only): the averaged gradients
equal one process on the whole batch, training stays identical to single-process training,
and the GRU's parameters are the same objects from construction to the last step. FSDP2
(fully_shard) in the same processes: sharded parameters, the same gradients and updates."""

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
STEPS = 3

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E, dtype=torch.float64)
        self.gru = varlen_rnn.GRU(
            E, H, num_layers=2, batch_first=True, bidirectional=True, dtype=torch.float64
        )
        self.fc = nn.Linear(2 * H, C, dtype=torch.float64)

    def forward(self, tokens, lengths):
        out, h_n = self.gru(self.emb(tokens), lengths=lengths)
        return self.fc(torch.cat([h_n[-2], h_n[-1]], 1)) + out.sum(1)[:, :C]


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([7, 0, 3, 5, 1, 7, 2, 6]).roll(step)  # unsorted, with an empty row
    labels = torch.randint(0, C, (B,), generator=g)
    return tokens, lengths, labels


def _loss(model, tokens, lengths, labels):
    return nn.functional.cross_entropy(model(tokens, lengths), labels)  # mean over rows


def _worker(rank, port, errors):
    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
        )
        _check_ddp(rank)
        _check_fsdp2(rank)
        dist.barrier()
    except BaseException as e:  # reported by the parent with the rank that failed
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_ddp(rank):
    torch.manual_seed(rank)  # different on purpose: DDP broadcasts rank 0's parameters
    model = Model()
    single = None
    if rank == 0:
        single = copy.deepcopy(model)
    params_before = list(model.parameters())
    gru_params_before = {n: p for n, p in model.gru.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
    if rank == 0:
        single_opt = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    rows = slice(rank * (B // WORLD), (rank + 1) * (B // WORLD))
    for step in range(STEPS):
        tokens, lengths, labels = _data(step)
        opt.zero_grad()
        _loss(ddp, tokens[rows], lengths[rows], labels[rows]).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        gathered = [[torch.empty_like(g) for g in grads] for _ in range(WORLD)]
        for i, g in enumerate(grads):  # every rank holds the same averaged gradient
            dist.all_gather([gathered[r][i] for r in range(WORLD)], g)
        for r in range(1, WORLD):
            for a, b in zip(gathered[0], gathered[r]):
                assert torch.equal(a, b), "ranks disagree on the averaged gradient"
        if rank == 0:
            single_opt.zero_grad()
            _loss(single, tokens, lengths, labels).backward()
            for (name, p), g in zip(single.named_parameters(), grads):
                torch.testing.assert_close(
                    g,
                    p.grad,
                    atol=1e-12,
                    rtol=1e-10,
                    msg=lambda m: f"step {step}, grad of {name}: {m}",
                )
            single_opt.step()
        opt.step()
    assert all(p is q for p, q in zip(model.parameters(), params_before))
    assert all(getattr(model.gru, n) is p for n, p in gru_params_before.items())
    assert all(a is b for a, b in zip(model.gru._flat_weights, gru_params_before.values()))
    if rank == 0:
        for (name, p), q in zip(single.named_parameters(), model.parameters()):
            torch.testing.assert_close(
                q, p, atol=1e-12, rtol=1e-10, msg=lambda m: f"after {STEPS} steps, {name}: {m}"
            )


def _check_fsdp2(rank):
    """fully_shard swaps the GRU's parameters for DTensor shards and back for each forward;
    the module looks its weights up by name on every call, so it sees whichever is current."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Model()
    single = copy.deepcopy(model)
    fully_shard(model.gru)
    fully_shard(model)
    assert type(model.gru.weight_ih_l0).__name__ == "DTensor"
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    rows = slice(rank * (B // WORLD), (rank + 1) * (B // WORLD))
    for step in range(STEPS):
        tokens, lengths, labels = _data(step)
        opt.zero_grad()
        _loss(model, tokens[rows], lengths[rows], labels[rows]).backward()
        single_opt.zero_grad()
        _loss(single, tokens, lengths, labels).backward()
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            torch.testing.assert_close(
                p.grad.full_tensor(),
                q.grad,
                atol=1e-12,
                rtol=1e-10,
                msg=lambda m: f"FSDP2 step {step}, grad of {name}: {m}",
            )
        opt.step()
        single_opt.step()
    for (name, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(
            p.full_tensor(),
            q,
            atol=1e-12,
            rtol=1e-10,
            msg=lambda m: f"FSDP2 after {STEPS} steps, {name}: {m}",
        )


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_match_single_process_and_parameters_are_kept():
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
