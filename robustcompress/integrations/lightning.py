"""Penalties, projections and a tracker for ``lightning.Trainer``, as one ``Callback``.

``PenaltyCallback(penalties)`` attaches :class:`~robustcompress.optim.PenaltyHooks`
to the Trainer's optimizer when fitting starts. Per optimizer step (so once
per ``accumulate_grad_batches`` micro-batches):

* Lightning runs the closure (forward, backward), unscales AMP gradients,
  calls ``on_before_optimizer_step`` and clips the gradients;
* then the penalty gradients are added, unclipped (the optimizer's step
  pre-hook; with a closure-taking step, the hook wraps the closure so they
  come after Lightning's clipping inside it) — the rule of ``wrap`` and the
  Hugging Face callback too;
* the optimizer updates; proximal steps and projections follow (step post-hook).

Under ``"16-mixed"`` a ``GradScaler`` skips steps with inf/NaN gradients, and
the penalties with them. A fused optimizer (``fused=True``), which Lightning
does not unscale, gets its penalty gradients multiplied by the scale the
scaler hands it. Manual optimisation works: the penalties are added in every
``optimizer.step()`` the module calls (after any ``self.clip_gradients``).

Checkpoints: the callback's ``state_dict`` (penalty counters, the spectral
state's warm vectors, the tracker's step count) is saved in Lightning
checkpoints and restored with ``Trainer.fit(ckpt_path=...)``. With
``track_every=N`` a :func:`~robustcompress.hooks.track` tracker is run and
its records are logged through the module's logger as
``robustcompress/<layer>/<metric>``, beside ``robustcompress/penalty``.

Using this callback on an optimizer built by :func:`~robustcompress.optim.wrap`
raises a ValueError (the penalties would be added twice).

Example:
    >>> import torch, lightning as L
    >>> from torch import nn
    >>> from robustcompress.penalties import default_penalties
    >>> class Net(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ...     def training_step(self, batch, _):
    ...         x, y = batch
    ...         return nn.functional.cross_entropy(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> module = Net()
    >>> cb = PenaltyCallback(default_penalties(module.net))
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    >>> trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    >>> trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    >>> cb.hooks.steps
    2
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl

from ..hooks import Tracker, track
from ..optim import PenaltyHooks, Projection
from ..spectral import SpectralState
from .callback_state import CallbackState

__all__ = ["PenaltyCallback"]


class PenaltyCallback(CallbackState, pl.Callback):
    """Add penalties (and projections) to a Lightning training run; save them in its checkpoints.

    Args:
        penalties: penalties built on the LightningModule or one of its submodules
            (or on a shared ``SpectralState`` of it).
        projections: post-step :class:`~robustcompress.optim.Projection` objects.
        state: the shared ``SpectralState`` (found from the penalties when omitted).
        sync_state: broadcast the state's buffers from rank 0 after every state
            step (None: on CUDA only; CPU ranks agree bit for bit).
        optimizer_index: which of the module's optimizers carries the penalties.
        track_every: run a tracker recording every N training forward passes and
            log its metrics (None: no tracker).
        track_layers: the tracker's layers (as for :func:`~robustcompress.hooks.track`).
        log_penalty: log the summed penalty as ``robustcompress/penalty`` after each step.
    """

    def __init__(self, penalties: Sequence[Any] = (), projections: Sequence[Projection] = (),
                 state: SpectralState | None = None, sync_state: bool | None = None, optimizer_index: int = 0,
                 track_every: int | None = None, track_layers: Any = None, log_penalty: bool = True) -> None:
        super().__init__()
        self.hooks = PenaltyHooks.from_terms(penalties, projections, state, sync_state)
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"Expected optimizer_index to be an int >= 0, but got optimizer_index={optimizer_index!r}")
        if track_every is not None and (isinstance(track_every, bool) or not isinstance(track_every, int)
                                        or track_every < 1):
            raise ValueError(f"Expected track_every to be None or an int >= 1, but got track_every={track_every!r}")
        self.optimizer_index = optimizer_index
        self.track_every = track_every
        self.track_layers = track_layers
        self.log_penalty = bool(log_penalty)
        self.tracker: Tracker | None = None
        self._records: list[dict] = []
        self._tracker_state: dict | None = None
        self._logged_steps = -1

    # -------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(m is self.hooks.model for m in pl_module.modules()):
            raise ValueError("The penalties were built for a model that is not the LightningModule nor one of its "
                             "submodules; build them from the module being trained")
        if self.track_every is not None and self.tracker is None:
            self.tracker = track(self.hooks.model, every=self.track_every, layers=self.track_layers,
                                 sink=self._records, state=self.hooks.spectral_state)
            if self._tracker_state is not None:
                self.tracker.load_state_dict(self._tracker_state)
                self._tracker_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if self.optimizer_index >= len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index}, but the module configures "
                             f"{len(optimizers)} optimizer(s)")
        self.hooks.detach()  # a previous run that raised left them attached
        self.hooks.attach(optimizers[self.optimizer_index])

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.hooks.detach()
        if self.tracker is not None:
            # Keep what a later checkpoint / fit needs, then take the hooks off the model.
            self._tracker_state = self.tracker.state_dict()
            self.tracker.remove()
            self.tracker = None

    # -------------------------------------------------------------- logging
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics: dict[str, float] = {}
        for r in self._records:
            metrics[f"robustcompress/{r['layer']}/{r['metric']}"] = r["value"]
        self._records.clear()
        if self.log_penalty and self.hooks.steps != self._logged_steps and self.hooks.last_penalty is not None:
            metrics["robustcompress/penalty"] = self.hooks.last_penalty
            self._logged_steps = self.hooks.steps
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=trainer.logger is not None, prog_bar=False)
