"""The classic variable-length classifier, trained twice: python examples/demo.py

Embedding(padding_idx=0) -> GRU -> each sequence's last state -> Linear, trained from the same
initial weights on the same batches in the same order:

  * torch.nn.GRU with the usual recipe: sort the batch by length, re-order the labels to match,
    pack_padded_sequence, run, pad_packed_sequence, gather out[i, length_i - 1];
  * varlen_rnn.GRU (the same model after varlen_rnn.convert): gru(x, lengths=lengths), read h_n.
    No sorting, no packing, labels stay where they are.

Both runs see identical arithmetic up to float rounding, so their loss curves agree; the
difference is the time. One character per token. The data (--data):

  wordfreq   the default when the wordfreq package is installed (scripts/setup.sh installs it):
             tell a word's language from its letters, as PyTorch's character-level name
             classification tutorial does. --words words of each of --languages, drawn (seeded)
             from the word-frequency lists that ship inside the package: nothing is downloaded.
             Without the package the default is `synthetic`, with a one-line note.
  synthetic  generated texts in four made-up "languages" (each favours a few letters), lengths
             from 4 to --max-len: long sequences, where fusing the recurrence pays most.
  FILE       your own `label<TAB>text` lines.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.metadata
import math
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# demo_data: the file beside this one (a script's own folder comes first on sys.path)
from demo_data import (
    LANGUAGES,
    DataFormatError,
    Dataset,
    batches,
    encode,
    generate_data,
    have_wordfreq,
    read_data,
    wordfreq_words,
)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import varlen_rnn


# --------------------------------------------------------------------------------------- model
class Classifier(nn.Module):
    def __init__(self, vocab: int, classes: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, embed, padding_idx=0)
        self.rnn = nn.GRU(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)


def logits_packed(model: Classifier, tokens, lengths, labels):
    """The classic recipe (torch.nn.GRU): returns logits and the labels in the same, sorted order."""
    lengths, order = lengths.sort(descending=True)
    tokens, labels = tokens[order], labels[order]  # the labels must follow the sort
    packed = pack_padded_sequence(model.embed(tokens), lengths, batch_first=True)
    out, _ = model.rnn(packed)
    out, _ = pad_packed_sequence(out, batch_first=True)
    last = out[torch.arange(len(lengths)), lengths - 1]  # each sequence's last valid output
    return model.head(last), labels


def logits_varlen(model: Classifier, tokens, lengths, labels):
    """varlen_rnn.GRU: padded batch + lengths in, each sequence's last state is h_n."""
    _, h_n = model.rnn(model.embed(tokens), lengths=lengths)
    return model.head(h_n[-1]), labels


RECIPES = {"nn.GRU + sort/pack": logits_packed, "varlen_rnn.GRU": logits_varlen}


# ------------------------------------------------------------------------------------ training
@dataclass
class Config:
    epochs: int = 3
    batch_size: int = 64
    embed: int = 32
    hidden: int = 128
    layers: int = 1
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(model, recipe, ds: Dataset, indices, cfg: Config) -> float:
    dev = torch.device(cfg.device)
    correct = 0
    with torch.inference_mode():
        for tokens, lengths, labels in batches(ds, indices, 256):
            logits, labels = recipe(model, tokens.to(dev), lengths.to(dev), labels.to(dev))
            correct += int((logits.argmax(1) == labels).sum())
    return correct / max(1, len(indices))


