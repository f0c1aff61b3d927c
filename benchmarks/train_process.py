"""train.py in a process of its own, as a user runs it, for bench.py and its scale part.

    done = run_train_py(config, "tmp/config.yaml")
    done["reported_s"], done["wall_s"], done["peaks"]["VmHWM"], done["peak_gpu_bytes"], done["stderr"]
"""
import os
import subprocess
import sys
import time

import yaml

from benchmarks.memory import watch_memory
from utils import REPO_ROOT


def run_train_py(config, config_path: str) -> dict:
    """Writes config to config_path and trains with it. Returns the time train.py reports on its "done:" line
    (start to last checkpoint), the process's wall time, its peak memory (benchmarks.memory), the peak GPU
    memory the done line reports (None without it) and its stderr."""
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "train.py"), "--config", config_path], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with watch_memory(process.pid) as peaks:
        _, err = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"train.py failed ({process.returncode}): {err.strip().splitlines()[-3:]}")
    done = [line for line in err.splitlines() if line.startswith("done: ")][-1]
    gpu = float(done.split("peak GPU memory ")[1].split(" GiB")[0]) * 2**30 if "peak GPU memory" in done else None
    return {"reported_s": float(done.rsplit("(", 1)[1].split(" s")[0]), "wall_s": wall, "peaks": peaks,
            "peak_gpu_bytes": gpu, "stderr": err}
