"""What bench_grad_mask.py and bench_double_backward.py share: their command line, their cases
(a torch.nn module and its varlen_rnn twin from the same weights, a padded float32 batch with
lengths uniform in [1, T], the longest T) and the forward each step starts with (nn through
pack_padded_sequence / pad_packed_sequence, ours with lengths=)."""

from __future__ import annotations

import argparse
import os

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import varlen_rnn

QUICK = [("GRU", 3, 4, 2, 5), ("LSTM", 3, 4, 2, 5)]  # (cell, B, T, I, H): a smoke test's


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, a smoke test")
    return p


def cases(shapes):
    """(label, nn module, varlen_rnn twin, x [T, B, I], lengths [B]) per (cell, B, T, I, H)."""
    for cell, B, T, I, H in shapes:
        torch.manual_seed(0)
        ref = getattr(torch.nn, cell)(I, H)
        ours = getattr(varlen_rnn, cell).from_torch(ref)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, B, I, generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        yield f"{cell} B={B} T={T} I={I} H={H}", ref, ours, x, lengths


def padded_output(module, x, lengths, packed: bool):
    """[T, B, D*H], zero past each length: nn through packing (packed) or ours with lengths."""
    if packed:
        p = pack_padded_sequence(x, lengths, enforce_sorted=False)
        return pad_packed_sequence(module(p)[0], total_length=x.shape[0])[0]
    return module(x, lengths=lengths)[0]
