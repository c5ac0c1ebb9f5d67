#!/usr/bin/python3
"""The PyTorch DDP peer of bench/dp_bench.cpp: W2 under DistributedDataParallel, gloo backend.

The model, batches and optimizer are bench/torch_peer.py's (GPT-2 as Hugging Face's, AdamW lr 1e-3,
betas (0.9, 0.999), eps 1e-8, weight decay 0.1 on 2-D parameters). The global batch (8 sequences)
is held fixed and split over the ranks: every rank draws the same global batch and keeps its rows,
as dp_bench does. One step, timed whole on every rank: next batch -> forward -> zero grads ->
backward (DDP all-reduces the gradient buckets while it runs and waits for them at its end) ->
AdamW -> mean loss over ranks. Tokens/s use the slowest rank's time per step.

The script launches its own ranks with torch.multiprocessing.spawn on 127.0.0.1 (no torchrun
needed); each rank runs torch on one thread with OpenBLAS on one thread, set before torch loads
(../shared/MACHINE.md). Run it with /usr/bin/python3 (Debian's python3-torch).

    torch_ddp_peer.py [--ranks 2] [--steps 10] [--warmup 2] [--bucket-mib 25] [--json]

Letters: B sequences per rank, T context.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

# One thread per rank for every pool, before torch is imported (here and in each spawned child,
# which re-imports this module).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import torch_peer  # noqa: E402  (the model, batches and optimizer of the single-process peer)

GLOBAL_BATCH = 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes (1 thread each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--bucket-mib", type=float, default=25.0, help="DDP bucket_cap_mb")
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "data", "tinyshakespeare.txt"))
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON object (rank 0)")
    a = p.parse_args()
    if a.ranks < 1 or GLOBAL_BATCH % a.ranks or a.steps < 1 or a.warmup < 0:
        p.error(f"--ranks must divide the global batch {GLOBAL_BATCH}; --steps >= 1, --warmup >= 0")
    return a


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one rank -----------------------------------------------------------------------------------

def train(rank, world, args):
    """Warmup + timed steps; returns this rank's per-step seconds (timed steps) and the losses."""
    n_layer, n_head, n_embd, context, _ = torch_peer.WORKLOADS["W2"]
    per_rank = GLOBAL_BATCH // world
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's too)
    model = torch_peer.GPT(n_layer, n_head, n_embd, context)
    model.init_weights()
    model.train()
    # The causal masks are constant bool buffers, which gloo cannot broadcast ("Invalid scalar type").
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in model.named_buffers()])
    ddp = DDP(model, bucket_cap_mb=args.bucket_mib)
    opt = torch_peer.make_optimizer(ddp.module)
    data = torch_peer.Batches(args.data, GLOBAL_BATCH, context, args.seed)  # every rank: the same global batches

    step_seconds, backward_seconds, losses = [], [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        x, y = data.next()  # (GLOBAL_BATCH, T)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]  # (B, T)
        loss = ddp(x, y)
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        loss.backward()  # DDP's buckets are all reduced when this returns
        t2 = time.perf_counter()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        loss_value = mean_loss.item() / world
        dt = time.perf_counter() - t0
        losses.append(loss_value)
        if step >= args.warmup:
            step_seconds.append(dt)
            backward_seconds.append(t2 - t1)
    return step_seconds, backward_seconds, losses


def worker(rank, world, port, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        step_seconds, backward_seconds, losses = train(rank, world, args)
        slowest = torch.tensor(step_seconds, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # per step, the slowest rank
        backward = torch.tensor(backward_seconds, dtype=torch.float64)
        dist.all_reduce(backward, op=dist.ReduceOp.MAX)
        if rank == 0:
            report(world, args, slowest.tolist(), backward.tolist(), losses)
    finally:
        dist.destroy_process_group()


def report(world, args, step_seconds, backward_seconds, losses):
    context = torch_peer.WORKLOADS["W2"][3]
    tokens = GLOBAL_BATCH * context
    med, best = statistics.median(step_seconds), min(step_seconds)
    result = {
        "impl": "pytorch-ddp",
        "workload": "W2",
        "ranks": world,
        "threads": torch.get_num_threads(),
        "config": f"{world}x1",
        "backend": "gloo",
        "torch_version": torch.__version__,
        "bucket_mib": args.bucket_mib,
        "global_batch": GLOBAL_BATCH,
        "per_rank_batch": GLOBAL_BATCH // world,
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_step": tokens,
        "step_ms_median": med * 1e3,
        "step_ms_best": best * 1e3,
        "backward_ms_median": statistics.median(backward_seconds) * 1e3,  # DDP's sync included
        "tok_s_median": tokens / med,
        "tok_s_best": tokens / best,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v:.1f}" if isinstance(v, float) else f"{k:>20}: {v}", flush=True)


def main():
    args = parse_args()
    mp.spawn(worker, args=(args.ranks, free_port(), args), nprocs=args.ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
