"""Which varlen_rnn the benchmarks import: the checkout's own package when it is built in place
(setup.py build_ext --inplace puts the extension varlen_rnn/_C*.so beside the sources), so a run
measures the code of the commit it reports, not an older installed copy; otherwise the installed
varlen_rnn (pip install .). The results record which one ran (bench_report.machine_info)."""

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def put_varlen_rnn_on_path() -> None:
    """This folder first (the sibling modules), then the checkout ahead of site-packages if it
    is built in place, else behind it. Entries already on sys.path stay where they are."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    if glob.glob(os.path.join(ROOT, "varlen_rnn", "_C*")):
        sys.path.insert(1, ROOT)
    else:
        sys.path.append(ROOT)
