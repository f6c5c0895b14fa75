"""gptfast's benchmark harness: `gptfast bench` / `python -m gptfast.bench`, and the pytest-benchmark suites.

runner.run() measures this device's ceilings, runs each op's suite (softmax, cross_entropy,
linear_cross_entropy, attention, model) against its peers, checks every timed result against the reference,
and writes report.md, results.json and PNG plots. timing.time_fn, memory.peak_bytes and ceilings.measure are
the building blocks.
"""

from .core import Inputs, Peer, Row, Settings, Skip
from .runner import OPS, run
from .timing import Budget, Timing, time_fn

__all__ = ["OPS", "Budget", "Inputs", "Peer", "Row", "Settings", "Skip", "Timing", "run", "time_fn"]
