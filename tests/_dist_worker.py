"""One rank of the multi-process tests in tests/test_distributed.py, started by them as

    mpiexec -n 2 python tests/_dist_worker.py COMMAND --out FILE [options]

Commands:
    train     a few SGD steps of a small float64 ResNet-50 on a fixed global batch, split over the
              ranks (DataParallel + optional synchronised BN); rank 0 saves the final state (.npz)
    buckets   one backward with bucketed all-reduce vs an allgather-and-average of local gradients
    eval      exact global top-1/top-5 counts over an evaluation split sharded as data.loader does
    fail      a loop of all-reduces in which rank --victim dies, freezes, hangs or raises at step 5
Only rank 0 writes --out (as train.py's outputs).
"""

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import nn  # noqa: E402
from nn import data_parallel, distributed  # noqa: E402
from nn import functional as F  # noqa: E402


def small_model(num_classes=10):
    return nn.resnet50(num_classes=num_classes, width=1 / 16, seed=0).to(dtype=np.float64)


def cmd_train(args):
    comm = distributed.init()
    rank, world = comm.rank, comm.world_size
    if args.global_batch % world:
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of the world size {world}")
    local = args.global_batch // world
    model = small_model()
    if args.sync_bn:
        data_parallel.convert_sync_batchnorm(model, comm)
    if rank != 0:   # a different start everywhere but rank 0: broadcast_parameters must fix it
        for p in model.parameters():
            p.data += 0.5
    data_parallel.broadcast_parameters(model, comm)
    if args.optimizer_first:   # gradients in the optimizer's flat buffer: the buckets slice it, no copies
        opt = nn.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        ddp = data_parallel.DataParallel(model, comm, bucket_mb=args.bucket_mb)
    else:
        ddp = data_parallel.DataParallel(model, comm, bucket_mb=args.bucket_mb)
        opt = nn.optim.SGD(model.named_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    data = np.random.default_rng(1234)
    for _ in range(args.steps):
        x = data.standard_normal((args.global_batch, 3, args.size, args.size))
        y = data.integers(0, 10, args.global_batch)
        mine = slice(rank * local, (rank + 1) * local)
        loss = F.cross_entropy(model(x[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        ddp.finish()
        opt.step()
    if distributed.is_main(comm):
        state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        np.savez(args.out, num_buckets=ddp.num_buckets, world=world,
                 zero_copy=sum(b.zero_copy for b in ddp.buckets), **state)
    comm.close()


def cmd_buckets(args):
    comm = distributed.init()
    rank, world = comm.rank, comm.world_size
    model = small_model()
    x = np.random.default_rng([7, rank]).standard_normal((4, 3, 32, 32))
    y = np.random.default_rng([8, rank]).integers(0, 10, 4)
    ddp = data_parallel.DataParallel(model, comm, bucket_mb=args.bucket_mb)
    F.cross_entropy(model(x), y).backward()
    ddp.finish()
    bucketed = {n: p.grad.copy() for n, p in model.named_parameters()}
    ddp.remove_hooks()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    worst_bucketed = worst_plain = 0.0
    for n, p in model.named_parameters():
        reference = comm.allgather(p.grad).mean(axis=0)           # independent: gather, then NumPy
        plain = comm.allreduce_(p.grad.copy()) / world            # one all-reduce per tensor
        scale = np.abs(reference).max() + 1e-300
        worst_bucketed = max(worst_bucketed, float(np.abs(bucketed[n] - reference).max() / scale))
        worst_plain = max(worst_plain, float(np.abs(plain - reference).max() / scale))
    local_vs_mean = float(np.abs(model.fc.weight.grad - bucketed["fc.weight"]).max())
    if distributed.is_main(comm):
        with open(args.out, "w") as f:
            json.dump(dict(world=world, num_buckets=ddp.num_buckets, worst_bucketed=worst_bucketed,
                           worst_plain=worst_plain, local_vs_mean=local_vs_mean), f)
    comm.close()


def eval_data(n, classes, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, classes)), rng.integers(0, classes, n)


def cmd_eval(args):
    from data.loader import shard_batches
    comm = distributed.init()
    logits, labels = eval_data(args.samples, args.classes, args.seed)
    c1 = c5 = seen = 0
    for idx in shard_batches(args.samples, args.batch, False, 0, 0, comm.rank, comm.world_size):
        top1, top5 = nn.metrics.topk_correct(logits[idx], labels[idx], ks=(1, 5))
        c1, c5, seen = c1 + top1, c5 + top5, seen + len(idx)
    local = [c1, c5, seen]
    total = data_parallel.allreduce_counts(local, comm)
    per_rank = comm.allgather_object(local)
    if distributed.is_main(comm):
        with open(args.out, "w") as f:
            json.dump(dict(world=comm.world_size, total=total, per_rank=per_rank), f)
    comm.close()


def cmd_fail(args):
    comm = distributed.init(heartbeat=0.2, heartbeat_timeout=args.heartbeat_timeout,
                            collective_timeout=args.collective_timeout)
    buffer = np.ones(1000)
    t0 = time.monotonic()
    for step in range(1_000_000):
        if comm.rank == args.victim and step == 5:
            print(f"rank {comm.rank}: injecting '{args.mode}'", flush=True)
            if args.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif args.mode == "freeze":
                os.kill(os.getpid(), signal.SIGSTOP)
            elif args.mode == "hang":
                time.sleep(3600)          # alive (heartbeats go on) but never reaches the next collective
            elif args.mode == "raise":
                raise RuntimeError("injected failure")
        comm.allreduce_(buffer)
        time.sleep(0.02)
        if time.monotonic() - t0 > 120:
            print(f"rank {comm.rank}: still running after 120 s: the failure went unnoticed", flush=True)
            sys.exit(5)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "buckets", "eval", "fail"])
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--optimizer-first", action="store_true")
    p.add_argument("--bucket-mb", type=float, default=0.02)
    p.add_argument("--samples", type=int, default=101)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--mode", choices=["kill", "freeze", "hang", "raise"], default="kill")
    p.add_argument("--victim", type=int, default=1)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--collective-timeout", type=float, default=5.0)
    args = p.parse_args()
    {"train": cmd_train, "buckets": cmd_buckets, "eval": cmd_eval, "fail": cmd_fail}[args.command](args)


if __name__ == "__main__":
    main()