def train_both(
    ds: Dataset, train_idx: list[int], test_idx: list[int], cfg: Config, progress=None
) -> dict:
    """Trains both recipes from one initialisation on the same batches, one batch of each in turn
    (so a busy machine slows both alike). Returns per-step losses, times, accuracies."""
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    base = Classifier(len(ds.vocab), len(ds.classes), cfg.embed, cfg.hidden, cfg.layers).to(
        dev, cfg.dtype
    )
    models = {"nn.GRU + sort/pack": base, "varlen_rnn.GRU": varlen_rnn.convert(copy.deepcopy(base))}
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr) for k, m in models.items()}
    losses = {k: [] for k in models}
    seconds = {k: 0.0 for k in models}
    n_batches = math.ceil(len(train_idx) / cfg.batch_size)
    order_gen = torch.Generator().manual_seed(cfg.seed + 1)
    for epoch in range(cfg.epochs):
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=order_gen).tolist()]
        for b, (tokens, lengths, labels) in enumerate(batches(ds, order, cfg.batch_size)):
            # lengths stay on the CPU for pack_padded_sequence; varlen_rnn takes them on either device.
            tokens, labels = tokens.to(dev), labels.to(dev)
            for name, model in models.items():
                _sync(dev)
                t0 = time.perf_counter()
                logits, y = RECIPES[name](model, tokens, lengths, labels)
                loss = F.cross_entropy(logits, y)
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                # Clipping keeps training smooth; without it a spike on a long batch amplifies float
                # rounding (~1e-7) until the two runs part ways, in float64 as in float32.
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                opts[name].step()
                _sync(dev)
                seconds[name] += time.perf_counter() - t0
                losses[name].append(loss.item())
            if progress:
                progress(epoch, b + 1, n_batches, {k: v[-1] for k, v in losses.items()})
    acc = {k: accuracy(m, RECIPES[k], ds, test_idx, cfg) for k, m in models.items()}
    majority = max(collections.Counter(ds.labels[test_idx].tolist()).values()) / max(
        1, len(test_idx)
    )
    return {
        "losses": losses,
        "seconds": seconds,
        "accuracy": acc,
        "majority": majority,
        "batches_per_epoch": n_batches,
    }


# ------------------------------------------------------------------------------------- output
def progress_bar(epochs: int):
    tty = sys.stderr.isatty()

    def show(epoch, b, n, last):
        if not tty and b < n:  # a log file gets one line per epoch, not a carriage-return stream
            return
        done = (epoch * n + b) / (epochs * n)
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        losses = "  ".join(f"{k}: {v:.4f}" for k, v in last.items())
        print(
            f"{chr(13) if tty else ''}  epoch {epoch + 1}/{epochs} [{bar}] {100 * done:3.0f}%  loss  {losses}  ",
            end="\n" if b == n and (done >= 1 or not tty) else "",
            file=sys.stderr,
            flush=True,
        )

    return show


def report(res: dict, cfg: Config, n_train: int, n_test: int) -> str:
    a, b = list(res["losses"])
    la, lb = res["losses"][a], res["losses"][b]
    n = res["batches_per_epoch"]
    lines = [
        "",
        "Loss (mean over each epoch, and the last batch), side by side:",
        f"  {'epoch':>5}  {a:>20}  {b:>20}  {'|difference|':>12}",
    ]
    for e in range(cfg.epochs):
        ma, mb = sum(la[e * n : (e + 1) * n]) / n, sum(lb[e * n : (e + 1) * n]) / n
        lines.append(f"  {e + 1:>5}  {ma:>20.6f}  {mb:>20.6f}  {abs(ma - mb):>12.2e}")
    lines.append(f"  {'last':>5}  {la[-1]:>20.6f}  {lb[-1]:>20.6f}  {abs(la[-1] - lb[-1]):>12.2e}")
    worst = max(abs(x - y) for x, y in zip(la, lb))
    agree = worst <= 1e-3 * max(1.0, max(la))
    lines.append(
        f"  max |difference| over all {len(la)} steps: {worst:.2e} "
        f"({'the curves agree' if agree else 'the curves part ways'})"
    )
    if not agree:
        lines.append(
            "  (both runs compute the same function; training can amplify float rounding of ~1e-7 "
            "into different trajectories: rerun with --dtype float64 to see them agree)"
        )
    lines += [
        "",
        f"Test accuracy ({n_test} held-out sequences, {n_train} trained on):",
        (
            f"  {a}: {100 * res['accuracy'][a]:.1f}%    {b}: {100 * res['accuracy'][b]:.1f}%    "
            f"(always naming the most common class: {100 * res['majority']:.1f}%)"
        ),
        "",
        "Training time (forward + backward + optimizer step, summed over all batches):",
        (
            f"  {a}: {res['seconds'][a]:.2f} s    {b}: {res['seconds'][b]:.2f} s    "
            f"speedup {res['seconds'][a] / res['seconds'][b]:.2f}x"
        ),
    ]
    return "\n".join(lines)


