"""Speed: per-kernel microbenchmarks, training throughput, the loader, PyTorch comparison, the GPU check."""

import json
import os

if os.environ.get("KERNELS_CUDASIM", "").strip() not in ("", "0"):
    import kernels  # noqa: F401  (the simulated GPU becomes `cupy` before a benchmark imports CuPy)


def write_json(result, path, indent=2, default=None):
    """A benchmark's result dict as JSON at `path`, and the line that says so."""
    with open(path, "w") as f:
        json.dump(result, f, indent=indent, default=default)
    print(f"wrote {path}")
