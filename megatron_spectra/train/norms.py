"""The largest spectral norm, over the weight matrices, of the update direction before
clipping (U, the base optimizer's direction) and after it (H_c(U), what SPECTRA applies
times lr·alpha). Without clipping (adam, sgd) the two are the same.

- Spectra optimizers: an update observer of the inner optimizer catches this rank's ZeRO/TP
  pieces of U and H_c(U) after the clip, and the Megatron optimizer's `update_norms` measures
  them (what `--spectra-log-update-norms` does at every step; here only at the steps asked
  for).
- Other optimizers: the direction is read off the parameter change,
  U = (W·(1 - lr·wd) - W') / lr (decoupled weight decay, as Megatron's AdamW applies it; fp32
  params), and TP blocks are joined with one all-gather.

Measuring gathers every full matrix and takes its SVD, so it is for small models and is
done only at log steps. The result is the maximum over all pipeline stages, on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _parts(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


class UpdateNorms:
    def __init__(self, model_chunks, optimizer, weight_decay: float):
        from megatron.core import parallel_state as ps

        self.spectra = [p for p in _parts(optimizer) if getattr(p, "spectra_entries", None)]
        self.model_chunks, self.weight_decay = model_chunks, weight_decay
        self.reporter = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        self.armed = False
        self.caught: list[tuple] = []
        self.before_step: dict = {}
        for part in self.spectra:
            self._catch(part)

    def _catch(self, part) -> None:
        def observe(updates):
            if self.armed:
                self.caught.append((part, updates))

        part.optimizer.register_update_observer(observe)

    def arm(self) -> None:
        """Measure the coming optimizer step."""
        self.armed, self.caught = True, []
        if not self.spectra:
            self.before_step = {p: p.detach().float().clone() for p in self._matrices()}

    def measure(self, lr: float) -> tuple[float, float] | None:
        """(max ||U||_2, max ||H_c(U)||_2) of the step just taken, or None if it changed nothing."""
        self.armed = False
        if self.spectra:
            norms = self._spectra_norms()
        else:
            norms = self._delta_norms(lr) if lr > 0 else [(0.0, 0.0)]
        local = torch.tensor([max((b for b, _ in norms), default=0.0), max((a for _, a in norms), default=0.0)])
        local = local.to(next(self.model_chunks[0].parameters()).device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        self.caught, self.before_step = [], {}
        if local[0].item() == 0.0:  # lr 0 (first warmup step) or a skipped step
            return None
        return local[0].item(), local[1].item()

    # ------------------------------------------------------------------ spectra optimizers

    def _spectra_norms(self) -> list[tuple[float, float]]:
        norms = []
        for part, updates in self.caught:
            scalars = part.update_norms(updates)
            if "spectra/update-norm-before-max" in scalars:
                norms.append((scalars["spectra/update-norm-before-max"], scalars["spectra/update-norm-after-max"]))
        return norms

    # ------------------------------------------------------------------ other optimizers

    def _matrices(self) -> list[torch.Tensor]:
        return [p for chunk in self.model_chunks for p in chunk.parameters() if p.dim() == 2 and p.requires_grad]

    def _delta_norms(self, lr: float) -> list[tuple[float, float]]:
        from megatron.core import parallel_state as ps

        norms = []
        for p, old in self.before_step.items():
            u = (old * (1 - lr * self.weight_decay) - p.detach().float()) / lr
            full = join_tp_blocks(u, p, ps.get_tensor_model_parallel_group())
            if self.reporter:
                n = spectral_norm(full)
                norms.append((n, n))
        return norms


def join_tp_blocks(block: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """The full matrix from the TP blocks of a Megatron param (cut along `partition_dim`)."""
    if not getattr(param, "tensor_model_parallel", False) or group.size() == 1:
        return block
    gathered = torch.empty(group.size() * block.numel(), device=block.device)
    dist.all_gather_into_tensor(gathered, block.contiguous().view(-1), group=group)
    return torch.cat(list(gathered.view(group.size(), *block.shape)), dim=param.partition_dim)


def spectral_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(matrix.double(), ord=2).item()
