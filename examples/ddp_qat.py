"""Ternary QAT with DistributedDataParallel, then convert on rank 0.

    torchrun --nproc-per-node 2 examples/ddp_qat.py          # CPU, gloo (NCCL when CUDA is present)

Each rank trains on its shard of every global batch; DDP averages the gradients, and the static
activation observer of ``fc1`` all-reduces its range, so every rank holds the model one process
would have trained on the global batch. Rank 0 converts it and evaluates the packed model.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bitlab_fx as bfx


def main():
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts it from rank 0)

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    static_input = bfx.QuantConfig(weight="ternary", input=bfx.IntActivation(granularity="per_tensor", dynamic=False))
    qconfig = bfx.QConfigMapping().set_global(bfx.ternary()).set_module_name("0", static_input)
    prepared = bfx.prepare_qat(model, qconfig).to(device)
    ddp = nn.parallel.DistributedDataParallel(prepared, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=2e-3)

    # a toy task: the class is the argmax of a fixed random projection of the input
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(64, 10, generator=g)
    global_batch = 64
    per_rank = global_batch // world
    for step in range(150):
        x = torch.randn(global_batch, 64, generator=g)
        y = (x @ proj).argmax(1)
        xs, ys = x[rank * per_rank:(rank + 1) * per_rank].to(device), y[rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = F.cross_entropy(ddp(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 and rank == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    # every rank holds the same parameters and the same observer range
    amax = next(b for k, b in prepared.named_buffers() if k.endswith("running_amax")).detach().clone()
    ranges = [torch.zeros_like(amax) for _ in range(world)]
    dist.all_gather(ranges, amax)
    assert all(torch.equal(r, ranges[0]) for r in ranges), ranges

    if rank == 0:
        converted = bfx.convert(prepared.eval()).cpu()
        x = torch.randn(512, 64, generator=g)
        acc = (converted(x).argmax(1) == (x @ proj).argmax(1)).float().mean().item()
        print(bfx.summary(converted))
        print(f"converted model accuracy {acc:.1%} (chance 10%); observer range {ranges[0].item():.3f} on all ranks")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
