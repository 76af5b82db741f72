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
import importlib.util
import math
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

import varlen_rnn


class DataFormatError(ValueError):
    """A --data file line that is not `label<TAB>text`, or a word list that cannot be made."""


# ---------------------------------------------------------------------------------------- data
LANGUAGES = ("de", "en", "es", "fi", "fr", "it", "nl", "pl")  # wordfreq codes, all in Latin script
WORD_POOL = 20000  # each language's most frequent words to draw from: everyday words, few rarities


def have_wordfreq() -> bool:
    return importlib.util.find_spec("wordfreq") is not None


def wordfreq_words(languages, per_language: int, seed: int) -> list[tuple[str, str]]:
    """`per_language` (language, word) pairs for each language, drawn with `seed` from the WORD_POOL
    most frequent alphabetic words of wordfreq's "small" lists, which ship in the package (read
    from its data folder; no network). A word spelled alike in two of the languages ("hotel",
    "in") is left out: it has no single right answer. Lengths are the words' own, 1 to ~25."""
    import wordfreq

    known = set(wordfreq.available_languages(wordlist="small"))
    for lang in languages:
        if lang not in known:
            raise DataFormatError(f"--languages: expected wordfreq language codes such as "
                                  f"{','.join(LANGUAGES)}; {lang!r} is not one of {len(known)} it has")
    if len(set(languages)) < 2:
        raise DataFormatError(f"--languages: expected at least 2 distinct languages, got {languages}")
    tops = {lang: [w for w in wordfreq.top_n_list(lang, WORD_POOL, wordlist="small") if w.isalpha()]
            for lang in dict.fromkeys(languages)}
    count = collections.Counter(w for words in tops.values() for w in set(words))
    rng = random.Random(seed)
    pairs = []
    for lang, words in tops.items():
        unique = [w for w in words if count[w] == 1]
        if len(unique) < per_language:
            raise DataFormatError(f"--words: expected at most {len(unique)} (the words of {lang!r} "
                                  f"found in no other language), got {per_language}")
        pairs += [(lang, w) for w in rng.sample(unique, per_language)]
    return pairs


ALPHABET = "abcdefghijklmnopqrstuvwxyz "
MADE_UP = ("ardic", "belan", "corvu", "dusht")


def generate_data(n: int, max_len: int, seed: int) -> list[tuple[str, str]]:
    """`n` (label, text) pairs. Each language draws 40% of its characters from its own few favourite
    letters and the rest from the whole alphabet, so every character is a hint and the label is a
    matter of counting over the whole text: short texts are ambiguous, long ones are not, and the
    last state must have seen every step. Lengths are log-uniform in [4, max_len]: many short texts,
    some very long ones."""
    rng = random.Random(seed)
    letters = list(ALPHABET)
    rng.shuffle(letters)
    k = len(ALPHABET) // len(MADE_UP)
    favourites = [letters[i * k:(i + 1) * k] for i in range(len(MADE_UP))]
    pairs = []
    for _ in range(n):
        c = rng.randrange(len(MADE_UP))
        length = int(round(math.exp(rng.uniform(math.log(min(4, max_len)), math.log(max(4, max_len))))))
        text = "".join(rng.choice(favourites[c]) if rng.random() < 0.4 else rng.choice(ALPHABET)
                       for _ in range(length))
        pairs.append((MADE_UP[c], text))
    return pairs


def read_data(path: str) -> list[tuple[str, str]]:
    """`label<TAB>text` lines (blank lines skipped; the text is everything after the first tab)."""
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            for no, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                where = f"{path}, line {no}"
                if "\t" not in line:
                    raise DataFormatError(f"{where}: expected 'label<TAB>text', found no tab in {line[:60]!r}")
                label, text = line.split("\t", 1)
                if not label.strip():
                    raise DataFormatError(f"{where}: expected a label before the tab, found none")
                if not text:
                    raise DataFormatError(f"{where}: expected text after the tab, found none")
                pairs.append((label.strip(), text))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: expected UTF-8 text ({e})") from None
    if len(pairs) < 4:
        raise DataFormatError(f"{path}: expected at least 4 'label<TAB>text' lines, found {len(pairs)}")
    if len({label for label, _ in pairs}) < 2:
        raise DataFormatError(f"{path}: expected at least 2 distinct labels, found one ({pairs[0][0]!r})")
    return pairs


