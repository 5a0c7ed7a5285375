"""Context-parallel neighborhood attention on a small video layout, sharded by frames.

    torchrun --nproc-per-node 2 examples/context_parallel.py

Each rank holds a contiguous slab of frames (uneven when the frame count does not divide).
Both strategies run forward and backward; rank 0 prints the plan ``auto`` follows, the bytes
each strategy moved on this rank, and the largest difference from the single-process call on
the whole layout. gloo on CPU, NCCL when every rank has a GPU.
"""

import os

import torch
import torch.distributed as dist

import nattn
import nattn.distributed as nd


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.float32

    # The whole video, made identically on every rank (seeded), so each can check its rows.
    frames, height, width, heads, head_dim = 9, 12, 16, 4, 32
    window = dict(kernel_size=(4, 5, 7), stride=(2, 1, 1), dilation=(1, 2, 1),
                  is_causal=(True, False, False))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, frames, height, width, heads, head_dim, generator=gen).to(device,
                                                                                      dtype)
               for _ in range(3))
    lengths = [frames // world + (r < frames % world) for r in range(world)]
    start = sum(lengths[:rank])

    def my_slab(t):
        return t.narrow(1, start, lengths[rank]).detach().clone().requires_grad_()

    full = nattn.neighborhood_attention(q, k, v, **window)
    plan = nd.plan(my_slab(q), my_slab(k), my_slab(v), **window)  # collective: every rank
    if rank == 0:
        print(plan.explain())
    for strategy in ("halo", "ulysses"):
        ql, kl, vl = my_slab(q), my_slab(k), my_slab(v)
        with nd.count_bytes() as moved:
            out = nd.neighborhood_attention(ql, kl, vl, strategy=strategy, axis=0, **window)
            out.square().sum().backward()
        err = (out - full.narrow(1, start, lengths[rank])).abs().max()
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"{strategy}: rank 0 sent {moved.sent} B, received {moved.received} B; "
                  f"max |out - single-process| over all ranks = {err.item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
