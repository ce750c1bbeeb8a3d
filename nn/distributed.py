"""Communicators: one process per device, started by MPI, collectives between them.

    mpiexec -n 8 python train.py ...            # one node, 8 GPUs (or 8 CPU processes)

    comm = nn.distributed.init(device="cuda")    # backend: nccl on cuda, mpi on cpu, single alone
    comm.allreduce_(array)                       # in place, summed over the ranks
How training uses them (DataParallel, bucketed all-reduce, synchronised BN) is nn/data_parallel.py.

Backends (all share the `Communicator` interface; mpi4py and CuPy are imported only when used):
    single  world_size 1, no MPI needed: every collective is a no-op.
    mpi     mpi4py on NumPy arrays (CuPy arrays are staged through the host): the CPU path, and
            the one the tests run with 2 ranks.
    nccl    cupy.cuda.nccl for CuPy arrays (rank 0 makes the unique id, MPI broadcasts it; each
            rank takes GPU local_rank % visible GPUs, see choose_gpu); NumPy arrays (counts, ids)
            still go through MPI. NCCL itself is a wheel (nvidia-nccl-cu12/-cu13), in the gpu extras.

Failure handling (a job must stop, not hang):
    - an unhandled exception on any rank prints its traceback and aborts every rank;
    - a watchdog (heartbeats over TCP between rank 0 and each rank) names a rank whose process is
      gone (its connection closes without a goodbye) or frozen (no heartbeat for
      `heartbeat_timeout` s) or stuck (the others entered collective #k `collective_timeout` s
      ago and it has not), prints that and calls MPI_Abort, which makes mpiexec end the job;
    - every wait for a collective has a deadline as well.
Timeouts come from init(...) or the environment: MLPERF_DIST_HEARTBEAT (interval, 1 s),
MLPERF_DIST_HEARTBEAT_TIMEOUT (30 s), MLPERF_DIST_COLLECTIVE_TIMEOUT (600 s).
"""

import atexit
import os
import signal
import socket
import sys
import threading
import time

import numpy as np

from nn.watchdog import Watchdog

__all__ = ["init", "current", "is_main", "Communicator", "MpiCommunicator", "NcclCommunicator",
           "launched_world_size", "choose_gpu", "shared_gpus", "nccl_module"]

_OPS = ("sum", "max", "min", "prod")
_current = None


# ------------------------------------------------------------------------------------------------
# launch detection and init

_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def launched_world_size():
    """The number of ranks the MPI launcher started (from its environment), or 1 when this process
    was not started by mpiexec/mpirun (MPICH/Hydra, Open MPI, MVAPICH, PMIx launchers)."""
    for var in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def _env_float(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number of seconds, got {value!r}") from None


def init(backend="auto", device="cpu", heartbeat=None, heartbeat_timeout=None, collective_timeout=None,
         watchdog=True):
    """Start (or return the already started) communicator of this process.

    backend: 'auto' (single when not launched by MPI with more than one rank; else nccl for
             device 'cuda', mpi otherwise), 'single', 'mpi' or 'nccl'.
    device: 'cpu', 'emu' or 'cuda' (only used by 'auto').
    heartbeat, heartbeat_timeout, collective_timeout: watchdog seconds (see the module docstring);
             None takes the environment or the defaults 1, 30, 600.
    watchdog: False turns the heartbeat thread off (deadlines on collective waits stay).
    -> a Communicator (also remembered for current() and is_main()).
    """
    global _current
    if backend not in ("auto", "single", "mpi", "nccl"):
        raise ValueError(f"backend must be 'auto', 'single', 'mpi' or 'nccl', got {backend!r}")
    if _current is not None:
        return _current
    if backend == "auto":
        backend = "single" if launched_world_size() <= 1 else ("nccl" if str(device) == "cuda" else "mpi")
    timeouts = dict(heartbeat=heartbeat if heartbeat is not None else _env_float("MLPERF_DIST_HEARTBEAT", 1.0),
                    heartbeat_timeout=(heartbeat_timeout if heartbeat_timeout is not None
                                       else _env_float("MLPERF_DIST_HEARTBEAT_TIMEOUT", 30.0)),
                    collective_timeout=(collective_timeout if collective_timeout is not None
                                        else _env_float("MLPERF_DIST_COLLECTIVE_TIMEOUT", 600.0)))
    for name, value in timeouts.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value}")
    if backend == "single":
        _current = Communicator()
    elif backend == "mpi":
        _current = MpiCommunicator(watchdog=watchdog, **timeouts)
    else:
        _current = NcclCommunicator(watchdog=watchdog, **timeouts)
    return _current


