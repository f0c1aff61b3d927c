"""A process's peak memory, sampled from Linux's /proc while it runs (elsewhere nothing is sampled).

    with watch_memory(process.pid) as peaks:
        process.wait()
    peaks["VmHWM"], peaks["RssAnon"]       # bytes: peak resident memory, and its part apart from file pages
"""
import contextlib
import threading

SAMPLE_S = 0.05


@contextlib.contextmanager
def watch_memory(pid: int):
    peaks, stop = {}, threading.Event()

    def sample():
        while not stop.is_set():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        key, value = line.split(":", 1)
                        if key in ("VmHWM", "RssAnon"):
                            peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
            except (OSError, ValueError):
                pass
            stop.wait(SAMPLE_S)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()
