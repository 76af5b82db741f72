"""The demo (python -m varlen_rnn.demo): both recipes train identically, and --data errors are clear."""
import pytest
import torch

from varlen_rnn import demo


def _tiny(n=48, max_len=30, seed=0):
    ds = demo.encode(demo.generate_data(n, max_len, seed))
    idx = list(range(n))
    return ds, idx[8:], idx[:8]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_both_recipes_train_identically(dtype, tol):
    ds, train, test = _tiny()
    cfg = demo.Config(epochs=2, batch_size=8, embed=6, hidden=10, layers=2, dtype=dtype)
    res = demo.train_both(ds, train, test, cfg)
    la, lb = res["losses"].values()
    assert len(la) == len(lb) == 2 * 5
    assert max(abs(x - y) for x, y in zip(la, lb)) < tol
    assert la[-1] < la[0]  # it learns
    acc = list(res["accuracy"].values())
    assert acc[0] == acc[1]


def test_generated_data_lengths_vary_widely():
    lengths = [len(t) for _, t in demo.generate_data(500, 200, 0)]
    assert min(lengths) <= 6 and max(lengths) >= 150


def test_read_data(tmp_path):
    f = tmp_path / "data.tsv"
    f.write_text("pos\tgood film\nneg\tbad\tfilm\n\npos\tfine\nneg\tawful\n", encoding="utf-8")
    assert demo.read_data(str(f)) == [("pos", "good film"), ("neg", "bad\tfilm"), ("pos", "fine"),
                                      ("neg", "awful")]


@pytest.mark.parametrize("line, expected", [
    ("no tab here", "line 3: expected 'label<TAB>text', found no tab"),
    ("\tjust text", "line 3: expected a label before the tab"),
    ("pos\t", "line 3: expected text after the tab"),
])
def test_malformed_line_names_line_and_expectation(tmp_path, capsys, line, expected):
    f = tmp_path / "bad.tsv"
    f.write_text(f"pos\tgood\nneg\tbad\n{line}\npos\tok\n", encoding="utf-8")
    with pytest.raises(demo.DataFormatError, match=expected):
        demo.read_data(str(f))
    assert demo.main(["--data", str(f)]) == 2
    assert expected in capsys.readouterr().err


def test_main_on_a_file(tmp_path, capsys):
    f = tmp_path / "data.tsv"
    f.write_text("".join(f"{lab}\t{text}\n" for lab, text in demo.generate_data(40, 20, 1)), encoding="utf-8")
    assert demo.main(["--data", str(f), "--epochs", "1", "--hidden", "8", "--embed", "4",
                      "--batch-size", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "the curves agree" in out and "speedup" in out
