"""Speed: per-kernel microbenchmarks, training throughput, the loader, PyTorch comparison, the GPU check."""

import json
import os
import sys

EXIT_SETUP = 2
# The line a benchmark ends with when CuPy cannot compile our kernels (bench.gpu_check looks for it)
SETUP_STOP = "stopped: CudaSetupError: "


def write_json(result, path, indent=2, default=None, quiet=False):
    """A benchmark's result dict as JSON at `path` (written whole or not at all), and the line that
    says so (quiet: no line, for a partial result rewritten as a benchmark goes)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=indent, default=default)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def progress(who, text):
    """The line a benchmark prints as it starts a configuration: on a slow or stuck GPU run the log
    (and bench.gpu_check's console) shows how far it got."""
    print(f"[{who}] {text}", flush=True)


def stop_on_setup_error(who, main, argv=None):
    """Run a benchmark's main(argv); a CudaSetupError (NVRTC or a CUDA header missing: every other
    configuration would fail the same way) ends it at once with its one line and exit code 2."""
    from kernels.runtime.cuda_env import CudaSetupError
    try:
        return main(argv)
    except CudaSetupError as exc:
        print(f"{who}: {SETUP_STOP}{exc}", file=sys.stderr, flush=True)
        return EXIT_SETUP
