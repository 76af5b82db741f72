"""The demo's data (examples/demo.py --data): (label, text) pairs from wordfreq's word lists, from a
generator, or from a file; then character ids and padded batches in the data's own order."""

from __future__ import annotations

import collections
import importlib.util
import math
import random
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


class DataFormatError(ValueError):
    """A --data file line that is not `label<TAB>text`, or a word list that cannot be made."""


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
            raise DataFormatError(
                f"--languages: expected wordfreq language codes such as "
                f"{','.join(LANGUAGES)}; {lang!r} is not one of {len(known)} it has"
            )
    if len(set(languages)) < 2:
        raise DataFormatError(
            f"--languages: expected at least 2 distinct languages, got {languages}"
        )
    tops = {
        lang: [w for w in wordfreq.top_n_list(lang, WORD_POOL, wordlist="small") if w.isalpha()]
        for lang in dict.fromkeys(languages)
    }
    count = collections.Counter(w for words in tops.values() for w in set(words))
    rng = random.Random(seed)
    pairs = []
    for lang, words in tops.items():
        unique = [w for w in words if count[w] == 1]
        if len(unique) < per_language:
            raise DataFormatError(
                f"--words: expected at most {len(unique)} (the words of {lang!r} "
                f"found in no other language), got {per_language}"
            )
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
    favourites = [letters[i * k : (i + 1) * k] for i in range(len(MADE_UP))]
    pairs = []
    for _ in range(n):
        c = rng.randrange(len(MADE_UP))
        length = round(math.exp(rng.uniform(math.log(min(4, max_len)), math.log(max(4, max_len)))))
        text = "".join(
            rng.choice(favourites[c]) if rng.random() < 0.4 else rng.choice(ALPHABET)
            for _ in range(length)
        )
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
                    raise DataFormatError(
                        f"{where}: expected 'label<TAB>text', found no tab in {line[:60]!r}"
                    )
                label, text = line.split("\t", 1)
                if not label.strip():
                    raise DataFormatError(f"{where}: expected a label before the tab, found none")
                if not text:
                    raise DataFormatError(f"{where}: expected text after the tab, found none")
                pairs.append((label.strip(), text))
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: expected UTF-8 text ({e})") from None
    if len(pairs) < 4:
        raise DataFormatError(
            f"{path}: expected at least 4 'label<TAB>text' lines, found {len(pairs)}"
        )
    if len({label for label, _ in pairs}) < 2:
        raise DataFormatError(
            f"{path}: expected at least 2 distinct labels, found one ({pairs[0][0]!r})"
        )
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
        idx = indices[s : s + batch_size]
        seqs = [ds.tokens[i] for i in idx]
        lengths = torch.tensor([len(t) for t in seqs])
        yield pad_sequence(seqs, batch_first=True, padding_value=0), lengths, ds.labels[idx]