@dataclass
class Dataset:
    tokens: list  # one int64 tensor of character ids (>= 1) per text; 0 is the padding id
    labels: torch.Tensor  # [N] class ids
    vocab: list  # characters; id = position + 1
    classes: list  # label strings; id = position


def encode(pairs: list[tuple[str, str]]) -> Dataset:
    vocab = sorted({ch for _, text in pairs for ch in text})
    classes = sorted({label for label, _ in pairs})
    cid = {ch: i + 1 for i, ch in enumerate(vocab)}
    lid = {label: i for i, label in enumerate(classes)}
    tokens = [torch.tensor([cid[ch] for ch in text], dtype=torch.int64) for _, text in pairs]
    return Dataset(tokens, torch.tensor([lid[label] for label, _ in pairs]), vocab, classes)


def batches(ds: Dataset, indices: list[int], batch_size: int):
    """Padded [B, T] token batches in the data's own order (nothing sorted) with lengths and labels."""
    for s in range(0, len(indices), batch_size):
        idx = indices[s:s + batch_size]
        seqs = [ds.tokens[i] for i in idx]
        lengths = torch.tensor([len(t) for t in seqs])
        yield pad_sequence(seqs, batch_first=True, padding_value=0), lengths, ds.labels[idx]


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


def train_both(ds: Dataset, train_idx: list[int], test_idx: list[int], cfg: Config, progress=None) -> dict:
    """Trains both recipes from one initialisation on the same batches, one batch of each in turn
    (so a busy machine slows both alike). Returns per-step losses, times, accuracies."""
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    base = Classifier(len(ds.vocab), len(ds.classes), cfg.embed, cfg.hidden, cfg.layers).to(dev, cfg.dtype)
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
    majority = max(collections.Counter(ds.labels[test_idx].tolist()).values()) / max(1, len(test_idx))
    return {"losses": losses, "seconds": seconds, "accuracy": acc, "majority": majority,
            "batches_per_epoch": n_batches}


# ------------------------------------------------------------------------------------- output
def progress_bar(epochs: int):
    tty = sys.stderr.isatty()

    def show(epoch, b, n, last):
        if not tty and b < n:  # a log file gets one line per epoch, not a carriage-return stream
            return
        done = (epoch * n + b) / (epochs * n)
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        losses = "  ".join(f"{k}: {v:.4f}" for k, v in last.items())
        print(f"{chr(13) if tty else ''}  epoch {epoch + 1}/{epochs} [{bar}] {100 * done:3.0f}%  loss  {losses}  ",
              end="\n" if b == n and (done >= 1 or not tty) else "", file=sys.stderr, flush=True)
    return show


