"""Copy the next batch to the GPU while the current step runs.

    loader = Loader("train.lmdb", batch_size=256, train=True)      # uint8 [B, S, S, 3], int32 [B]
    for images, labels in DevicePrefetcher(loader, "cuda"):         # CuPy arrays, already on the GPU
        x = nn.functional.normalize_images(images, device="cuda")
        ...

On the `cuda` device each host batch is first copied (by the CPU) into one of two *pinned*
(page-locked) host buffers, then copied to one of two device buffers by an asynchronous
`cudaMemcpyAsync` on a second CUDA stream. Pinned memory is what makes that copy truly
asynchronous: from ordinary (pageable) memory the driver stages through its own pinned buffer and
the copy blocks the host. The timeline of one step:

    host:         [ get batch i+1 from the loader, memcpy into pinned slot (i+1)%2 ]
    copy stream:          wait(consumer done with slot (i+1)%2) -> [ H2D batch i+1 ] -> event
    compute:      [ ............ step i, reading device slot i%2 ........................ ]
    next call:    compute stream waits for the event of batch i+1, then step i+1 starts

A 256 x 224 x 224 x 3 uint8 batch is 38.5 MB: ~1 ms over PCIe 5 / ~0.8 ms on an H200's host link at
~50 GB/s, hidden behind a step of ~40 ms.

Ordering and lifetime: batches come out in the loader's order. The arrays yielded for batch i
stay valid until batch i+1 is requested (the same rule as data.loader.Loader): the copy that
reuses their slot is queued behind all work issued on the consumer's stream up to that request,
so a step that was merely *launched* (not finished) when it asked for the next batch still reads
intact data.

On the `cpu` and `emu` devices (NumPy arrays) batches are passed through unchanged: the same
objects, in the same order, nothing copied.

This module imports neither nn nor CuPy at import time; CuPy is imported when a `cuda` prefetcher
starts.
"""

import numpy as np

__all__ = ["DevicePrefetcher"]

_DEVICES = ("cpu", "emu", "cuda")


def _device_name(device):
    name = getattr(device, "name", device)     # an nn.device.Device or a name
    if name not in _DEVICES:
        raise ValueError(f"DevicePrefetcher: device must be one of {_DEVICES} (or an nn Device), got {device!r}")
    return name


class DevicePrefetcher:
    """Iterate over `loader`'s (images, labels) batches with the next batch already on `device`.

    Args:
        loader: any iterable of (images, labels) with images a uint8 NumPy array [B, H, W, 3]
            (NHWC) and labels an int NumPy array [B]; B may vary (a short last batch).
        device: 'cpu', 'emu' or 'cuda' (or an nn.device.Device).
        slots: device (and pinned) buffers on cuda: 2 = double buffering (one read by the current
            step, one being filled); more let the copies run further ahead of the consumer.
            Either way batch i stays valid until batch i+1 is requested.

    Yields (images, labels): on cuda CuPy arrays of the loader's dtypes and shapes (views into
    this prefetcher's device buffers); on cpu/emu the loader's own objects.
    """

    def __init__(self, loader, device, slots=2):
        self.loader = loader
        self.device = _device_name(device)
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 2:
            raise ValueError(f"DevicePrefetcher: slots must be an int >= 2, got {slots!r}")
        self.slots = int(slots)
        self._buffers = None      # per slot: dict of pinned/device arrays, built on the first batch

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.device != "cuda":
            yield from self.loader
            return
        yield from self._iter_cuda()

    # ---- cuda --------------------------------------------------------------------------------

    def _iter_cuda(self):
        import cupy
        copy_stream = cupy.cuda.Stream(non_blocking=True)
        it = iter(self.loader)
        pending = []                  # (slot, images_view, labels_view, ready_event), oldest first
        slot_free = [None] * self.slots   # event: consumer stream finished with the slot's last batch
        next_slot = 0

        def issue(batch):
            nonlocal next_slot
            images, labels = self._check_batch(batch)
            slot = next_slot
            next_slot = (next_slot + 1) % self.slots
            buf = self._slot_buffers(cupy, slot, images, labels)
            # The host may only overwrite the pinned buffer once its previous H2D copy has run.
            if buf["copied"] is not None:
                buf["copied"].synchronize()
            n = images.shape[0]
            pin_img = buf["pinned_images"][:n]
            pin_lab = buf["pinned_labels"][:n]
            np.copyto(pin_img, images)
            np.copyto(pin_lab, labels)
            dev_img = buf["images"][:n]
            dev_lab = buf["labels"][:n]
            if slot_free[slot] is not None:
                copy_stream.wait_event(slot_free[slot])     # the consumer is done reading this slot
            dev_img.set(pin_img, stream=copy_stream)
            dev_lab.set(pin_lab, stream=copy_stream)
            done = copy_stream.record()
            buf["copied"] = done
            pending.append((slot, dev_img, dev_lab, done))

        for _ in range(self.slots - 1):            # fill the pipeline
            batch = next(it, None)
            if batch is None:
                break
            issue(batch)
        previous_slot = None
        while pending:
            slot, dev_img, dev_lab, ready = pending.pop(0)
            consumer = cupy.cuda.get_current_stream()
            consumer.wait_event(ready)
            if previous_slot is not None:
                # everything queued so far on the consumer's stream may read the previous batch
                slot_free[previous_slot] = consumer.record()
            batch = next(it, None)
            if batch is not None:
                issue(batch)
            previous_slot = slot
            yield dev_img, dev_lab

    def _check_batch(self, batch):
        try:
            images, labels = batch
        except (TypeError, ValueError):
            raise TypeError(f"DevicePrefetcher: the loader must yield (images, labels) pairs, got {type(batch).__name__}")
        for name, a in (("images", images), ("labels", labels)):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"DevicePrefetcher: {name} must be a NumPy array (host memory), got {type(a).__name__}")
        if images.ndim != 4 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"DevicePrefetcher: expected images [B, H, W, C] and labels [B], got "
                             f"{images.shape} and {labels.shape}")
        return images, labels

    def _slot_buffers(self, cupy, slot, images, labels):
        """The pinned and device buffers of `slot`, (re)allocated when a batch outgrows them."""
        if self._buffers is None:
            self._buffers = [None] * self.slots
        buf = self._buffers[slot]
        fits = (buf is not None and buf["images"].shape[1:] == images.shape[1:]
                and buf["images"].shape[0] >= images.shape[0] and buf["images"].dtype == images.dtype
                and buf["labels"].dtype == labels.dtype)
        if not fits:
            if buf is not None and buf["copied"] is not None:
                buf["copied"].synchronize()
            buf = {"pinned_images": _empty_pinned(cupy, images.shape, images.dtype),
                   "pinned_labels": _empty_pinned(cupy, labels.shape, labels.dtype),
                   "images": cupy.empty(images.shape, images.dtype),
                   "labels": cupy.empty(labels.shape, labels.dtype),
                   "copied": None}
            self._buffers[slot] = buf
        return buf


def _empty_pinned(cupy, shape, dtype):
    """A NumPy array in page-locked host memory (kept alive by the array's base)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    mem = cupy.cuda.alloc_pinned_memory(max(count * dtype.itemsize, 1))
    return np.frombuffer(mem, dtype, count).reshape(shape)
