"""Timing and memory primitives shared by the benchmarks. Peak memory on CPU (torch's allocator keeps
no statistics there, and RSS mixes in the Python heap) is the running peak of torch.profiler's
allocation events (+bytes, -bytes) inside the measured call, above what was live when it started."""
import itertools
import time

from torch.profiler import ProfilerActivity, profile

from tools.kit import human_bytes


def peak_bytes(fn) -> int:
    """Peak bytes of torch tensors allocated by fn() above those live when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto's raw events keep the order of allocations and frees; FunctionEvent aggregates lose it.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(itertools.accumulate((nbytes for _, nbytes in events), initial=0))


def timed(fn):
    """(wall seconds, process CPU seconds) of fn(). With one torch thread the CPU time is the work
    itself: it leaves out the time the process waited for a core on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def row_line(row):
    """A measured row as one progress line: bytes in binary units, other floats to 3 significant digits."""
    def show(key, value):
        return human_bytes(value) if key.endswith("bytes") else f"{value:.3g}" if isinstance(value, float) else value
    return "  " + ", ".join(f"{key} {show(key, value)}" for key, value in row.items())
