"""Data parallelism: one process per device, gradients all-reduced, started by MPI.

    mpiexec -n 8 python train.py ...            # one node, 8 GPUs (or 8 CPU processes)

    comm = nn.distributed.init(device="cuda")    # backend: nccl on cuda, mpi on cpu, single alone
    model = nn.resnet50(...).to(device)
    nn.distributed.broadcast_parameters(model, comm)       # every rank starts from rank 0's state
    ddp = nn.distributed.DataParallel(model, comm, bucket_mb=25)
    for images, labels in Loader(..., rank=comm.rank, world_size=comm.world_size):
        loss = F.cross_entropy(model(x), y)      # this rank's share of the global batch
        opt.zero_grad()
        loss.backward()      # full buckets of gradients start all-reducing while backward goes on
        ddp.finish()         # wait for the last buckets, divide by world_size once
        opt.step()           # every rank applies the same averaged gradient: weights stay equal

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
import selectors
import signal
import socket
import sys
import threading
import time
import traceback

import numpy as np

__all__ = ["init", "current", "is_main", "Communicator", "MpiCommunicator", "NcclCommunicator",
           "DataParallel", "broadcast_parameters", "convert_sync_batchnorm", "allreduce_counts",
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
        raise RuntimeError(f"the nccl backend (several GPUs) needs CuPy: {_nccl_install_hint()} ({e})") from e
    if not getattr(nccl, "available", True) or not hasattr(nccl, "NcclCommunicator"):
        raise RuntimeError(f"the nccl backend (several GPUs) needs the NCCL library, which CuPy could not "
                           f"load: {_nccl_install_hint()}")
    return nccl


def _nccl_install_hint():
    from kernels.cuda_env import cupy_wheel_cuda_major, gpu_extra_for
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


# ------------------------------------------------------------------------------------------------
# watchdog


class Watchdog:
    """Heartbeats over TCP between rank 0 and every other rank (a star: 2(N-1) small messages per
    interval). A background thread on each rank:
      - sends 'beat <collectives entered>' every `interval` seconds;
      - on rank 0, reports a rank whose connection closes without 'bye' (its process is gone),
        that sent no beat for `timeout` s (frozen), or that has not entered collective #k
        `collective_timeout` s after another rank did (stuck in computation or I/O);
      - on the other ranks, reports rank 0 gone or silent.
    A report prints one line naming the rank and calls comm.abort (MPI_Abort ends the job).
    TCP rather than MPI: a socket tells at once that the process at the other end died, and the
    thread needs no thread-safe MPI. The address of rank 0 is broadcast over MPI (127.0.0.1 when
    every rank is on one node; else rank 0's host name, or MLPERF_DIST_WATCHDOG_ADDR)."""

    def __init__(self, comm, interval, timeout, collective_timeout):
        self.comm, self.interval, self.timeout = comm, float(interval), float(timeout)
        self.collective_timeout = float(collective_timeout)
        self.rank, self.world = comm.rank, comm.world_size
        self._stopping = threading.Event()
        self._failed = False
        self.peers = {}                       # rank -> socket (rank 0: all others; else: {0: sock})
        self.info = {}                        # rank -> "pid P on HOST"
        local = comm.local_size == comm.world_size
        if self.rank == 0:
            bind = "127.0.0.1" if local else ""
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((bind, 0))
            listener.listen(self.world)
            host = os.environ.get("MLPERF_DIST_WATCHDOG_ADDR") or ("127.0.0.1" if local else socket.getfqdn())
            address = (host, listener.getsockname()[1])
        else:
            listener, address = None, None
        address = comm.comm.bcast(address, root=0)
        if self.rank == 0:
            listener.settimeout(max(60.0, self.timeout))
            for _ in range(self.world - 1):
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    comm.abort(f"watchdog: only {len(self.peers)} of {self.world - 1} ranks connected to "
                               f"{address} (a firewall between the nodes? set MLPERF_DIST_WATCHDOG_ADDR)")
                hello = self._read_line(conn).split()
                self.peers[int(hello[1])] = conn
                self.info[int(hello[1])] = f"pid {hello[2]} on {hello[3]}"
            listener.close()
        else:
            conn = socket.create_connection(address, timeout=max(60.0, self.timeout))
            conn.sendall(f"hello {self.rank} {os.getpid()} {comm.host}\n".encode())
            self.peers[0] = conn
            self.info[0] = "rank 0"
        for conn in self.peers.values():
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        now = time.monotonic()
        self.last_beat = {r: now for r in self.peers}
        self.progress = {r: 0 for r in range(self.world)}
        self.first_reached = {}               # collective number -> when some rank first entered it
        self.done = set()                     # ranks that said bye
        self._buffers = {r: b"" for r in self.peers}
        self.thread = threading.Thread(target=self._run, name="dist-watchdog", daemon=True)
        self.thread.start()

    @staticmethod
    def _read_line(conn):
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(256)
            if not chunk:
                raise ConnectionError("watchdog: a rank closed its connection during the handshake")
            data += chunk
        return data.decode()

    def _name(self, r):
        return f"rank {r} ({self.info[r]})" if r != 0 else "rank 0"

    def _fail(self, message):
        if self._failed or self._stopping.is_set():
            return
        self._failed = True
        self.comm.abort(f"watchdog: {message}; stopping all {self.world} ranks")

    def _send(self, r, text):
        try:
            self.peers[r].sendall(text.encode())
        except (BlockingIOError, InterruptedError):
            pass                              # a full buffer: the peer is slow; silence decides
        except OSError:
            pass                              # closed: the reader sees it and reports

    def _run(self):
        try:
            selector = selectors.DefaultSelector()
            for r, conn in self.peers.items():
                selector.register(conn, selectors.EVENT_READ, r)
            next_beat = 0.0
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    for r in self.peers:
                        if r not in self.done:
                            self._send(r, f"beat {self.comm.collectives}\n")
                    next_beat = now + self.interval
                for key, _ in selector.select(timeout=min(self.interval, 0.25)):
                    self._receive(key.data, selector)
                self._check(time.monotonic())
        except Exception:                     # a bug here must not pass silently
            traceback.print_exc()
            self._fail("the watchdog thread itself failed (traceback above)")

    def _receive(self, r, selector):
        try:
            chunk = self.peers[r].recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            selector.unregister(self.peers[r])
            if r not in self.done:
                self._fail(f"{self._name(r)} is gone: its connection closed without a goodbye "
                           f"(the process was killed or crashed)")
            return
        self._buffers[r] += chunk
        *lines, self._buffers[r] = self._buffers[r].split(b"\n")
        now = time.monotonic()
        for line in lines:
            words = line.decode().split()
            if not words:
                continue
            if words[0] == "bye":
                self.done.add(r)
            elif words[0] == "beat":
                self.last_beat[r] = now
                self.progress[r] = int(words[1])

    def _check(self, now):
        for r, seen in self.last_beat.items():
            if r not in self.done and now - seen > self.timeout:
                self._fail(f"{self._name(r)} sent no heartbeat for {now - seen:.1f} s (timeout {self.timeout:g} s): "
                           f"the process is frozen (stopped, swapping, or blocked holding the interpreter)")
        if self.rank != 0:
            return
        self.progress[0] = self.comm.collectives
        active = [r for r in range(self.world) if r not in self.done]
        if not active:
            return
        front = max(self.progress[r] for r in active)
        if front not in self.first_reached:
            self.first_reached[front] = now
        for r in active:
            behind = self.progress[r] + 1
            if self.progress[r] < front:
                since = min((t for k, t in self.first_reached.items() if k >= behind), default=now)
                if now - since > self.collective_timeout:
                    self._fail(f"{self._name(r)} is stuck: another rank entered collective #{behind} "
                               f"{now - since:.0f} s ago and it has not (timeout {self.collective_timeout:g} s)")
        floor = min(self.progress[r] for r in active)
        for k in [k for k in self.first_reached if k <= floor]:
            del self.first_reached[k]

    def stop(self):
        """Say goodbye to the peers and end the thread (normal shutdown)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for r in self.peers:
            self._send(r, "bye\n")
        self.thread.join(timeout=2.0)
        for conn in self.peers.values():
            conn.close()


# ------------------------------------------------------------------------------------------------
# data parallelism


class _Bucket:
    def __init__(self, params, xp, dtype):
        self.params = params                                  # [(name, Parameter)], backward order
        self.offsets, total = [], 0
        for _, p in params:
            self.offsets.append(total)
            total += int(p.data.size)
        # Gradients that already live side by side in an optimizer's flat buffer (nn/flat.py)
        # travel from there: the bucket is a slice of it, nothing is copied. Otherwise they are
        # copied into a buffer of the bucket's own.
        self.flat = _flat_slice(params)
        self.zero_copy = self.flat is not None
        if self.flat is None:
            self.flat = xp.zeros(total, dtype=dtype)
        self.waiting = len(params)
        self.request = None


def _flat_slice(params):
    """The slice of a flat gradient buffer holding exactly these parameters' gradients, when they
    are consecutive views of one (in either order), else None."""
    slots = [getattr(p, "_flat_slot", None) for _, p in params]
    if any(s is None for s in slots) or len({id(g) for g, _ in slots}) != 1:
        return None
    group = slots[0][0]
    indices = sorted(i for _, i in slots)
    if indices != list(range(indices[0], indices[-1] + 1)):
        return None
    return group.grad[int(group.offsets[indices[0]]):int(group.offsets[indices[-1] + 1])]


class DataParallel:
    """All-reduce a model's gradients in buckets while backward runs, then average them once.

    Args:
        model: an nn.Module (its parameters are the ones reduced) or a list of (name, Parameter).
        comm: a Communicator (init()).
        bucket_mb: bucket size in MiB (25 as PyTorch DDP's default): parameters are grouped in
            reverse registration order (about the order backward produces their gradients) into
            flat buffers of at most this size (a parameter larger than that gets its own).

    How a step goes: each parameter's gradient hook (Parameter.register_grad_hook) copies its
    gradient into its bucket's flat buffer and makes `.grad` a view of it (no copy when the
    optimizer already keeps the gradients in one flat buffer, nn/flat.py: create it before
    DataParallel and each bucket is a slice of that buffer); when a bucket has all its
    gradients, its all-reduce starts (non-blocking: MPI Iallreduce, or NCCL on a side stream) while
    backward goes on. Buckets start in index order on every rank (collectives must be issued in the
    same order everywhere). finish() starts what has not started, waits for everything and divides
    the sums by world_size; every `.grad` is then the average over all ranks. Call finish() after
    each backward, before the optimizer (or the loss scaler's unscale/step).
    With world_size 1 nothing is copied and finish() does nothing.
    """

    def __init__(self, model, comm, bucket_mb=25.0):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        named = list(model.named_parameters()) if hasattr(model, "named_parameters") else list(model)
        if not named:
            raise ValueError("DataParallel: the model has no parameters")
        self.comm, self.bucket_bytes = comm, int(bucket_mb * 2 ** 20)
        self.buckets, self._where, self._removers = [], {}, []
        if comm.world_size == 1:
            return
        group, size = [], 0
        for name, p in reversed(named):
            nbytes = int(p.data.nbytes)
            if group and (size + nbytes > self.bucket_bytes or p.data.dtype != group[0][1].data.dtype
                          or p.device != group[0][1].device):
                self._add_bucket(group)
                group, size = [], 0
            group.append((name, p))
            size += nbytes
        self._add_bucket(group)
        self._next = 0                          # the next bucket to start (index order)
        for name, p in named:
            self._removers.append(p.register_grad_hook(self._on_grad))

    def _add_bucket(self, group):
        p0 = group[0][1]
        bucket = _Bucket(group, p0.device.xp, p0.data.dtype)
        for j, (_, p) in enumerate(group):
            self._where[id(p)] = (len(self.buckets), j)
        self.buckets.append(bucket)

    def _on_grad(self, p):
        b, j = self._where[id(p)]
        bucket = self.buckets[b]
        if not bucket.zero_copy:
            offset, n = bucket.offsets[j], int(p.data.size)
            view = bucket.flat[offset:offset + n]
            if p.grad.base is not bucket.flat:      # not already our view (a second backward pass)
                view[...] = p.grad.reshape(-1)
                p.grad = view.reshape(p.data.shape)
        bucket.waiting -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].waiting == 0:
            self._start(self._next)
        for earlier in self.buckets[:self._next]:     # let MPI progress the requests in flight
            if earlier.request is not None and hasattr(earlier.request, "test"):
                earlier.request.test()

    def _start(self, b):
        bucket = self.buckets[b]
        for (name, p), offset in zip(bucket.params, bucket.offsets):
            if p.grad is None:
                raise RuntimeError(f"DataParallel: parameter '{name}' got no gradient in this backward pass; "
                                   f"every parameter must take part in the loss on every rank")
            if bucket.zero_copy:
                group, i = p._flat_slot
                if p.grad is not group.grad_views[i]:     # set by hand: back into the flat buffer
                    group.grad_views[i][...] = p.grad
                    p.grad = group.grad_views[i]
            elif p.grad.base is not bucket.flat:    # delivered without our hook (e.g. set by hand)
                n = int(p.data.size)
                bucket.flat[offset:offset + n] = p.grad.reshape(-1)
                p.grad = bucket.flat[offset:offset + n].reshape(p.data.shape)
        bucket.request = self.comm.iallreduce_(bucket.flat)
        self._next = b + 1

    @property
    def num_buckets(self):
        return len(self.buckets)

    def finish(self):
        """Wait for every bucket's all-reduce and divide by world_size: each `.grad` is then the
        mean over the ranks. Starts buckets whose gradients were not all delivered by hooks."""
        if self.comm.world_size == 1:
            return
        while self._next < len(self.buckets):
            self._start(self._next)
        scale = 1.0 / self.comm.world_size
        for bucket in self.buckets:
            bucket.request.wait()
            bucket.request = None
            bucket.flat *= bucket.flat.dtype.type(scale)
            bucket.waiting = len(bucket.params)
        self._next = 0

    def remove_hooks(self):
        """Detach from the parameters (gradients stay local afterwards)."""
        for remove in self._removers:
            remove()
        self._removers = []


def broadcast_parameters(model, comm, root=0):
    """Copy rank `root`'s parameters and buffers (BN running statistics, counters) to every rank,
    IN PLACE: all ranks start (or resume) from the same state. Collective."""
    for _, p in model.named_parameters():
        comm.bcast_(p.data, root)
    for _, b in model.named_buffers():
        comm.bcast_(b, root)


def convert_sync_batchnorm(model, comm):
    """Make every BatchNorm2d of `model` use statistics over all ranks of `comm` in training
    (synchronised BN); comm=None turns it back to per-rank statistics. Returns the model."""
    from nn.layers import BatchNorm2d
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.sync = comm if comm is not None and comm.world_size > 1 else None
    return model


def allreduce_counts(counts, comm):
    """Exact global sums of per-rank integer counts (e.g. correct predictions, images seen).

    counts: a sequence of ints (or an int array) -> list of Python ints, summed over all ranks
    in int64 (no rounding, whatever the world size)."""
    array = np.asarray(counts, dtype=np.int64).reshape(-1).copy()
    if comm is not None:
        comm.allreduce_(array, "sum")
    return [int(v) for v in array]
