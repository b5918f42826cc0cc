"""Timing and memory primitives shared by the benchmarks.

Memory on CPU: torch's allocator keeps no statistics there and RSS mixes in the Python heap and
freed-but-cached pages, so peak memory is counted from torch.profiler's allocation events
(profile_memory=True): every tensor allocation and free inside the measured call, in order. The
running sum's maximum is the peak of torch tensor bytes allocated *on top of* what was live when
the call started. Callers add what was live and relevant (the decode state, the kv cache).
"""
import statistics
import time

from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn) -> int:
    """Peak bytes of torch tensors allocated by fn() above those live when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto's raw events carry signed sizes (+alloc, -free); FunctionEvent aggregates lose order.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def timed(fn):
    """(wall seconds, process CPU seconds) of fn(). With one torch thread the CPU time is the
    work itself: on a machine shared with other jobs it leaves out the time the process waited
    for a core, which wall time counts and which swamps differences between models."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(xs):
    return statistics.median(xs)


def medians(pairs):
    """Median wall and median CPU seconds of a list of timed() results."""
    return median([p[0] for p in pairs]), median([p[1] for p in pairs])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