def current():
    """The communicator init() made, or None before init()."""
    return _current


def is_main(comm=None):
    """True on rank 0 (the rank that writes logs, metrics, plots and checkpoints), and in a
    process that never called init()."""
    comm = comm if comm is not None else _current
    return comm is None or comm.rank == 0


# ------------------------------------------------------------------------------------------------
# communicators


def _is_cupy(array):
    return type(array).__module__.split(".")[0] == "cupy"


def _check_op(op):
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")


class _Done:
    """A finished request (what single and the blocking paths return from iallreduce_)."""

    def wait(self):
        return None


class Communicator:
    """World size 1: the interface every backend has, with nothing to communicate.

    Attributes: backend ('single', 'mpi', 'nccl'), rank, world_size, local_rank (index of this
    process on its node: picks the GPU), local_size, host, collectives (how many collectives this
    process has entered: the watchdog compares it across ranks).
    Arrays are NumPy or CuPy, contiguous; collectives ending in _ work IN PLACE and return the array.
    """

    backend = "single"

    def __init__(self):
        self.rank, self.world_size, self.local_rank, self.local_size = 0, 1, 0, 1
        self.host = socket.gethostname()
        self.collectives = 0

    def allreduce_(self, array, op="sum"):
        """Reduce `array` element-wise over all ranks (op 'sum', 'max', 'min' or 'prod'), IN PLACE."""
        _check_op(op)
        return array

    def iallreduce_(self, array, op="sum"):
        """Start allreduce_(array) without waiting: -> a request with .wait(). Leave `array` alone
        until wait() returns."""
        self.allreduce_(array, op)
        return _Done()

    def bcast_(self, array, root=0):
        """Overwrite `array` on every rank with rank `root`'s, IN PLACE."""
        self._check_root(root)
        return array

    def allgather(self, array):
        """Every rank's `array` (same shape everywhere) -> a new array [world_size, *shape]."""
        return array.copy()[None]

    def allgather_object(self, obj):
        """Every rank's picklable `obj` -> a list indexed by rank."""
        return [obj]

    def barrier(self):
        """Return once every rank has called barrier()."""

    def assert_same(self, value, what):
        """Raise ValueError naming the ranks whose `value` (picklable, e.g. a config dict) differs
        from rank 0's. Collective."""
        values = self.allgather_object(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise ValueError(f"{what} differs between ranks: rank 0 has {values[0]!r}, rank(s) {odd} have "
                             f"{[values[r] for r in odd]!r}")

    def abort(self, message, code=1):
        """Print `message` naming this rank and stop the whole job (all ranks)."""
        sys.stderr.write(f"[dist] rank {self.rank}/{self.world_size}: {message}\n")
        sys.stderr.flush()
        os._exit(code)

    def close(self):
        """Stop the watchdog (saying goodbye, so that no rank reports this one as dead)."""

    def _check_root(self, root):
        if not 0 <= int(root) < self.world_size:
            raise ValueError(f"root must be a rank in [0, {self.world_size}), got {root}")

    def __repr__(self):
        return (f"{type(self).__name__}(backend='{self.backend}', rank={self.rank}, world_size={self.world_size}, "
                f"local_rank={self.local_rank}, host='{self.host}')")


class _MpiRequest:
    def __init__(self, comm, request, what, after=None):
        self.comm, self.request, self.what, self.after = comm, request, what, after

    def test(self):
        return self.request is None or self.request.Test()

    def wait(self):
        if self.request is not None:
            self.comm._wait(self.request.Test, self.what)
            self.request = None
            if self.after is not None:
                self.after()


class MpiCommunicator(Communicator):
    """Collectives through mpi4py on MPI_COMM_WORLD (a duplicate of it, so that nothing else in the
    process can mix messages with ours). Waits poll with a deadline (collective_timeout)."""

    backend = "mpi"

    def __init__(self, heartbeat=1.0, heartbeat_timeout=30.0, collective_timeout=600.0, watchdog=True):
        super().__init__()
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise RuntimeError(f"the mpi backend needs mpi4py and an MPI library: pip install -e '.[test]' "
                               f"(mpich + mpi4py), or pip install mpi4py against your cluster's MPI ({e})") from e
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.collective_timeout = float(collective_timeout)
        # a rank's own wait gives up a little after rank 0's watchdog would have named the culprit
        self.wait_deadline = self.collective_timeout + (2 * float(heartbeat_timeout) if watchdog else 0.0)
        self._mpi_ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}
        self._install_failure_handlers()
        atexit.register(self.close)          # a normal exit says goodbye to the watchdogs
        self.watchdog = None
        if watchdog and self.world_size > 1:
            self.watchdog = Watchdog(self, heartbeat, heartbeat_timeout, collective_timeout)
        # one line that maps ranks to processes (launchers name failed processes by pid)
        where = self.comm.allgather((os.getpid(), self.host))
        if self.rank == 0 and self.world_size > 1:
            sys.stderr.write(f"[dist] {self.world_size} ranks ({self.backend}): " +
                             ", ".join(f"rank {r} pid {pid} on {host}" for r, (pid, host) in enumerate(where)) + "\n")
            sys.stderr.flush()

    # -- failure handling ------------------------------------------------------------------------

    def _install_failure_handlers(self):
        if self.world_size <= 1:
            return
        previous_hook = sys.excepthook

        def excepthook(kind, value, tb):
            previous_hook(kind, value, tb)
            self.abort(f"unhandled {kind.__name__} (traceback above); stopping all ranks")
        sys.excepthook = excepthook
        # MPICH's launcher sends SIGUSR1 to the survivors when a rank dies (with
        # -disable-auto-cleanup); its default action would kill us silently, before the watchdog
        # could say which rank died.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            def on_peer_failure(signum, frame):
                if self.watchdog is None:
                    self.abort("the MPI launcher reports that another rank failed; stopping")
            signal.signal(signal.SIGUSR1, on_peer_failure)

    def abort(self, message, code=1):
        """Print `message` naming this rank, then MPI_Abort: the launcher ends every rank."""
        sys.stderr.write(f"[dist] rank {self.rank}/{self.world_size}: {message}\n")
        sys.stderr.flush()
        time.sleep(0.5)       # let the launcher forward the line before it tears the job down
        self.MPI.COMM_WORLD.Abort(code)

    def _wait(self, done, what):
        """Poll done() until it is true, sleeping a little longer each time (MPI progresses inside
        the polls); abort with a message past the deadline."""
        deadline = time.monotonic() + self.wait_deadline
        pause, polls = 0.0, 0
        while not done():
            polls += 1
            if polls > 100:
                pause = min(0.005, max(pause * 2, 5e-5))
                if time.monotonic() > deadline:
                    self.abort(f"{what} (collective #{self.collectives}) did not complete within "
                               f"{self.wait_deadline:g} s: another rank is dead or stuck, or the network "
                               f"failed (rank 0's watchdog names a rank that is behind)")
            time.sleep(pause)

    # -- collectives -----------------------------------------------------------------------------

    def _host_view(self, array, what):
        if not (array.flags.c_contiguous):
            raise ValueError(f"{what}: array must be C-contiguous, got strides {array.strides}")
        return array.reshape(-1)

    def iallreduce_(self, array, op="sum"):
        _check_op(op)
        self.collectives += 1
        if _is_cupy(array):       # no CUDA-aware MPI assumed: stage through the host
            host = array.get()
            self.comm.Allreduce(self.MPI.IN_PLACE, host.reshape(-1), op=self._mpi_ops[op])
            array.set(host)
            return _Done()
        flat = self._host_view(array, "allreduce_")
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, flat, op=self._mpi_ops[op])
        return _MpiRequest(self, request, "allreduce")

    def allreduce_(self, array, op="sum"):
        self.iallreduce_(array, op).wait()
        return array

    def bcast_(self, array, root=0):
        self._check_root(root)
        self.collectives += 1
        if _is_cupy(array):
            host = array.get()
            self._wait(self.comm.Ibcast(host.reshape(-1), root=root).Test, "bcast")
            array.set(host)
            return array
        self._wait(self.comm.Ibcast(self._host_view(array, "bcast_"), root=root).Test, "bcast")
        return array

    def allgather(self, array):
        self.collectives += 1
        source = array.get() if _is_cupy(array) else np.ascontiguousarray(array)
        out = np.empty((self.world_size,) + source.shape, dtype=source.dtype)
        self._wait(self.comm.Iallgather(source.reshape(-1), out.reshape(self.world_size, -1)).Test, "allgather")
        if _is_cupy(array):
            import cupy
            return cupy.asarray(out)
        return out

    def allgather_object(self, obj):
        self.collectives += 1
        return self.comm.allgather(obj)

    def barrier(self):
        self.collectives += 1
        self._wait(self.comm.Ibarrier().Test, "barrier")

    def close(self):
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None


