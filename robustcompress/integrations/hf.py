"""Penalties, projections and a tracker for the Hugging Face ``transformers.Trainer``, as one ``TrainerCallback``.

``PenaltyCallback(penalties)`` adds the penalty gradients once per optimizer
step, after the Trainer's gradient clipping (which comes before
``on_pre_optimizer_step``) and unclipped — the rule of
:func:`~robustcompress.optim.wrap` and the Lightning callback too. They are
added by a step pre-hook on the torch optimizer inside accelerate's wrapper,
i.e. in ``optimizer.step()`` right after ``on_pre_optimizer_step``: there the
gradients are unscaled also under fp16 with ``max_grad_norm=0``, and a step
that the ``GradScaler`` skips skips the penalties too. Proximal steps and
projections follow the update (step post-hook).

* Metrics: the summed penalty and, with ``track_every=N``, the tracker's
  records are added to the Trainer's logs (``robustcompress/<layer>/<metric>``).
* Checkpoints: ``on_save`` writes ``robustcompress.pt`` (penalty counters, the
  spectral state's warm vectors, the tracker's step count) into
  ``checkpoint-N/``; ``on_train_begin`` of a resumed run (``global_step > 0``)
  loads it from ``output_dir/checkpoint-N/``, or from ``resume_from=`` when the
  checkpoint lives elsewhere, and raises FileNotFoundError when it is missing.

Using this callback on an optimizer built by :func:`~robustcompress.optim.wrap`
raises a ValueError (the penalties would be added twice).

Example:
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, PrinterCallback, Trainer, TrainingArguments
    >>> from robustcompress.penalties import default_penalties
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=32, max_position_embeddings=8))
    >>> data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": i % 2} for i in range(8)]
    >>> cb = PenaltyCallback(default_penalties(model))
    >>> with tempfile.TemporaryDirectory() as out:
    ...     args = TrainingArguments(output_dir=out, use_cpu=True, report_to=[], max_steps=2,
    ...                              per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    ...     trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    ...     trainer.remove_callback(PrinterCallback)  # no log lines on stdout
    ...     _ = trainer.train()
    >>> cb.hooks.steps
    2
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..hooks import Tracker, track
from ..optim import PenaltyHooks, Projection
from ..spectral import SpectralState
from .callback_state import CallbackState

__all__ = ["PenaltyCallback", "STATE_FILE"]

#: the file the callback writes into each ``checkpoint-N/`` folder
STATE_FILE = "robustcompress.pt"


class PenaltyCallback(CallbackState, TrainerCallback):
    """Add penalties (and projections) to a ``transformers.Trainer`` run; save them with its checkpoints.

    Args:
        penalties: penalties built on the Trainer's model (or a submodule, or a
            shared ``SpectralState`` of it).
        projections: post-step :class:`~robustcompress.optim.Projection` objects.
        state: the shared ``SpectralState`` (found from the penalties when omitted).
        sync_state: broadcast the state's buffers from rank 0 after each state step (None: on CUDA only).
        track_every: run a tracker recording every N training forward passes; its
            records go into the Trainer's logs (None: no tracker).
        track_layers: the tracker's layers (as for :func:`~robustcompress.hooks.track`).
        resume_from: a ``checkpoint-N`` folder (or a ``robustcompress.pt`` file) to
            load the callback's state from at the start of training; None loads
            ``output_dir/checkpoint-<global_step>`` when the Trainer resumes.
    """

    def __init__(self, penalties: Sequence[Any] = (), projections: Sequence[Projection] = (),
                 state: SpectralState | None = None, sync_state: bool | None = None,
                 track_every: int | None = None, track_layers: Any = None,
                 resume_from: str | os.PathLike | None = None) -> None:
        self.hooks = PenaltyHooks.from_terms(penalties, projections, state, sync_state)
        if track_every is not None and (isinstance(track_every, bool) or not isinstance(track_every, int)
                                        or track_every < 1):
            raise ValueError(f"Expected track_every to be None or an int >= 1, but got track_every={track_every!r}")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(f"Expected resume_from to be a path or None, but got {type(resume_from).__name__}")
        self.track_every = track_every
        self.track_layers = track_layers
        self.resume_from = resume_from
        self.tracker: Tracker | None = None
        self._records: list[dict] = []
        self._tracker_state: dict | None = None
        self._logged_steps = -1

    # -------------------------------------------------------------- training
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        if model is not None and not any(m is self.hooks.model for m in model.modules()):
            raise ValueError("The penalties were built for a model that is not the Trainer's model nor one of its "
                             "submodules; build them from the model being trained")
        if optimizer is None:
            raise ValueError("The Trainer passed no optimizer to PenaltyCallback.on_train_begin")
        if self.track_every is not None and self.tracker is None:
            self.tracker = track(self.hooks.model, every=self.track_every, layers=self.track_layers,
                                 sink=self._records, state=self.hooks.spectral_state)
        path = self._resume_path(args, state)
        if path is not None:
            self.load(path)
        elif self._tracker_state is not None and self.tracker is not None:
            self.tracker.load_state_dict(self._tracker_state)
        self.hooks.detach()  # a previous run that raised left them attached
        # accelerate wraps the torch optimizer; the hooks go on the torch optimizer it steps.
        inner = getattr(optimizer, "optimizer", optimizer)
        self.hooks.attach(inner if isinstance(inner, torch.optim.Optimizer) else optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.hooks.detach()
        if self.tracker is not None:
            self._tracker_state = self.tracker.state_dict()
            self.tracker.remove()
            self.tracker = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # training logs only (not eval / the final summary)
            return
        extra: dict[str, float] = {}
        for r in self._records:
            extra[f"robustcompress/{r['layer']}/{r['metric']}"] = r["value"]
        self._records.clear()
        if self.hooks.last_penalty is not None and self.hooks.steps != self._logged_steps:
            extra["robustcompress/penalty"] = float(self.hooks.last_penalty)
            self._logged_steps = self.hooks.steps
        logs.update(extra)
        # The Trainer appended its copy of these logs to log_history just before on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    # -------------------------------------------------------------- checkpoints
    def load(self, path: str | os.PathLike) -> None:
        """Load the state from a ``checkpoint-N`` folder or a ``robustcompress.pt`` file.

        Raises:
            FileNotFoundError: the file is missing (the checkpoint was written without this callback).
        """
        file = pathlib.Path(path)
        if file.is_dir():
            file = file / STATE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"No robustcompress penalty state at {file}: the checkpoint was saved without "
                                    "PenaltyCallback, or lives elsewhere (pass resume_from=<checkpoint folder>)")
        self.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return  # every rank holds the same state; the main process writes it
        folder = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), folder / STATE_FILE)

    def _resume_path(self, args: Any, state: Any) -> pathlib.Path | None:
        if self.resume_from is not None:
            return pathlib.Path(self.resume_from)
        if state.global_step > 0:
            return pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        return None