def report(res: dict, cfg: Config, n_train: int, n_test: int) -> str:
    a, b = list(res["losses"])
    la, lb = res["losses"][a], res["losses"][b]
    n = res["batches_per_epoch"]
    lines = ["", "Loss (mean over each epoch, and the last batch), side by side:",
             f"  {'epoch':>5}  {a:>20}  {b:>20}  {'|difference|':>12}"]
    for e in range(cfg.epochs):
        ma, mb = sum(la[e * n:(e + 1) * n]) / n, sum(lb[e * n:(e + 1) * n]) / n
        lines.append(f"  {e + 1:>5}  {ma:>20.6f}  {mb:>20.6f}  {abs(ma - mb):>12.2e}")
    lines.append(f"  {'last':>5}  {la[-1]:>20.6f}  {lb[-1]:>20.6f}  {abs(la[-1] - lb[-1]):>12.2e}")
    worst = max(abs(x - y) for x, y in zip(la, lb))
    agree = worst <= 1e-3 * max(1.0, max(la))
    lines.append(f"  max |difference| over all {len(la)} steps: {worst:.2e} "
                 f"({'the curves agree' if agree else 'the curves part ways'})")
    if not agree:
        lines.append("  (both runs compute the same function; training can amplify float rounding of ~1e-7 "
                     "into different trajectories: rerun with --dtype float64 to see them agree)")
    lines += ["",
              f"Test accuracy ({n_test} held-out sequences, {n_train} trained on):",
              f"  {a}: {100 * res['accuracy'][a]:.1f}%    {b}: {100 * res['accuracy'][b]:.1f}%    "
              f"(always naming the most common class: {100 * res['majority']:.1f}%)", "",
              "Training time (forward + backward + optimizer step, summed over all batches):",
              f"  {a}: {res['seconds'][a]:.2f} s    {b}: {res['seconds'][b]:.2f} s    "
              f"speedup {res['seconds'][a] / res['seconds'][b]:.2f}x"]
    return "\n".join(lines)


def load(args) -> tuple[list[tuple[str, str]], str]:
    """The (label, text) pairs that --data names, and a few words saying where they came from."""
    if args.data == "wordfreq":
        langs = args.languages.split(",")
        return (wordfreq_words(langs, args.words, args.seed),
                f"wordfreq {importlib.metadata.version('wordfreq')} word lists, {args.words} words each of {','.join(langs)}")
    if args.data == "synthetic":
        return generate_data(args.samples, args.max_len, args.seed), "generated"
    return read_data(args.data), f"from {args.data}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="wordfreq, synthetic or a FILE of 'label<TAB>text' lines "
                   "(default: wordfreq when the package is installed, else synthetic)")
    p.add_argument("--languages", default=",".join(LANGUAGES), help="wordfreq: the classes (default %(default)s)")
    p.add_argument("--words", type=int, default=5000, help="wordfreq: words per language (default %(default)s)")
    p.add_argument("--samples", type=int, default=6000, help="synthetic: sequences (default %(default)s)")
    p.add_argument("--max-len", type=int, default=200, help="synthetic: longest sequence (default %(default)s)")
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--embed", type=int, default=Config.embed, help="embedding size")
    p.add_argument("--hidden", type=int, default=Config.hidden, help="GRU hidden size")
    p.add_argument("--layers", type=int, default=Config.layers, help="GRU layers")
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--seed", type=int, default=Config.seed, help="weights, data selection, split, batch order")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: torch.cuda.is_available() is False")
    for flag in ("words", "samples", "max_len", "epochs", "batch_size", "embed", "hidden", "layers"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.data is None:
        args.data = "wordfreq" if have_wordfreq() else "synthetic"
        if args.data == "synthetic":
            print("note: the wordfreq package is not installed (pip install wordfreq), so the data is "
                  "generated (--data synthetic)", file=sys.stderr)
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
    cfg = Config(epochs=args.epochs, batch_size=args.batch_size, embed=args.embed, hidden=args.hidden,
                 layers=args.layers, lr=args.lr, seed=args.seed, device=device, dtype=getattr(torch, args.dtype))
    lens = sorted(len(t) for t in ds.tokens)
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{len(pairs)} sequences ({source}), {len(ds.classes)} classes, "
          f"{len(ds.vocab)} characters; lengths {lens[0]}..{lens[-1]} (median {lens[len(lens) // 2]})\n"
          f"model: Embedding({len(ds.vocab) + 1}, {cfg.embed}, padding_idx=0) -> GRU({cfg.embed}, {cfg.hidden}, "
          f"num_layers={cfg.layers}) -> last state -> Linear({cfg.hidden}, {len(ds.classes)}); "
          f"{cfg.epochs} epochs of batch {cfg.batch_size}, {args.dtype}, on {where}; torch {torch.__version__}")
    res = train_both(ds, train_idx, test_idx, cfg, progress=progress_bar(cfg.epochs))
    print(report(res, cfg, len(train_idx), len(test_idx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