class _NcclRequest:
    def __init__(self, comm, event):
        self.comm, self.event = comm, event

    def wait(self):
        # The GPU waits, not the host: later work on the current stream is ordered after the
        # all-reduce, and the host goes on queueing (a hung peer is the watchdog's business).
        import cupy
        cupy.cuda.get_current_stream().wait_event(self.event)


def choose_gpu(local_rank, device_count):
    """The index (among the GPUs this process sees) of the GPU for the rank `local_rank` of its node:
    local_rank % device_count. Works with both kinds of launchers: those that show every rank all
    of the node's GPUs (mpirun: rank i takes GPU i) and those that show each rank only its own
    (Slurm, most schedulers, CUDA_VISIBLE_DEVICES per rank: every rank takes its GPU 0)."""
    if device_count < 1:
        raise RuntimeError(f"rank {local_rank} of this node sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
    return int(local_rank) % int(device_count)


def shared_gpus(placements):
    """placements: one (host, GPU identity such as its PCI bus id) per rank, indexed by rank ->
    [(host, gpu, [ranks])] for every GPU that more than one rank would use (NCCL refuses that)."""
    users = {}
    for rank, (host, gpu) in enumerate(placements):
        if gpu is not None:
            users.setdefault((host, gpu), []).append(rank)
    return [(host, gpu, ranks) for (host, gpu), ranks in users.items() if len(ranks) > 1]


def nccl_module():
    """CuPy's NCCL binding (cupy.cuda.nccl), or a RuntimeError naming the package that provides the
    library. CuPy's wheels do not ship NCCL: `from cupy.cuda import nccl` imports anyway, with
    `nccl.available == False` and none of its functions."""
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        if getattr(sys.modules.get("cupy"), "__cudasim__", False):    # KERNELS_CUDASIM=1: the error says so
            raise RuntimeError(f"the nccl backend (several GPUs): {e}") from e
        raise RuntimeError(f"the nccl backend (several GPUs) needs CuPy: {_nccl_install_hint()} ({e})") from e
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        raise RuntimeError(f"the nccl backend (several GPUs) needs the NCCL library, which CuPy could not "
                           f"load: {_nccl_install_hint()}")
    return nccl


def _nccl_install_hint():
    from kernels.runtime.cuda_env import cupy_wheel_cuda_major, gpu_extra_for
    major = cupy_wheel_cuda_major()
    if major is None:
        return ('pip install nvidia-nccl-cu12 (or -cu13, -cu11: the CUDA of your CuPy wheel; '
                'the gpu extras bring it: README.md, "On a GPU")')
    extra = gpu_extra_for(major)
    return f'pip install nvidia-nccl-cu{major} (the {extra} extra brings it: pip install -e ".[{extra}]")'



class NcclCommunicator(MpiCommunicator):
    """CuPy arrays through NCCL, everything else through MPI. Each rank uses GPU
    choose_gpu(local_rank, visible GPUs); the NCCL unique id is made on rank 0 and broadcast over
    MPI. allreduce_/bcast_ run on the current stream; iallreduce_ on a side stream (`comm_stream`)
    after the work queued so far on the current stream, so backward goes on while the gradients
    travel."""

    backend = "nccl"

    def __init__(self, heartbeat=1.0, heartbeat_timeout=30.0, collective_timeout=600.0, watchdog=True):
        nccl = nccl_module()      # before MPI starts: a missing library is one clear error on every rank
        super().__init__(heartbeat, heartbeat_timeout, collective_timeout, watchdog)
        import cupy
        gpu = choose_gpu(self.local_rank, cupy.cuda.runtime.getDeviceCount())
        cupy.cuda.Device(gpu).use()
        try:
            identity = cupy.cuda.Device(gpu).pci_bus_id
        except Exception:     # a driver that does not say: NCCL's own check remains
            identity = None
        clashes = shared_gpus(self.allgather_object((self.host, identity)))
        if clashes:
            host, bus, ranks = clashes[0]
            raise RuntimeError(f"ranks {ranks} on host {host} would share the GPU at {bus}: start at most one "
                               f"rank per GPU (this node has {self.local_size} ranks; each sees "
                               f"{cupy.cuda.runtime.getDeviceCount()} GPU(s))")
        self.gpu = gpu
        self.nccl = nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.world_size, uid, self.rank)
        self.comm_stream = cupy.cuda.Stream(non_blocking=True)
        self._nccl_ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN, "prod": nccl.NCCL_PROD}
        self._nccl_types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                            np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int32): nccl.NCCL_INT32,
                            np.dtype(np.int64): nccl.NCCL_INT64}

    def _nccl_type(self, array):
        try:
            return self._nccl_types[np.dtype(array.dtype)]
        except KeyError:
            raise TypeError(f"nccl: unsupported dtype {array.dtype}") from None

    def allreduce_(self, array, op="sum"):
        if not _is_cupy(array):
            return super().allreduce_(array, op)
        _check_op(op)
        self.collectives += 1
        import cupy
        self.nccl_comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._nccl_type(array),
                                 self._nccl_ops[op], cupy.cuda.get_current_stream().ptr)
        return array

    def iallreduce_(self, array, op="sum"):
        if not _is_cupy(array):
            return super().iallreduce_(array, op)
        _check_op(op)
        self.collectives += 1
        import cupy
        self.comm_stream.wait_event(cupy.cuda.get_current_stream().record())
        self.nccl_comm.allReduce(array.data.ptr, array.data.ptr, array.size, self._nccl_type(array),
                                 self._nccl_ops[op], self.comm_stream.ptr)
        return _NcclRequest(self, self.comm_stream.record())

    def bcast_(self, array, root=0):
        if not _is_cupy(array):
            return super().bcast_(array, root)
        self._check_root(root)
        self.collectives += 1
        import cupy
        self.nccl_comm.bcast(array.data.ptr, array.size, self._nccl_type(array), root,
                             cupy.cuda.get_current_stream().ptr)
        return array

    def abort(self, message, code=1):
        try:
            self.nccl_comm.abort()
        except Exception:
            pass
        super().abort(message, code)
