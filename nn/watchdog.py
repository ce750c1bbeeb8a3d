"""The watchdog of a multi-process job: a rank that dies, freezes or hangs stops the whole job
with a line naming it, instead of leaving the others waiting forever.

nn.distributed starts one per communicator of several ranks (MPI or NCCL); nothing else uses it.
"""

import os
import selectors
import socket
import threading
import time
import traceback

__all__ = ["Watchdog"]


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
