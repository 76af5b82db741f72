"""A decoder's loop, one call per step: out, h = rnn(x_t, h) for t in range(T), the state
carried between calls. Training (the default): then the loss of every step's output
differentiated back through the chain (teacher forcing), x_t requiring grad as an embedding's
output does. --inference: the loop alone under torch.inference_mode (greedy decoding's calls),
e.g. in bfloat16 (--dtype bfloat16). --inference --vocab V: greedy decoding as a model runs it,
an embedding of V tokens feeding each step and a Linear onto V logits and their argmax after it,
so the step's weights compete for the caches with that work; the same loop with the RNN left out
is timed too, and the RNN's time is the difference (its share); the RNN's calls are also timed
where they run (in place), which leaves out what a call does to the time of the step's other work. varlen_rnn against torch.nn on the same
inputs (T=1 calls need no lengths, so nn runs without packing); medians of
torch.utils.benchmark, the competitors interleaved; a markdown table on stdout and in
benchmarks/results/decoder-loop_cpu_<date>.md (decoder-loop-inference_... with --inference).

    python benchmarks/bench_decoder_loop.py --threads 2
    python benchmarks/bench_decoder_loop.py --inference --dtype bfloat16 --batches 1 8 32 64
    python benchmarks/bench_decoder_loop.py --inference --vocab 10000 --cells GRU
    python benchmarks/bench_decoder_loop.py --inference --vocab 10000 --full-path --rounds 9

--gemm kernel mkl times ours under VARLEN_RNN_CPU_GEMM=kernel and =mkl as well (the CPU products'
choice forced each way, against the build's own choice), interleaved in one process.
--full-path times ours without forward's eager shortcut as well (the full path, as before
that shortcut; training loops too since it takes calls that record a graph), --rounds R repeats the interleaved timing R times (medians over them), each round in another order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_report  # noqa: E402
import checkout  # noqa: E402

checkout.put_varlen_rnn_on_path()  # the checkout's build if built in place, else the installed
import varlen_rnn  # noqa: E402


def _no_shortcut(self, *args):
    """RNNBase._eager_shortcut declining every call: forward's full path."""
    return None


def greedy_of(module, emb, head, first, T: int, in_place: bool = False):
    """T steps of greedy decoding from the tokens `first` [B]: x = emb(token) [1, B, H], one
    step of module (None: no RNN, the step's output is x itself), the argmax of head's logits
    the next token. in_place: decode() returns the module's calls' own time per step (s), each
    call timed with perf_counter where it runs: what the call costs among the step's other work,
    without what it does to the time of that work (which the share includes)."""

    def decode():
        spent = 0.0
        with torch.inference_mode():
            h, tok = None, first
            for _ in range(T):
                x = emb(tok).unsqueeze(0)
                t0 = time.perf_counter() if in_place else 0.0
                out, h = (x, None) if module is None else module(x, h)
                if in_place:
                    spent += time.perf_counter() - t0
                tok = head(out[0]).argmax(-1)
        return spent / T

    return decode


def with_gemm(setting: str, loop):
    """loop run under VARLEN_RNN_CPU_GEMM=setting (read by the kernels at each call)."""

    def run():
        before = os.environ.get("VARLEN_RNN_CPU_GEMM")
        os.environ["VARLEN_RNN_CPU_GEMM"] = setting
        try:
            loop()
        finally:
            if before is None:
                os.environ.pop("VARLEN_RNN_CPU_GEMM")
            else:
                os.environ["VARLEN_RNN_CPU_GEMM"] = before

    return run


