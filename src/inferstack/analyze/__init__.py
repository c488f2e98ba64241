"""``inferstack analyze``: find the best configuration of a model (like Triton's Model Analyzer).

It starts a server of its own on a temporary copy of the model, sweeps the
configuration (instance count with the thread split, ``max_batch_size``,
``preferred_batch_size``, ``max_queue_delay_microseconds``), measures every
candidate with the perf engine (:mod:`inferstack.perf`) and writes the one
with the highest throughput under a p99 latency budget as a ``config.pbtxt``.

* :mod:`~inferstack.analyze.grid`: the candidates and the time estimate;
* :mod:`~inferstack.analyze.configs`: candidate configs rendered from the model's own;
* :mod:`~inferstack.analyze.server`: the temporary repository and the server subprocess;
* :mod:`~inferstack.analyze.results`: the best-config choice, the table and the plot;
* :mod:`~inferstack.analyze.runner`: the command (``docs/perf.md#inferstack-analyze``).

Like :mod:`inferstack.perf` this is a client: it runs the server as a
subprocess and never imports it.
"""

from inferstack.analyze.grid import Candidate, build_grid
from inferstack.analyze.results import select_best
from inferstack.analyze.runner import AnalyzeSettings, run

__all__ = ["AnalyzeSettings", "Candidate", "build_grid", "run", "select_best"]