def load(args) -> tuple[list[tuple[str, str]], str]:
    """The (label, text) pairs that --data names, and a few words saying where they came from."""
    if args.data == "wordfreq":
        langs = args.languages.split(",")
        return (
            wordfreq_words(langs, args.words, args.seed),
            f"wordfreq {importlib.metadata.version('wordfreq')} word lists, {args.words} words each of {','.join(langs)}",
        )
    if args.data == "synthetic":
        return generate_data(args.samples, args.max_len, args.seed), "generated"
    return read_data(args.data), f"from {args.data}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="{wordfreq,synthetic,FILE}",
        help="the data, see above; FILE holds 'label<TAB>text' lines (default: wordfreq when "
        "the package is installed, else synthetic with a one-line note)",
    )
    p.add_argument(
        "--languages",
        default=",".join(LANGUAGES),
        help="wordfreq: the classes (default %(default)s)",
    )
    p.add_argument(
        "--words", type=int, default=5000, help="wordfreq: words per language (default %(default)s)"
    )
    p.add_argument(
        "--samples", type=int, default=6000, help="synthetic: sequences (default %(default)s)"
    )
    p.add_argument(
        "--max-len", type=int, default=200, help="synthetic: longest sequence (default %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--embed", type=int, default=Config.embed, help="embedding size")
    p.add_argument("--hidden", type=int, default=Config.hidden, help="GRU hidden size")
    p.add_argument("--layers", type=int, default=Config.layers, help="GRU layers")
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument(
        "--seed", type=int, default=Config.seed, help="weights, data selection, split, batch order"
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: torch.cuda.is_available() is False")
    for flag in (
        "words",
        "samples",
        "max_len",
        "epochs",
        "batch_size",
        "embed",
        "hidden",
        "layers",
    ):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.data is None:
        args.data = "wordfreq" if have_wordfreq() else "synthetic"
        if args.data == "synthetic":
            print(
                "note: the wordfreq package is not installed (pip install wordfreq), so the data is "
                "generated (--data synthetic)",
                file=sys.stderr,
            )
    elif args.data == "wordfreq" and not have_wordfreq():
        p.error("--data wordfreq: the wordfreq package is not installed (pip install wordfreq)")

    try:
        pairs, source = load(args)
    except (DataFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ds = encode(pairs)
    idx = list(range(len(pairs)))
    random.Random(args.seed).shuffle(idx)
    n_test = max(1, len(idx) // 10)
    test_idx, train_idx = idx[:n_test], idx[n_test:]
    cfg = Config(
        epochs=args.epochs,
        batch_size=args.batch_size,
        embed=args.embed,
        hidden=args.hidden,
        layers=args.layers,
        lr=args.lr,
        seed=args.seed,
        device=device,
        dtype=getattr(torch, args.dtype),
    )
    lens = sorted(len(t) for t in ds.tokens)
    where = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{len(pairs)} sequences ({source}), {len(ds.classes)} classes, "
        f"{len(ds.vocab)} characters; lengths {lens[0]}..{lens[-1]} (median {lens[len(lens) // 2]})\n"
        f"model: Embedding({len(ds.vocab) + 1}, {cfg.embed}, padding_idx=0) -> GRU({cfg.embed}, {cfg.hidden}, "
        f"num_layers={cfg.layers}) -> last state -> Linear({cfg.hidden}, {len(ds.classes)}); "
        f"{cfg.epochs} epochs of batch {cfg.batch_size}, {args.dtype}, on {where}; torch {torch.__version__}"
    )
    res = train_both(ds, train_idx, test_idx, cfg, progress=progress_bar(cfg.epochs))
    print(report(res, cfg, len(train_idx), len(test_idx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
