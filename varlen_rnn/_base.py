"""RNNBase: what varlen_rnn.GRU, LSTM and RNN share, written once for every cell.

Parameters with torch.nn's names, shapes, order and initialisation; forward on every input
kind (padded + lengths, unbatched, PackedSequence, jagged nested tensor); the layer loop with
dropout between layers; the autocast policy of torch.nn's RNNs. A subclass names its cell
(a key of varlen_rnn._schema.CELLS) and says how its state looks (h, or the LSTM's (h, c)).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _apart, _inputs, ops
from ._autocast import cpu_autocast_compute, cudnn_autocast
from ._schema import CELLS, _unsqueezed

__all__ = ["RNNBase"]


class LayerWeights(NamedTuple):
    """One layer's parameters, both directions stacked (a view when D == 1), as the
    layer ops of a cell without a projection take them."""

    w_ih: Tensor  # [D, G*H, I] (I = D*H above layer 0)
    w_hh: Tensor  # [D, G*H, H]
    b_ih: Tensor | None  # [D, G*H]
    b_hh: Tensor | None  # [D, G*H]


class ProjectedLayerWeights(NamedTuple):
    """The LSTM's: LayerWeights and the projection (P = proj_size, or H without one)."""

    w_ih: Tensor  # [D, 4H, I] (I = D*P above layer 0)
    w_hh: Tensor  # [D, 4H, P]
    b_ih: Tensor | None  # [D, 4H]
    b_hh: Tensor | None  # [D, 4H]
    w_hr: Tensor | None  # [D, P, H], None without a projection


# nn.RNNBase.extra_repr's order: the arguments shown when they differ from their default.
_DEFAULTS = {
    "proj_size": 0,
    "num_layers": 1,
    "bias": True,
    "batch_first": False,
    "dropout": 0.0,
    "bidirectional": False,
}


_CONFIG = (
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "dropout",
    "bidirectional",
)


