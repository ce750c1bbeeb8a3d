"""Data parallelism, the part a learner reads: every rank trains a copy of the model on its own
share of the global batch; after backward the gradients are averaged over all ranks, so every
rank applies the same update and the copies stay equal.

    comm = nn.distributed.init(device="cuda")        # the communicator (nn/distributed.py)
    model = nn.resnet50(...).to(device)
    opt = nn.optim.SGD(model.named_parameters(), ...)  # first: its flat gradient buffer is what travels
    nn.data_parallel.broadcast_parameters(model, comm)  # every rank starts from rank 0's state
    ddp = nn.data_parallel.DataParallel(model, comm, bucket_mb=25)
    for images, labels in Loader(..., rank=comm.rank, world_size=comm.world_size):
        loss = F.cross_entropy(model(x), y)      # this rank's share of the global batch
        opt.zero_grad()
        loss.backward()      # full buckets of gradients start all-reducing while backward goes on
        ddp.finish()         # wait for the last buckets, divide by world_size once
        opt.step()           # every rank applies the same averaged gradient: weights stay equal

Also here: synchronised batch norm (convert_sync_batchnorm: statistics over the global batch;
the arithmetic is in nn/functional.py), and exact sums of evaluation counts over the ranks.
The communicators (single, MPI, NCCL) and the watchdog that stops a job when a rank dies are in
nn/distributed.py and nn/watchdog.py: this module only calls `comm.iallreduce_`, `bcast_` and
`allreduce_`.
"""

import numpy as np

__all__ = ["DataParallel", "broadcast_parameters", "convert_sync_batchnorm", "allreduce_counts"]


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
