"""ONNX export (varlen_rnn.onnx): models with varlen_rnn.GRU/LSTM/RNN exported with
torch.onnx.export(dynamo=True) and run in ONNX Runtime with dynamic batch and time, against
the PyTorch module and against torch.nn + pack_padded_sequence (float32 against a float64
reference: ONNX Runtime's GRU refuses float64); the drop-in demo model; and the export-time
errors for what ONNX cannot express."""

import copy
import importlib
import itertools
import sys
from pathlib import Path

import pytest
import torch
from testing import packed_baseline
from torch import nn

import varlen_rnn

try:
    import onnx
    import onnxruntime as ort

    import varlen_rnn.onnx  # imports onnxscript (and onnx)
except ModuleNotFoundError as e:  # only a package that is not there skips; a broken one fails
    if e.name not in ("onnxruntime", "onnxscript", "onnx"):
        raise
    pytest.skip(
        f"{e.name} is not installed: pip install 'varlen_rnn[onnx]' (scripts/setup.sh does)",
        allow_module_level=True,
    )

# torch.onnx's notes on naming the graph's dynamic axes (one Dim B shared by several inputs,
# a None in dynamic_shapes): about names only, not the graph.
pytestmark = [
    pytest.mark.filterwarnings("ignore:# The axis name:UserWarning"),
    pytest.mark.filterwarnings("ignore:# ONNX model has different number of inputs:UserWarning"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # as `python examples/demo.py` has it
demo = importlib.import_module("demo")

I, H = 3, 5
TOL = dict(atol=1e-5, rtol=1e-5)
# (T, lengths): unsorted, a length equal to T, zeros, B = 1, T = 0; the export example is the
# first.
RUNS = [(6, [6, 2, 0, 5]), (9, [3, 9, 1, 0, 7]), (1, [1]), (2, [0, 2, 1]), (0, [0, 0])]
CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}


# (num_layers == 2, bidirectional, bias, batch_first, hx given): every pair of these options
# meets in all four of its combinations in these rows (test_configs_cover_every_pair checks
# it), and the last row has everything on. Seven configurations instead of 32 keep each
# export a few seconds long.
OPTIONS = ("num_layers", "bidirectional", "bias", "batch_first", "hx")
ROWS = [
    (0, 0, 0, 0, 0),
    (1, 1, 0, 1, 0),
    (1, 0, 1, 1, 0),
    (1, 0, 0, 0, 1),
    (0, 1, 1, 1, 1),
    (0, 1, 1, 0, 1),
    (1, 1, 1, 1, 1),
]


def _configs(cell):
    """The configurations of ROWS (the RNN alternates tanh and relu over them)."""
    for i, row in enumerate(ROWS):
        cfg = {k: bool(v) for k, v in zip(OPTIONS, row)}
        cfg["num_layers"] = 1 + row[0]
        if cell == "rnn":
            cfg["nonlinearity"] = ("tanh", "relu")[i % 2]
        yield cfg


def test_configs_cover_every_pair():
    for a, b in itertools.combinations(range(len(OPTIONS)), 2):
        assert {(r[a], r[b]) for r in ROWS} == {(0, 0), (0, 1), (1, 0), (1, 1)}, (a, b)


class Bank(nn.Module):
    """Every configuration of one cell side by side on one input, so that one export covers
    them all: x [T, B, I] (transposed for the batch_first ones), h0 (and c0) [4, B, H], of
    which a configuration with hx takes its first num_layers * D rows."""

    def __init__(self, cell):
        super().__init__()
        self.configs = list(_configs(cell))
        cls = getattr(varlen_rnn, cell.upper())
        self.rnns = nn.ModuleList(
            cls(I, H, **{k: v for k, v in c.items() if k != "hx"}) for c in self.configs
        )

    def forward(self, x, lengths, h0, c0=None):
        outs = []
        for cfg, rnn in zip(self.configs, self.rnns):
            xi = x.transpose(0, 1) if cfg["batch_first"] else x
            out, state = rnn(xi, _hx(rnn, h0, c0) if cfg["hx"] else None, lengths=lengths)
            outs += [out, *(state if isinstance(state, tuple) else (state,))]
        return tuple(outs)


def _hx(rnn, h0, c0):
    LD = rnn.num_layers * (2 if rnn.bidirectional else 1)
    return h0[:LD] if c0 is None else (h0[:LD], c0[:LD])


def _session(program):
    return ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _run(session, **inputs):
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    return [torch.from_numpy(y) for y in session.run(None, feeds)]


def _inputs(cell, T, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    inputs = dict(
        x=torch.randn(T, B, I, generator=g),
        lengths=torch.tensor(lengths),
        h0=torch.randn(4, B, H, generator=g),
    )
    if cell == "lstm":
        inputs["c0"] = torch.randn(4, B, H, generator=g)
    return inputs


def _nn_reference(rnn, x, lengths, hx):
    """torch.nn's twin of rnn in float64 (the exact answer, as near as float64 gets), run
    with packing on the rows of non-zero length (packing refuses 0); a zero-length row's
    output is 0 and its final state is hx (or 0)."""
    ref = CELLS[type(rnn).__name__.lower()](**_nn_config(rnn), dtype=torch.float64)
    ref.load_state_dict(rnn.state_dict())
    x = x.double()
    bdim = 0 if rnn.batch_first else 1
    B, LD = x.shape[bdim], rnn.num_layers * (2 if rnn.bidirectional else 1)
    n = 2 if isinstance(rnn, varlen_rnn.LSTM) else 1
    states = [torch.zeros(LD, B, H, dtype=torch.float64) for _ in range(n)]
    if hx is not None:
        states = [s.double() for s in (hx if isinstance(hx, tuple) else (hx,))]  # copies
    out = torch.zeros(*x.shape[:2], H * (2 if rnn.bidirectional else 1), dtype=torch.float64)
    keep = torch.nonzero(lengths > 0).flatten()
    if len(keep):
        sub_hx = [s[:, keep] for s in states]
        sub_out, sub_state = packed_baseline(
            ref,
            x.index_select(bdim, keep),
            lengths[keep],
            tuple(sub_hx) if len(sub_hx) == 2 else sub_hx[0],
        )
        out.index_copy_(bdim, keep, sub_out)
        sub_states = sub_state if isinstance(sub_state, tuple) else (sub_state,)
        for s, sub in zip(states, sub_states):
            s[:, keep] = sub
    return [out, *states]


def _nn_config(rnn):
    keys = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional")
    cfg = {k: getattr(rnn, k) for k in keys}
    if isinstance(rnn, varlen_rnn.RNN):
        cfg["nonlinearity"] = rnn.nonlinearity
    return cfg


def _export(model, inputs):
    T, B = torch.export.Dim("T", min=0, max=64), torch.export.Dim("B", min=1, max=64)
    shapes = {"x": {0: T, 1: B}, "lengths": {0: B}, "h0": {1: B}, "c0": {1: B}}
    return varlen_rnn.onnx.export(
        model,
        tuple(inputs.values()),
        dynamic_shapes={k: shapes[k] for k in inputs},
        verbose=False,
    )


@pytest.mark.parametrize("cell", list(CELLS))
def test_onnx_runtime_matches_module_and_nn_packing(cell):
    torch.manual_seed(0)
    model = Bank(cell).eval()
    program = _export(model, _inputs(cell, *RUNS[0], seed=0))
    onnx.checker.check_model(program.model_proto, full_check=True)
    # One ONNX node per layer, and nothing of ours left (no custom-domain node).
    nodes = program.model_proto.graph.node
    assert [n.op_type for n in nodes].count(cell.upper()) == sum(
        c["num_layers"] for c in model.configs
    )
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}
    session = _session(program)
    for seed, (T, lengths) in enumerate(RUNS):
        inputs = _inputs(cell, T, lengths, seed)
        got = _run(session, **inputs)
        with torch.no_grad():
            ours = list(model(**inputs))
        assert len(got) == len(ours)
        at = 0
        for cfg, rnn in zip(model.configs, model.rnns):
            x = inputs["x"].transpose(0, 1) if cfg["batch_first"] else inputs["x"]
            hx = _hx(rnn, inputs["h0"], inputs.get("c0")) if cfg["hx"] else None
            with torch.no_grad():
                expected = _nn_reference(rnn, x, inputs["lengths"], hx)
            for k, e in enumerate(expected):
                msg = f"{cell} {cfg} T={T} lengths={lengths} output {k}"
                torch.testing.assert_close(got[at + k], ours[at + k], **TOL, msg=msg)
                torch.testing.assert_close(got[at + k].double(), e, **TOL, msg=msg)
            at += len(expected)
        assert at == len(got)


# ------------------------------------------------------------------ the drop-in demo model


class VarlenLogits(nn.Module):
    """The demo's varlen_rnn recipe as a module's forward: what gets exported."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, lengths):
        return demo.logits_varlen(self.model, tokens, lengths, None)[0]


def test_demo_classifier_swapped_to_varlen_runs_in_onnx_runtime():
    """The demo's nn.GRU classifier, converted with varlen_rnn.convert and exported, gives in
    ONNX Runtime the logits of the original model's sort/pack recipe. Its lengths are int32
    (the other tests' are int64): the graph casts them for sequence_lens and the mask."""
    torch.manual_seed(0)
    base = demo.Classifier(vocab=30, classes=4, embed=6, hidden=7, layers=2).eval()
    exported = VarlenLogits(varlen_rnn.convert(copy.deepcopy(base)))
    assert isinstance(exported.model.rnn, varlen_rnn.GRU)

    def batch(B, T, seed):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        tokens = torch.randint(1, 31, (B, T), generator=g)
        tokens[torch.arange(T) >= lengths[:, None]] = 0  # padding_idx
        return tokens, lengths.to(torch.int32)

    B, T = torch.export.Dim("B", min=1, max=64), torch.export.Dim("T", min=1, max=64)
    program = varlen_rnn.onnx.export(
        exported.eval(),
        batch(5, 8, seed=0),
        dynamic_shapes={"tokens": {0: B, 1: T}, "lengths": {0: B}},
        verbose=False,
    )
    session = _session(program)
    for seed, (b, t) in enumerate([(5, 8), (9, 3), (1, 12)]):
        tokens, lengths = batch(b, t, seed)
        (got,) = _run(session, tokens=tokens, lengths=lengths)
        with torch.no_grad():
            logits, order = demo.logits_packed(base, tokens, lengths.long(), torch.arange(b))
        expected = torch.empty_like(logits)
        expected[order] = logits  # the packed recipe sorts; put its rows back
        torch.testing.assert_close(got, expected, **TOL)


# ------------------------------------------------------------------ what ONNX cannot express
def _causes(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _export_error(model, args):
    with pytest.raises(Exception) as info:
        varlen_rnn.onnx.export(model.eval(), args, verbose=False)
    return next((c for c in _causes(info.value) if isinstance(c, ValueError)), info.value)


def test_lstm_projection_is_refused_at_export():
    model = varlen_rnn.LSTM(I, H, proj_size=2)
    e = _export_error(model, (torch.randn(4, 2, I), None, torch.tensor([4, 1])))
    assert isinstance(e, ValueError)
    assert "proj_size > 0 cannot be exported to ONNX" in str(e)
    assert "no projection" in str(e)


class RaggedGRU(nn.Module):
    """A GRU layer over ragged rows (a nested tensor's values and offsets), called as an op."""

    def __init__(self):
        super().__init__()
        self.rnn = varlen_rnn.GRU(I, H)

    def forward(self, values, offsets, hx):
        w = self.rnn._layer_weights(0, values.dtype)
        return varlen_rnn.ops.gru_layer_ragged(values, offsets, None, 0, 4, hx, *w)[0]


def test_ragged_layer_is_refused_at_export():
    args = (torch.randn(5, I), torch.tensor([0, 4, 5]), torch.zeros(1, 2, H))
    e = _export_error(RaggedGRU(), args)
    assert isinstance(e, ValueError)
    assert "ragged input" in str(e) and "pass lengths=" in str(e)


@pytest.mark.parametrize("kind", ["packed", "nested"])
def test_ragged_model_input_is_refused_before_tracing(kind):
    x = torch.randn(4, 2, I)
    if kind == "packed":
        arg = nn.utils.rnn.pack_padded_sequence(x, [4, 2], enforce_sorted=False)
    else:
        arg = torch.nested.nested_tensor([x[:, 0], x[:2, 1]], layout=torch.jagged)
    with pytest.raises(ValueError, match="pad it and pass lengths="):
        varlen_rnn.onnx.export(varlen_rnn.GRU(I, H), (arg,))


def test_export_is_always_dynamo():
    with pytest.raises(ValueError, match="dynamo=True"):
        varlen_rnn.onnx.export(varlen_rnn.GRU(I, H), (torch.randn(3, 1, I),), dynamo=False)


def test_lengths_past_T_are_refused_by_onnx_runtime():
    """The graph cannot check lengths' values; ONNX Runtime's recurrent kernels do. Exported
    the documented way without varlen_rnn.onnx.export: torch.onnx.export plus the table."""
    model = varlen_rnn.GRU(I, H).eval()
    T, B = torch.export.Dim("T", min=1, max=64), torch.export.Dim("B", min=1, max=64)
    program = torch.onnx.export(
        model,
        (torch.randn(4, 2, I), None, torch.tensor([4, 1])),
        dynamo=True,
        custom_translation_table=varlen_rnn.onnx.translation_table(),
        dynamic_shapes=({0: T, 1: B}, None, {0: B}),
        verbose=False,
    )
    session = _session(program)
    x = torch.randn(3, 2, I)
    (out,) = _run(session, input=x, lengths=torch.tensor([3, 1]))[:1]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, lengths=[3, 1])[0], **TOL)
    with pytest.raises(Exception, match="sequence_lens"):
        _run(session, input=torch.randn(4, 2, I), lengths=torch.tensor([5, 1]))


def test_padding_is_zero_whatever_the_runtime_leaves_there():
    """ONNX's reference evaluator ignores sequence_lens (it runs every row for T steps), so
    its Y past a length holds states of the padding: the graph's mask still makes our
    output 0 there. Forward direction only: its valid steps do not see the padding."""
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = varlen_rnn.GRU(I, H, num_layers=2, batch_first=True).eval()
    x, lengths = torch.randn(3, 6, I), torch.tensor([6, 2, 4])
    program = varlen_rnn.onnx.export(model, (x, None, lengths), verbose=False)
    evaluator = ReferenceEvaluator(program.model_proto)
    feeds = {"input": x.numpy(), "lengths": lengths.numpy()}
    got = torch.from_numpy(evaluator.run(None, feeds)[0])
    with torch.no_grad():
        expected, _ = model(x, lengths=lengths)
    torch.testing.assert_close(got, expected, **TOL)