class RNNBase(nn.Module):
    """The shared machinery; see varlen_rnn.GRU for forward's arguments and results."""

    _cell: str  # a key of varlen_rnn._schema.CELLS
    _torch_cls: type  # the torch.nn class this one replaces
    # nn's message for an input of the wrong rank ({} is the rank it got).
    _rank_message = "{}: Expected input to be 2D or 3D, got {}D instead"

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        bias: bool,
        batch_first: bool,
        dropout: float,
        bidirectional: bool,
        proj_size: int,
        device,
        dtype,
    ) -> None:
        super().__init__()
        _inputs.check_constructor_args(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size
        )
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        G, H = CELLS[self._cell].gates, hidden_size
        P = proj_size or H
        # Registration order matches torch.nn's so that reset_parameters draws the same
        # numbers from the same seed and state_dicts line up key for key.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else P * self.num_directions
            for sfx in self._suffixes(layer):
                shapes = [("weight_ih", (G * H, layer_in)), ("weight_hh", (G * H, P))]
                if bias:
                    shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
                if proj_size:
                    shapes += [("weight_hr", (P, H))]
                names = [f"{kind}_{sfx}" for kind, _ in shapes]
                for name, (_, shape) in zip(names, shapes):
                    param = torch.empty(shape, device=device, dtype=dtype)
                    self.register_parameter(name, nn.Parameter(param))
                self._flat_weights_names += names
                self._all_weights.append(names)
        self.reset_parameters()

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: say plainly why scripting cannot work."""
        raise RuntimeError(
            f"varlen_rnn.{type(self).__name__} cannot be compiled by torch.jit.script: its "
            "forward takes lengths, PackedSequence and nested tensors, which TorchScript cannot "
            "type, and torch.jit.script is deprecated in PyTorch. Use torch.export.export (or "
            "torch.compile, or AOTInductor for a deployable package); torch.jit.trace also "
            "works (trace under torch.no_grad() for inference)."
        )

    def _config(self) -> dict:
        """The constructor's keyword arguments that rebuild this configuration."""
        return {k: getattr(self, k) for k in _CONFIG}

    @classmethod
    def from_torch(cls, module: nn.Module):
        """This class with `module`'s configuration, weights, device, dtype and training mode
        (`module` a torch.nn module of the class this one replaces)."""
        if not isinstance(module, (cls._torch_cls, cls)):
            raise TypeError(
                f"from_torch expects a torch.nn.{cls._torch_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        w = module.weight_ih_l0
        new = cls(**cls._config(module), device=w.device, dtype=w.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def num_directions(self) -> int:
        """D: 2 if bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def _suffixes(self, layer: int) -> list[str]:
        """Parameter-name suffixes of layer's directions, forward first (torch.nn's names)."""
        return [f"l{layer}", f"l{layer}_reverse"][: self.num_directions]

    def _layer_weights(self, layer: int, dtype: torch.dtype):
        """LayerWeights, or ProjectedLayerWeights for a cell with a projection: the
        layer op's weight arguments."""
        weights = self._stacked(self._flat_weights, layer, dtype, self.num_directions)
        if not self.bidirectional:
            weights = _unsqueezed(weights)
        if not CELLS[self._cell].proj:
            return LayerWeights(*weights)
        return ProjectedLayerWeights(*weights)

    def _stacked(
        self, flat: list[Tensor], layer: int, dtype: torch.dtype, D: int, direction=None
    ) -> list:
        """Layer `layer`'s weight arguments of the layer op, taken from flat (_flat_weights,
        read in this call): each in dtype, [D, ...] (a stack of the two directions) when
        D == 2, the parameters as they are when D == 1 or for one `direction` of a
        bidirectional layer (the layer op's weights without their D dimension: ops._layer's
        squeezed), None for absent biases and projection.
        flat holds, per layer and direction in that order, weight_ih, weight_hh[, bias_ih,
        bias_hh][, weight_hr] (__init__'s registration order). D = num_directions."""
        n = len(flat) // (self.num_layers * D)  # weights per direction
        start = layer * D * n
        # .to(dtype) returns the tensor itself when the dtype matches; the test skips its
        # argument parsing.
        if D == 1 or direction is not None:
            start += 0 if direction is None else direction * n
            out = [w if w.dtype == dtype else w.to(dtype) for w in flat[start : start + n]]
        else:
            ws = [w if w.dtype == dtype else w.to(dtype) for w in flat[start : start + 2 * n]]
            out = [torch.stack((f, r)) for f, r in zip(ws[:n], ws[n:])]
        if not self.bias:
            out[2:2] = [None, None]
        if CELLS[self._cell].proj and not self.proj_size:
            out.append(None)
        return out

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The weights in _flat_weights_names' order, read at every call (nothing here is
        kept between calls): a parameter straight from _parameters, which is what
        nn.Module.__getattr__ would return for it, at a dict lookup's cost; getattr for a
        name that is not there (a parametrization's property, a tensor set after `del`)."""
        params, flat = self._parameters, []
        for n in self._flat_weights_names:  # a loop: dynamo refuses a walrus in a comprehension
            p = params.get(n)
            flat.append(getattr(self, n) if p is None else p)
        return flat

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn's RNNs runs unchanged."""

    # torch.nn.RNNBase's public helpers, nn's own functions (not copies): code written for
    # nn's modules calls them (a wrapper checking its states, a subclass's forward). They
    # read only what this class has too: input_size, hidden_size, proj_size, num_layers,
    # batch_first, bidirectional and _flat_weights. forward does its own checks (the same
    # messages) and does not call them.
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden

    def extra_repr(self) -> str:
        """torch.nn's: the sizes, then every argument that differs from its default."""
        changed = [k for k, default in _DEFAULTS.items() if getattr(self, k) != default]
        return ", ".join(
            [f"{self.input_size}, {self.hidden_size}"]
            + [f"{k}={getattr(self, k)}" for k in changed]
        )

    # ------------------------------------------------------------ the cell's state
    # The state is a tuple: (hx,) for the GRU and RNN, (hx, cx) for the LSTM.
    _state_messages = ("Expected hidden size",)  # nn's words per state

    def _states_of(self, hx, batched: bool) -> tuple[Tensor, ...] | None:
        """hx as the caller gave it -> a tuple of states (or None), ranks checked."""
        _inputs.check_hx_rank(hx, batched)
        return None if hx is None else (hx,)

    def _result(self, finals: tuple[Tensor, ...]):
        """The final states as forward returns them: h_n."""
        return finals[0]

    def _options(self) -> tuple:
        """The cell's non-tensor op arguments (the RNN's nonlinearity)."""
        return ()

    def _autocast_dtype(self, x: Tensor, hx: Tensor) -> torch.dtype:
        """The dtype torch.nn's module computes in and returns under autocast, so that
        swapping it for its varlen_rnn twin changes no dtype downstream.

        cuDNN (see cudnn_autocast): float16. On CUDA without cuDNN, torch.nn's steps are
        its fused GRU/LSTM cell kernels, which autocast runs in the autocast dtype: that
        dtype throughout (a float64 input stays float64; seen on the H200's first run). On
        the CPU torch.nn.GRU and LSTM (given a PackedSequence, what lengths replace) have no
        autocast rule of their own: the state and outputs keep hx's dtype (the input's when
        hx is None) and only their internal GEMMs are autocast; the kernels here then run in
        that dtype (float32 state: float32 throughout). (nn.LSTM on a padded CPU batch runs
        oneDNN, whose autocast rule returns the autocast dtype; the packed call it replaces
        does not.)
        """
        cudnn = cudnn_autocast(x)
        if cudnn is not None:
            return cudnn
        if x.device.type == "cuda" and x.dtype != torch.float64:
            return torch.get_autocast_dtype("cuda")
        return hx.dtype

    def _state_shapes(self, B: int) -> list[tuple[int, int, int]]:
        LD = self.num_layers * (2 if self.bidirectional else 1)
        if len(self._state_messages) == 1:
            return [(LD, B, self.hidden_size)]
        return [(LD, B, self.proj_size or self.hidden_size), (LD, B, self.hidden_size)]

    # ----------------------------------------------------------------- forward
    def forward(self, input, hx=None, lengths=None):
        shortcut = self._eager_shortcut(input, hx, lengths)
        if shortcut is not None:
            return shortcut
        if isinstance(input, torch.fx.Proxy):
            return _fx_leaf_call(self, input, hx, lengths)
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "lengths must be None when input is a PackedSequence: the "
                    "PackedSequence carries its own lengths"
                )
            return self._forward_packed(input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(
                f"input must be a Tensor or a PackedSequence, got {type(input).__name__}"
            )
        if input.is_nested:
            if lengths is not None:
                raise ValueError(
                    "lengths must be None when input is a nested tensor: the nested "
                    "tensor carries its own lengths (its offsets)"
                )
            return self._forward_nested(input, hx)
        rank = input.dim()
        if rank != 3 and rank != 2:
            raise ValueError(self._rank_message.format(type(self).__name__, rank))
        batched = rank == 3
        batch_dim = 0 if self.batch_first else 1
        states = self._states_of(hx, batched)
        if not batched:
            input = input.unsqueeze(batch_dim)
            states = None if states is None else tuple(s.unsqueeze(1) for s in states)
        shape = input.shape
        B, T = shape[batch_dim], shape[1 - batch_dim]
        flat = self._flat_weights
        states = self._checked_states(states, input, B, flat)
        lengths = _inputs.as_lengths(lengths, B, T, input.device)
        grads = ops._need_workspace((input, *states, *flat))  # a backward is recorded
        valid = _inputs.valid_rows(lengths, input, T, B, self.batch_first, grads)
        if valid is not None:
            output, finals = self._run_valid_rows(input, states, valid, flat)
        else:
            output, finals = self._run(input, states, (lengths,), (self.batch_first,), flat)
        if not batched:
            output, finals = output.squeeze(batch_dim), tuple(f.squeeze(1) for f in finals)
        return output, self._result(finals)

    def _eager_shortcut(self, input, hx, lengths):
        """forward's shortcut for a decoder's step and other eager calls: a padded batch of
        one direction, every argument as forward's checks want it, nothing that changes the
        op or its dtypes (autocast, compile, tracing, torch.func, forward AD, dropout between
        layers). The same op calls with the same arguments as the full path, so the same
        results bit for bit (and, for a call that wants a gradient, the same graph: one
        recording op's node per layer); only what runs around them is less. Returns None,
        and forward takes its full path (which raises what is wrong), unless all of that
        holds.

        Why: such a call's time is the op's plus the Python around it, and between two steps
        of a decoder (an output layer, an embedding) that Python runs from cold caches, where
        the full path's many small functions cost a decoder's GRU step more than nn.GRU's
        whole step did ("Small calls" in benchmarks/README.md has the measurements)."""
        if (
            type(input) is not Tensor  # a PackedSequence, fx Proxy, nested or fake tensor
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or self.bidirectional
            or input.dim() != 3
            or input.is_nested
            or (self.training and self.dropout > 0 and self.num_layers > 1)
            or torch._C._functorch.get_interpreter_stack()
            or ops.fwAD._current_level >= 0
            or _inputs.autocast_on(input.device)
            or (torch.is_grad_enabled() and ops._compiled_autograd_on())  # ops._layer's choice
            # forward's choice of the valid rows for a training call with host lengths
            # (_inputs.valid_rows; lengths on the device keep the padded op and this shortcut)
            or (
                lengths is not None
                and input.device.type in _inputs.VALID_ROWS_DEVICES
                and torch.is_grad_enabled()
                and not (isinstance(lengths, Tensor) and lengths.device.type != "cpu")
            )
        ):
            return None
        flat = self._flat_weights
        dtype, device = input.dtype, input.device
        if input.shape[-1] != self.input_size:
            return None
        for w in flat:
            if w.dtype != dtype or w.device != device:
                return None
        B, T = (input.shape[0], input.shape[1]) if self.batch_first else input.shape[1::-1]
        expected = self._state_shapes(B)
        if hx is None:
            states = tuple(torch.zeros(s, dtype=dtype, device=device) for s in expected)
        elif len(expected) == 1:
            states = (hx,)
        elif type(hx) in (tuple, list) and len(hx) == 2:
            states = tuple(hx)
        else:
            return None
        for s, shape in zip(states, expected):
            if type(s) is not Tensor or s.shape != shape or s.dtype != dtype or s.device != device:
                return None
        lengths = _inputs.as_lengths(lengths, B, T, device)
        # _run's layer loop, less what it needs for the other calls (autocast's dtypes, two
        # directions, dropout, ops._layer's checks): through _run the shortcut saved about half
        # as much (greedy decoding, GRU B=1 and 8: 5-8 us a step against 15). Each layer
        # through the recording op, as ops._layer sends a one-direction call with or without a
        # gradient: it records a node where one is wanted.
        cell, options, L = CELLS[self._cell], self._options(), self.num_layers
        x, ends = input, []
        for layer in range(L):
            mine = states if L == 1 else [s[layer : layer + 1] for s in states]
            w = self._stacked(flat, layer, dtype, 1)
            args = (x, lengths, *mine, *w, *options, self.batch_first)
            x, *end = ops._layer_recording(cell, False, args, True)
            ends.append(end)
        finals = ends[0] if L == 1 else [torch.cat(f, 0) for f in zip(*ends)]
        return x, self._result(tuple(finals))

    def _run_valid_rows(self, input: Tensor, states, valid, flat: list):
        """A padded batch input [T, B, I] (or batch-first) run as the ragged rows of its valid
        positions (valid = _inputs.valid_rows'), the output [T, B, D*P] zero at padded
        positions, as the padded op returns it: the same numbers, and a training step keeps
        its per-position buffers for the valid rows only (on the CUDA backend the padded op
        keeps them for all T*B)."""
        rows, offsets, max_len = valid
        shape = input.shape
        x = input.reshape(shape[0] * shape[1], shape[2]).index_select(0, rows)  # [N, I]
        out, finals = self._run(x, states, (offsets, None, 0, max_len), (), flat)  # [N, D*P]
        padded = out.new_zeros(shape[0] * shape[1], out.shape[1]).index_copy(0, rows, out)
        return padded.view(shape[0], shape[1], out.shape[1]), finals

    def _forward_packed(self, packed: PackedSequence, hx):
        """PackedSequence.data [N, I] as it is (layout 1, time-major): the states stay in
        the caller's order, the op reads sorted_indices itself (what nn's permutations do)."""
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if data.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
        states = self._states_of(hx, batched=True)
        # batch_sizes lives on the CPU (PackedSequence keeps it there): no host sync. Under
        # jit tracing B and the step count stay values of the graph (batch_sizes[0] and
        # batch_sizes.size(0), as nn.GRU's packed path takes them), not constants of the
        # traced batch.
        if not batch_sizes.numel():
            B = 0
        elif torch.jit.is_tracing():
            B = batch_sizes[0]
        else:
            B = int(batch_sizes[0])
        flat = self._flat_weights
        states = self._checked_states(states, data, B, flat)
        index = (batch_sizes, sorted_indices, 1, batch_sizes.size(0))
        out, finals = self._run(data, states, index, (), flat)
        out = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
        return out, self._result(finals)

    def _forward_nested(self, input: Tensor, hx):
        """A jagged nested tensor's values [N, I] as they are (layout 0, sequence-major)."""
        values, offsets, max_len = _inputs.jagged_parts(input)
        states = self._states_of(hx, batched=True)
        flat = self._flat_weights
        states = self._checked_states(states, values, offsets.size(0) - 1, flat)
        out, finals = self._run(values, states, (offsets, None, 0, max_len), (), flat)
        # The same offsets tensor, so out's ragged dimension is input's (out + input works);
        # max_len goes along, so the next layer or module on out needs no host read to find it.
        out = torch.nested.nested_tensor_from_jagged(
            out, offsets, min_seqlen=input._maybe_min_seqlen, max_seqlen=max_len
        )
        return out, self._result(finals)

    def _checked_states(self, states, input: Tensor, B: int, flat: list[Tensor]):
        """Every check of input [..., I] and the states [L*D, B, P or H] in torch.nn's order
        (dtype, feature size, state shapes, devices) against flat (_flat_weights, read in
        this call); the states, or zeros where None."""
        _inputs.check_input(input, flat[0], self.input_size)  # flat[0]: weight_ih_l0
        expected = self._state_shapes(B)
        if states is not None:
            for s, shape, what in zip(states, expected, self._state_messages):
                _inputs.check_hx_shape(s, shape, what)
        _inputs.check_devices(input, flat, states or ())
        if states is None:
            return tuple(torch.zeros(s, dtype=input.dtype, device=input.device) for s in expected)
        for s, name in zip(states, ("hx", "cx")):
            _inputs.check_hx_dtype(s, input, name)
        return states

    def _run(self, x: Tensor, states: tuple[Tensor, ...], index: tuple, tail: tuple, flat: list):
        """The layer loop over x's layout: index = (lengths,) and tail = (batch_first,) for a
        padded batch, index = (seq_index, sorted_indices, layout, max_len) and tail = () for
        ragged rows [N, D*P] (varlen_rnn.ops' argument layout); flat = _flat_weights, read
        in this call. Returns (output, finals).

        Called for every step of a step-by-step decoder, so it does no work it can skip:
        no cast where the dtype already matches (.to would return the tensor itself), no
        slice of the states with one layer, the layer ops' shared body called directly."""
        D, L = self.num_directions, self.num_layers
        cell, ragged = CELLS[self._cell], len(index) == 4
        amp = _inputs.autocast_on(x.device)
        dtype = self._autocast_dtype(x, states[0]) if amp else x.dtype  # of the results
        compute = cpu_autocast_compute(x, dtype) if amp else dtype  # of the layer ops
        if x.dtype != compute:
            x = x.to(compute)
        states = [s if s.dtype == compute else s.to(compute) for s in states]
        options = self._options()
        ends = []  # per layer: its final states [D, B, .]
        apart = D == 2 and not ragged and _apart.directions_apart(x)
        for layer in range(L):
            mine = states if L == 1 else [s[layer * D : (layer + 1) * D] for s in states]
            if apart:
                w = [self._stacked(flat, layer, compute, 2, direction=d) for d in range(2)]
                x, *end = _apart.layer_apart(cell, x, index[0], mine, w, options, tail[0])
            else:
                w = self._stacked(flat, layer, compute, D)
                args = (x, *index, *mine, *w, *options, *tail)
                x, *end = ops._layer(cell, ragged, args, squeezed=D == 1)
            ends.append(end)
            if self.dropout > 0 and self.training and layer + 1 < L:
                x = F.dropout(x, self.dropout, training=True)
        finals = ends[0] if L == 1 else [torch.cat(f, 0) for f in zip(*ends)]
        if x.dtype != dtype:
            x = x.to(dtype)
        return x, tuple(f if f.dtype == dtype else f.to(dtype) for f in finals)


def _fx_leaf_call(module: RNNBase, input, hx, lengths):
    """torch.fx.symbolic_trace reaching our forward: one call_module node, as fx records for
    torch.nn's RNNs (its default Tracer keeps every torch.nn module a leaf, but it would trace
    into ours, whose checks cannot take a Proxy). The GraphModule then calls the module."""
    args = (input,) if hx is None else (input, hx)
    kwargs = {} if lengths is None else {"lengths": lengths}
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:  # the module itself is the root being traced: there is no call to record
        raise torch.fx.proxy.TraceError(
            f"torch.fx.symbolic_trace cannot trace varlen_rnn.{type(module).__name__} itself "
            "(its forward branches on its input, as nn.GRU's does); trace a model that holds "
            "it, where it becomes one call_module node, or use torch.export"
        )
    return tracer.create_proxy("call_module", path, args, kwargs)
