"""One rank of the NT-Xent gradient-equivalence test on nccl (tests/gpu/test_nccl_gpu.py).

``python tests/gpu/nt_xent_ranks.py OUT`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set:
rank r, on GPU r, takes rows ``[r B, (r + 1) B)`` of tests/train/test_loss.py's data and model (made on the CPU
from the same seed as that test's single-process reference, then moved), computes the loss with global negatives
(the embeddings gathered over nccl) and its gradients, and averages both over the ranks as data-parallel training
does. Rank 0 saves ``{"loss": (), "grads": {name: tensor}}`` to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_loss import B, Pair, _data  # noqa: E402

from soilnet.losses import ContrastiveLoss  # noqa: E402


def main(out: Path) -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    x, c = (t[rank * B : (rank + 1) * B].to(device) for t in _data())
    torch.manual_seed(0)
    model, crit = Pair().to(device), ContrastiveLoss(0.5, learnable=True).to(device)
    loss, _ = crit(*model(x, c))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in [*model.named_parameters(), *crit.named_parameters()]}
    total = loss.detach().clone()
    for t in [total, *grads.values()]:
        dist.all_reduce(t)
    if rank == 0:
        torch.save({"loss": (total / world).cpu(), "grads": {k: (g / world).cpu() for k, g in grads.items()}}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