def loop_of(module, xs, inference: bool):
    def step():
        h, outs = None, []
        for x in xs:
            out, h = module(x, h)
            outs.append(out)
        torch.stack(outs).sum().backward()

    def decode():
        with torch.inference_mode():
            h = None
            for x in xs:
                _, h = module(x, h)

    return decode if inference else step


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--cells", nargs="+", default=["GRU", "LSTM"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--inference", action="store_true", help="no backward, inference mode")
    p.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="with --inference: greedy decoding with an embedding and an output layer of this "
        "many tokens around each step (0: the steps alone)",
    )
    p.add_argument(
        "--full-path",
        action="store_true",
        help="ours without forward's eager shortcut as well (RNNBase._eager_shortcut), the "
        "shortcut's before and after in one process",
    )
    p.add_argument(
        "--gemm",
        nargs="+",
        default=[],
        choices=["kernel", "mkl"],
        help="ours under VARLEN_RNN_CPU_GEMM=SETTING as well (the CPU products' choice forced), "
        "beside ours as built (not with --vocab)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="interleaved rounds of every competitor; a time is the median over the rounds",
    )
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    if args.vocab and not args.inference:
        p.error("--vocab needs --inference (greedy decoding)")
    if args.vocab and args.gemm:
        p.error("--gemm is for the loops without --vocab")
    torch.set_num_threads(args.threads)
    H, T = args.hidden, args.steps
    rows = []
    for cell in args.cells:
        for B in args.batches:
            torch.manual_seed(0)
            dtype = getattr(torch, args.dtype)
            ref = getattr(torch.nn, cell)(H, H).to(dtype)
            ours = getattr(varlen_rnn, cell).from_torch(ref)
            xs = torch.randn(T, 1, B, H).to(dtype).requires_grad_(not args.inference).unbind(0)
            competitors = {"nn": ref, "ours": ours}
            if args.full_path:
                full = type(f"Full{cell}", (type(ours),), {"_eager_shortcut": _no_shortcut})
                competitors["full"] = full.from_torch(ref)
            if args.vocab:
                emb = torch.nn.Embedding(args.vocab, H).to(dtype)
                head = torch.nn.Linear(H, args.vocab).to(dtype)
                first = torch.randint(
                    0, args.vocab, (B,), generator=torch.Generator().manual_seed(B)
                )
                competitors["rest"] = None  # the loop without the RNN
                loops = {k: greedy_of(m, emb, head, first, T) for k, m in competitors.items()}
            else:
                loops = {k: loop_of(m, xs, args.inference) for k, m in competitors.items()}
                for setting in args.gemm:
                    loops[f"ours {setting}"] = with_gemm(setting, loop_of(ours, xs, args.inference))
            rounds = {name: [] for name in loops}
            for r in range(args.rounds):
                names = list(loops)  # each round in another order: no competitor always first
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    loop = loops[name]
                    t = Timer("step()", globals={"step": loop}, num_threads=args.threads)
                    run = t.blocked_autorange(min_run_time=args.min_run_time)
                    rounds[name].append(run.median / T)
            times = {name: statistics.median(v) for name, v in rounds.items()}
            if args.vocab:  # the calls timed in place, 10 decodes a competitor a round, interleaved
                placed = {
                    k: greedy_of(m, emb, head, first, T, in_place=True)
                    for k, m in competitors.items()
                    if k != "rest"
                }
                spent = {k: [] for k in placed}
                for _ in range(10 * args.rounds):
                    for k, decode in placed.items():
                        spent[k].append(decode())
                times.update({f"{k} in place": statistics.median(v) for k, v in spent.items()})
            if args.vocab:  # each round's share, less noisy than the difference of medians
                times.update(
                    {
                        f"{name} share": statistics.median(
                            a - b for a, b in zip(rounds[name], rounds["rest"])
                        )
                        for name in rounds
                        if name != "rest"
                    }
                )
            print(
                f"{cell} B={B} H={H}: "
                + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in times.items())
            )
            rows.append((cell, B, times))
    what = (
        "under torch.inference_mode; median time per step, us."
        if args.inference
        else "forward and backward through the chain; median time\nper step (forward + its"
        " share of the backward), us."
    )
    if args.vocab:
        what = (
            f"greedy decoding over {args.vocab} tokens (embedding -> step -> Linear -> argmax), "
            "under torch.inference_mode;\nmedian time per step, us; the RNN's share = the "
            "step's time minus that of the loop without the RNN; in place: the RNN's call alone,\n"
            "timed where it runs in the same loop (median of 10 decodes a round, interleaved)."
        )
        full_head = (
            " varlen_rnn without the shortcut (its share) | speedup |" if args.full_path else ""
        )
        lines = [
            f"T={T} calls of one step (I=H={H}, {args.dtype}), {what}",
            "",
            "| cell | B | without an RNN | torch.nn (its share) | varlen_rnn (its share) | "
            "speedup of the shares |" + full_head + " in place: torch.nn → varlen_rnn |",
            "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.full_path else "") + "---:|",
        ]
        for cell, B, t in rows:
            cells = [f"{cell}", f"{B}", f"{t['rest'] * 1e6:.0f}"]
            for name in ("nn", "ours", "full") if args.full_path else ("nn", "ours"):
                cells.append(f"{t[name] * 1e6:.0f} ({t[name + ' share'] * 1e6:.0f})")
                if name != "nn":
                    share = t[name + " share"]
                    cells.append(f"{t['nn share'] / share:.2f}x" if share > 0 else "-")
            placed = t["nn in place"], t["ours in place"]
            cells.append(
                f"{placed[0] * 1e6:.0f} → {placed[1] * 1e6:.0f} ({placed[0] / placed[1]:.2f}x)"
            )
            lines.append("| " + " | ".join(cells) + " |")
    else:
        ours_names = ["ours"] + (["full"] if args.full_path else [])
        ours_names += [f"ours {setting}" for setting in args.gemm]
        heads = {"full": "varlen_rnn without the shortcut"}
        heads |= {f"ours {g}": f"varlen_rnn, VARLEN_RNN_CPU_GEMM={g}" for g in args.gemm}
        lines = [
            f"T={T} calls of one step (I=H={H}, {args.dtype}), {what}",
            "",
            "| cell | B | torch.nn | varlen_rnn | speedup |"
            + "".join(f" {heads[n]} | speedup |" for n in ours_names[1:]),
            "|---|---:|---:|---:|---:|" + "---:|---:|" * (len(ours_names) - 1),
        ]
        for cell, B, t in rows:
            cells = [f"{cell}", f"{B}", f"{t['nn'] * 1e6:.0f}"]
            for name in ours_names:
                cells += [f"{t[name] * 1e6:.0f}", f"{t['nn'] / t[name]:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    kind, title = (
        ("decoder-loop-inference", "A decoder's inference loop, one call per step")
        if args.inference
        else ("decoder-loop", "A decoder's training loop, one call per step")
    )
    return bench_report.write_table(
        args.out,
        kind,
        title,
        args.threads,
        lines,
    )


if __name__ == "__main__":
    main()
