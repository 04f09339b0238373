"""Orthogonal Gradient Projection (notes V3-4, GPM-style) for shared parameters.

After a task, per-image gradients of the training loss w.r.t. each protected shared
parameter are stacked and decomposed (SVD); the leading directions (energy
``threshold``, at most ``max_rank_per_task``) join that parameter's stored basis.
While later tasks train, each protected gradient is projected onto the orthogonal
complement of its basis, so updates leave earlier tasks' important directions alone.

Per parameter one orthonormal basis holds the union of all tasks' directions: a new
task's directions come from the SVD of its gradients *minus* their component in the
existing basis (as in GPM), and the union is re-orthonormalised, so one projection
``g - B (B^T g)`` is orthogonal to every stored direction.

Under V4 "complete separation" nothing shared trains after task 0; the callback then
warns once and does nothing (the notes remove OGP there). By default it also stores no
basis for a shared group the config freezes after task 0 (``flow.freeze_<group>_after_task0``):
no later update can touch it, and per-image gradients of the full base flow would need
``n_samples x 9M`` floats.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_moleflow.models.moleflow.lightning_model import eval_mode

logger = logging.getLogger(__name__)


class OrthogonalGradientProjection(Callback):
    """Project shared-parameter gradients away from earlier tasks' gradient subspaces.

    Args:
        threshold: Fraction of gradient energy a task's basis must capture.
        max_rank_per_task: Most directions added per parameter and task.
        n_samples: Training images (one gradient each) used to find the subspace.
        skip_frozen_groups: Store no basis for shared groups the model config freezes
            after task 0.
    """

    def __init__(
        self,
        threshold: float = 0.99,
        max_rank_per_task: int = 50,
        n_samples: int = 300,
        skip_frozen_groups: bool = True,
    ) -> None:
        self.threshold = threshold
        self.max_rank_per_task = max_rank_per_task
        self.n_samples = n_samples
        self.skip_frozen_groups = skip_frozen_groups
        self.bases: dict[str, torch.Tensor] = {}  # name -> (numel, rank), orthonormal columns, CPU
        self.ranks: dict[str, list[int]] = {}  # name -> directions added per stored task
        self.n_tasks = 0
        self._protected: list[tuple[str, str, torch.nn.Parameter]] = []  # (group, name, param)
        self._device_bases: dict[str, torch.Tensor] = {}
        self._warned = False

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Collect the trainable shared parameters; disable (with a warning) if none."""
        del trainer
        model = pl_module.model
        names = {id(p): n for n, p in model.named_parameters()}
        self._protected, seen = [], set()
        for group, params in model.shared_parameters().items():
            for p in params:
                if p.requires_grad and id(p) not in seen and id(p) in names:
                    seen.add(id(p))
                    self._protected.append((group, names[id(p)], p))
        if not self._protected and not self._warned:
            warnings.warn(
                "OrthogonalGradientProjection disabled: no shared parameter trains in this task "
                "(V4 complete separation), so there is nothing to protect.",
                stacklevel=2,
            )
            self._warned = True
        self._device_bases = {
            name: self.bases[name].to(device=p.device, dtype=p.dtype)
            for _, name, p in self._protected
            if name in self.bases
        }

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """In place: ``g <- g - B (B^T g)`` for every protected parameter with a basis."""
        del trainer, pl_module
        for _, name, p in self._protected:
            basis = self._device_bases.get(name)
            if basis is None or p.grad is None:
                continue
            g = p.grad.reshape(-1)
            p.grad.sub_((basis @ (basis.T @ g)).view_as(p.grad))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find this task's important gradient directions and add them to the bases."""
        targets = [(name, p) for group, name, p in self._protected if self._keeps_training(pl_module, group)]
        if not targets:
            if self._protected:
                logger.info("OGP: every trained shared group is frozen from now on; no basis stored.")
            return
        grads = self.sample_gradients(trainer, pl_module, targets)
        if not grads:
            return
        for name, _ in targets:
            self.add_task_gradients(name, torch.stack(grads[name]))
        self.n_tasks += 1
        self._device_bases = {}

    # ----------------------------------------------------------------- subspaces
    def _keeps_training(self, pl_module: LightningModule, group: str) -> bool:
        flow = pl_module.model.config.flow
        return not (self.skip_frozen_groups and getattr(flow, f"freeze_{group}_after_task0", False))

    def sample_gradients(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        targets: list[tuple[str, torch.nn.Parameter]],
    ) -> dict[str, list[torch.Tensor]]:
        """Per-image loss gradients (flattened, CPU) of ``targets`` over ``n_samples`` images."""
        del trainer
        grads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in targets}
        params = [p for _, p in targets]
        with eval_mode(pl_module):
            features_of_task = list(pl_module.training_features(self.n_samples))
        with eval_mode(pl_module), torch.enable_grad():
            for features in features_of_task:
                for i in range(len(features)):
                    loss, _ = pl_module.flow_loss(features[i : i + 1])
                    per_param = torch.autograd.grad(loss, params, allow_unused=True)
                    for (name, p), g in zip(targets, per_param, strict=True):
                        g = torch.zeros_like(p) if g is None else g
                        grads[name].append(g.detach().reshape(-1).float().cpu())
        return {name: g for name, g in grads.items() if g}

    def add_task_gradients(self, name: str, grads: torch.Tensor) -> int:
        """Extend the basis of ``name`` from one task's gradients ``(n, numel)``; return
        the number of directions added."""
        grads = grads.double()
        old = self.bases.get(name)
        total = (grads**2).sum()
        if old is not None:
            old = old.double()
            residual = grads - (grads @ old) @ old.T
        else:
            residual = grads
        added = 0
        free = grads.shape[1] - (0 if old is None else old.shape[1])
        if total > 0 and free > 0:
            captured = (total - (residual**2).sum()).clamp_min(0)
            _, s, vh = torch.linalg.svd(residual, full_matrices=False)
            energy = s**2
            if captured / total < self.threshold:
                cumulative = (captured + energy.cumsum(0)) / total
                added = int((cumulative < self.threshold).sum()) + 1
            significant = int((s > 1e-6 * total.sqrt()).sum())  # never add numerical noise
            added = min(added, self.max_rank_per_task, significant, free)
            if added > 0:
                union = vh[:added].T if old is None else torch.cat([old, vh[:added].T], dim=1)
                self.bases[name] = torch.linalg.qr(union).Q.float()
        self.ranks.setdefault(name, []).append(added)
        return added

    def project(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` with its component in the stored basis of ``name`` removed (a copy)."""
        basis = self.bases.get(name)
        if basis is None:
            return grad.clone()
        g = grad.reshape(-1)
        basis = basis.to(g)
        return (g - basis @ (basis.T @ g)).view_as(grad)

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Bases (by parameter name), ranks and task count, for the checkpoint."""
        return {
            "bases": {name: b.detach().cpu().clone() for name, b in self.bases.items()},
            "ranks": {name: list(r) for name, r in self.ranks.items()},
            "n_tasks": self.n_tasks,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.bases = {name: b.detach().cpu().float() for name, b in state_dict.get("bases", {}).items()}
        self.ranks = {name: list(r) for name, r in state_dict.get("ranks", {}).items()}
        self.n_tasks = int(state_dict.get("n_tasks", 0))
        self._device_bases = {}
