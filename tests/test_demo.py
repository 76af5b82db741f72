"""The demo (examples/demo.py): both recipes train identically on every kind of data (wordfreq's
word lists, generated texts, a file), the word lists load offline, and --data errors are clear."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # as `python examples/demo.py` has it
demo = importlib.import_module("demo")
demo_data = importlib.import_module("demo_data")

needs_wordfreq = pytest.mark.skipif(
    not demo_data.have_wordfreq(),
    reason="the wordfreq package is not installed (scripts/setup.sh installs it): the demo's real-data "
    "path is untested here",
)

SMALL = ["--epochs", "1", "--hidden", "8", "--embed", "4", "--batch-size", "8", "--device", "cpu"]


def _split(pairs, n_test=8):
    ds = demo_data.encode(pairs)
    idx = list(range(len(pairs)))
    return ds, idx[n_test:], idx[:n_test]


def _assert_train_identically(ds, train, test, dtype, tol, epochs=2):
    cfg = demo.Config(epochs=epochs, batch_size=8, embed=6, hidden=10, layers=2, dtype=dtype)
    res = demo.train_both(ds, train, test, cfg)
    la, lb = res["losses"].values()
    n = -(-len(train) // 8)  # batches per epoch
    assert len(la) == len(lb) == epochs * n
    assert max(abs(x - y) for x, y in zip(la, lb)) < tol
    assert sum(la[-n:]) < sum(la[:n])  # it learns: the last epoch's loss is below the first's
    acc = list(res["accuracy"].values())
    assert acc[0] == acc[1]
    labels = ds.labels[test].tolist()
    assert res["majority"] == max(labels.count(c) for c in labels) / len(labels)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_both_recipes_train_identically_on_generated_data(dtype, tol):
    _assert_train_identically(*_split(demo_data.generate_data(48, 30, 0)), dtype, tol)


@needs_wordfreq
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_both_recipes_train_identically_on_words(dtype, tol):
    pairs = demo_data.wordfreq_words(["en", "fi", "pl"], 16, seed=0)
    _assert_train_identically(*_split(pairs), dtype, tol)


# A fresh interpreter (no word list cached yet) in which every way to reach the network raises and
# is recorded, set up before wordfreq is imported.
_OFFLINE = """
import json, socket, sys
tried = []
def refuse(*args, **kwargs):
    tried.append(repr(args)[:80])
    raise OSError("network access blocked by the test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.path.insert(0, sys.argv[1])
import demo_data
pairs = demo_data.wordfreq_words(["de", "en", "es", "fi", "fr", "it", "nl", "pl"], 200, seed=3)
print(json.dumps({"pairs": pairs, "tried": tried, "again": pairs == demo_data.wordfreq_words(
    ["de", "en", "es", "fi", "fr", "it", "nl", "pl"], 200, seed=3)}))
"""


@needs_wordfreq
def test_words_load_offline_and_make_a_real_task():
    run = subprocess.run(
        [sys.executable, "-c", _OFFLINE, str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["tried"] == [] and got["again"]  # no network tried; the same seed, the same words
    pairs = [tuple(p) for p in got["pairs"]]
    labels = [label for label, _ in pairs]
    assert sorted(set(labels)) == ["de", "en", "es", "fi", "fr", "it", "nl", "pl"]
    assert all(labels.count(lang) == 200 for lang in set(labels))
    words = [w for _, w in pairs]
    assert all(w and w.isalpha() for w in words)
    assert len(set(words)) == len(words)  # a word spelled alike in two languages is left out
    lengths = [len(w) for w in words]
    assert min(lengths) <= 3 and max(lengths) >= 14
    assert len(set(lengths)) >= 10
    assert any(not w.isascii() for w in words)  # real spelling: ä, é, ł, ñ ...
    assert pairs != demo_data.wordfreq_words(
        ["de", "en", "es", "fi", "fr", "it", "nl", "pl"], 200, seed=4
    )


@needs_wordfreq
@pytest.mark.parametrize(
    "languages, words, expected",
    [
        (["en", "xx"], 10, "--languages: expected wordfreq language codes .* 'xx' is not one"),
        (["en", "en"], 10, "--languages: expected at least 2 distinct languages"),
        (["en", "fi"], 10**6, "--words: expected at most"),
    ],
)
def test_words_bad_arguments(languages, words, expected):
    with pytest.raises(demo_data.DataFormatError, match=expected):
        demo_data.wordfreq_words(languages, words, seed=0)


@needs_wordfreq
def test_main_defaults_to_words(capsys):
    assert demo.main(["--words", "12", "--languages", "en,fi,pl", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "36 sequences (wordfreq " in out and "3 classes" in out
    assert "(always naming the most common class: " in out
    assert "the curves agree" in out and "speedup" in out


def test_main_without_wordfreq_falls_back_to_generated(monkeypatch, capsys):
    monkeypatch.setattr(demo, "have_wordfreq", lambda: False)
    assert demo.main(["--samples", "40", "--max-len", "20", *SMALL]) == 0
    captured = capsys.readouterr()
    assert (
        "wordfreq package is not installed" in captured.err and "--data synthetic" in captured.err
    )
    assert "40 sequences (generated)" in captured.out and "the curves agree" in captured.out
    with pytest.raises(SystemExit) as e:
        demo.main(["--data", "wordfreq", *SMALL])
    assert e.value.code == 2
    assert "--data wordfreq: the wordfreq package is not installed" in capsys.readouterr().err


def test_main_on_generated_data(capsys):
    assert demo.main(["--data", "synthetic", "--samples", "40", "--max-len", "20", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "40 sequences (generated), 4 classes" in out and "the curves agree" in out


def test_generated_data_lengths_vary_widely():
    lengths = [len(t) for _, t in demo_data.generate_data(500, 200, 0)]
    assert min(lengths) <= 6 and max(lengths) >= 150


def test_read_data(tmp_path):
    f = tmp_path / "data.tsv"
    f.write_text("pos\tgood film\nneg\tbad\tfilm\n\npos\tfine\nneg\tawful\n", encoding="utf-8")
    assert demo_data.read_data(str(f)) == [
        ("pos", "good film"),
        ("neg", "bad\tfilm"),
        ("pos", "fine"),
        ("neg", "awful"),
    ]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("no tab here", "line 3: expected 'label<TAB>text', found no tab"),
        ("\tjust text", "line 3: expected a label before the tab"),
        ("pos\t", "line 3: expected text after the tab"),
    ],
)
def test_malformed_line_names_line_and_expectation(tmp_path, capsys, line, expected):
    f = tmp_path / "bad.tsv"
    f.write_text(f"pos\tgood\nneg\tbad\n{line}\npos\tok\n", encoding="utf-8")
    with pytest.raises(demo_data.DataFormatError, match=expected):
        demo_data.read_data(str(f))
    assert demo.main(["--data", str(f)]) == 2
    assert expected in capsys.readouterr().err


def test_main_on_a_file(tmp_path, capsys):
    f = tmp_path / "data.tsv"
    f.write_text(
        "".join(f"{lab}\t{text}\n" for lab, text in demo_data.generate_data(40, 20, 1)),
        encoding="utf-8",
    )
    assert demo.main(["--data", str(f), *SMALL]) == 0
    out = capsys.readouterr().out
    assert f"40 sequences (from {f})" in out
    assert "the curves agree" in out and "speedup" in out


def test_demo_script_runs_the_example_as_demo_sh_starts_it():
    """scripts/demo.sh's last line, with this interpreter for the venv's: the example must start
    (its own folder on sys.path for demo_data) exactly as the README's first command runs it."""
    repo = EXAMPLES.parent
    line = [
        ln
        for ln in (repo / "scripts" / "demo.sh").read_text().splitlines()
        if ln.startswith("exec ")
    ][-1]
    argv = line.split()[1:]
    assert argv[0] == '"$VENV/bin/python"' and argv[-1] == '"$@"', line
    cmd = [sys.executable, *argv[1:-1], "--help"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--data" in proc.stdout
