"""The stream of tensors read ahead of the computation (flashcli/flash/streaming.py)."""

from __future__ import annotations

import threading
import warnings

import numpy as np

from flashcli.flash.streaming import Span, TensorStream

SPAN = 64 << 10


def _stream(tmp_path) -> tuple[TensorStream, np.ndarray]:
    data = np.random.default_rng(0).integers(0, 256, 4 * SPAN, dtype=np.uint8)
    path = tmp_path / "tensors.bin"
    data.tofile(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a file system refusing O_DIRECT: buffered reads
        stream = TensorStream(path, [Span(i * SPAN, SPAN) for i in range(4)], capacity=2 * SPAN, threads=2)
    return stream, data


def test_reads_each_tensor_in_order_across_passes(tmp_path):
    import ctypes

    stream, data = _stream(tmp_path)
    try:
        for i in range(8):  # two passes: the ring wraps and reads the cycle again
            entry = stream.acquire()
            got = np.frombuffer((ctypes.c_uint8 * SPAN).from_address(entry.address), np.uint8)
            assert np.array_equal(got, data[(i % 4) * SPAN : (i % 4 + 1) * SPAN]), f"tensor {i}"
            stream.release()
    finally:
        stream.close()


def test_finalizer_never_waits_for_a_thread(tmp_path):
    """The garbage collector may run a finalizer inside threading's bookkeeping, with
    threading._shutdown_locks_lock held: a finalizer that joined the stream's threads there
    deadlocked, and every thread started afterwards hung with it (CI: a conversion's reader
    pool waiting forever in Thread.start). Holding that lock here, the finalizer must return."""
    stream, _ = _stream(tmp_path)
    stream.acquire()
    stream.release()
    with stream._lock:  # as when it is garbage: no read queued or running (one would hold it)
        stream._lock.wait_for(lambda: all(seq in stream._ready for seq, *_ in stream._live))
    finalizer = threading.Thread(target=stream.__del__, daemon=True)  # a daemon takes no shutdown lock to start
    with threading._shutdown_locks_lock:
        finalizer.start()
        finalizer.join(10)
        stuck = finalizer.is_alive()
    finalizer.join()
    assert not stuck, "TensorStream.__del__ waited for a thread while threading's shutdown lock was held"
