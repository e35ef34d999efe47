"""SoilNet's cross-modal NT-Xent with global negatives, its options, and retrieval metrics.

The loss runs over the 2N embeddings ``[a; b]`` of a global batch of N pairs (N = world size x local batch):
the positive of row i is row i +- N and every other row is a negative. Each rank computes the rows of its own
pairs against all 2N columns, gathered from every rank with gradient (:func:`soilnet.distributed.gather_with_grad`),
so the data-parallel average of the ranks' losses and gradients equals those of one process holding the whole
global batch. Logits are computed in fp32 whatever the training precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from soilnet.distributed import gather_no_grad, gather_with_grad, rank


@dataclass
class ContrastiveOutput:
    """``loss``: () mean over this rank's anchors; ``logits``: (2b, 2N) fp32 of this rank's anchors."""

    loss: torch.Tensor
    logits: torch.Tensor
    positives: torch.Tensor  # (2b,) int64 column of each anchor's positive


def nt_xent(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: torch.Tensor | float,
    keys: torch.Tensor | None = None,
) -> ContrastiveOutput:
    """NT-Xent over ``[a; b]`` with negatives from every rank.

    a, b: (b, D) this rank's paired embeddings (any float dtype; normalised here in fp32).
    temperature: () or float, > 0.
    keys: (b,) int64 or None; with keys, negatives whose key equals the anchor's (e.g. the same TerraClimate
    cell, hence an identical climate series) are masked out instead of being pushed apart.
    """
    local = a.shape[0]
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    ga, gb = gather_with_grad(a), gather_with_grad(b)
    n = ga.shape[0]
    columns = torch.cat([ga, gb], dim=0)  # (2N, D)
    anchors = torch.cat([a, b], dim=0)  # (2b, D)
    first = rank() * local
    rows = torch.arange(first, first + local, device=a.device)
    anchor_index = torch.cat([rows, rows + n])  # global row of each local anchor
    positives = torch.cat([rows + n, rows])
    logits = anchors @ columns.T / temperature
    exclude = F.one_hot(anchor_index, 2 * n).bool()
    if keys is not None:
        gk = gather_no_grad(keys.to(a.device))
        all_keys = torch.cat([gk, gk])
        same = all_keys[anchor_index][:, None] == all_keys[None, :]
        exclude = exclude | (same & ~F.one_hot(positives, 2 * n).bool())
    logits = logits.masked_fill(exclude, float("-inf"))
    loss = F.cross_entropy(logits, positives)
    return ContrastiveOutput(loss=loss, logits=logits.detach(), positives=positives)


class ContrastiveLoss(nn.Module):
    """Cross-modal NT-Xent (image vs climate of the same location), optional learnable temperature and an
    optional image-image SimCLR term.

    ``temperature`` is the initial value when ``learnable`` (then stored as a log so it stays positive).
    """

    log_temperature: torch.Tensor  # (1,): a parameter when learnable, else a buffer

    def __init__(self, temperature: float = 0.5, learnable: bool = False, simclr_weight: float = 0.0):
        super().__init__()
        # shape (1,), not (): DeepSpeed's flattening and checkpoint code expect parameters with a dimension
        log_t = torch.tensor([math.log(temperature)], dtype=torch.float32)
        if learnable:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.simclr_weight = simclr_weight

    @property
    def temperature(self) -> torch.Tensor:
        """() float32, > 0."""
        return self.log_temperature.float().exp().squeeze(0)

    def forward(
        self,
        z_img: torch.Tensor,
        z_clim: torch.Tensor,
        keys: torch.Tensor | None = None,
        z_img2: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ContrastiveOutput]:
        """z_img, z_clim, z_img2: (b, D). keys: (b,) int64 or None. Returns (total loss (), cross-modal output)."""
        out = nt_xent(z_img, z_clim, self.temperature, keys)
        total = out.loss
        if self.simclr_weight > 0:
            if z_img2 is None:
                raise ValueError("loss.simclr_weight > 0 needs a second image view (z_img2)")
            total = total + self.simclr_weight * nt_xent(z_img, z_img2, self.temperature).loss
        return total, out


@torch.no_grad()
def retrieval_metrics(out: ContrastiveOutput, z_img: torch.Tensor, z_clim: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over this rank's anchors (all-reduce them, then divide by ``count``).

    Image->climate retrieval among the global batch's N climate embeddings: ``top1``, ``top5`` (hits),
    ``rank`` (1-based rank of the positive), and ``emb_std``: the std over the batch of the normalised embeddings,
    averaged over dimensions (times the local count), a collapse monitor (about 1/sqrt(D) when healthy, 0 when
    collapsed).
    """
    local = z_img.shape[0]
    n = out.logits.shape[1] // 2
    img_rows = out.logits[:local, n:]  # (b, N): image anchors against climate columns
    pos = out.positives[:local] - n
    pos_score = img_rows.gather(1, pos[:, None])
    positive_rank = (img_rows > pos_score).sum(dim=1) + 1
    zi = F.normalize(z_img.float(), dim=-1)
    zc = F.normalize(z_clim.float(), dim=-1)
    std = 0.5 * (zi.std(dim=0).mean() + zc.std(dim=0).mean()) if local > 1 else zi.new_zeros(())
    return {
        "count": torch.tensor(float(local)),
        "top1": (positive_rank <= 1).float().sum(),
        "top5": (positive_rank <= 5).float().sum(),
        "rank": positive_rank.float().sum(),
        "emb_std": std * local,
    }
