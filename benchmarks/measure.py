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
    """A measured row as one progress line, units on the values: state_bytes 33792 -> `state 33.0 KiB`,
    step_s 0.00055 -> `step 0.55 ms`; other floats to 3 significant digits."""
    def show(key, value):
        if key.endswith("_bytes"):
            return f"{key[:-len('_bytes')]} {human_bytes(value)}"
        if key.endswith("_s"):
            return f"{key[:-len('_s')]} {1000 * value:.2f} ms"
        return f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
    return "  " + ", ".join(show(key, value) for key, value in row.items())

