"""What starting a ggml graph costs after a pause (issue 35: is a layer's graph count worth cutting?).

A one-op graph (two 2048-float vectors added) on the 2-thread pool, computed 400 times after a
busy pause of 0, 50, 200 and 1000 us: the median time of compute(). With libgomp's spinning cut
short (GOMP_SPINCOUNT=10000, as the loader sets it for a mixture of experts) the worker sleeps
in a long pause and the next graph waits for it to wake.

    GOMP_SPINCOUNT=10000 PYTHONPATH=. python studies/graph_launch.py
"""

import time

import numpy as np

from flashcli.engine import ggml

pool = ggml.ThreadPool(2)
g = ggml.Graph(pool, max_nodes=8)
a_t, a = g.input(2048, 1)
b_t, b = g.input(2048, 1)
g.output(g.L.add(g.ctx, a_t, b_t))
g.finish()
for pause_us in (0, 50, 200, 1000):
    times = []
    for _ in range(400):
        t0 = time.perf_counter_ns()
        while time.perf_counter_ns() - t0 < pause_us * 1000:
            pass
        t = time.perf_counter()
        g.compute()
        times.append(time.perf_counter() - t)
    print(f"pause {pause_us} us: median compute {np.median(times) * 1e6:.1f} us")
