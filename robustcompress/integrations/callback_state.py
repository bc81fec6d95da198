"""The checkpointed state both framework callbacks share: the penalty engine's and the tracker's.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from robustcompress.optim import PenaltyHooks
    >>> class Holder(CallbackState):
    ...     def __init__(self, hooks):
    ...         self.hooks, self.tracker, self.track_every, self._tracker_state = hooks, None, None, None
    >>> model = nn.Linear(3, 2)
    >>> from robustcompress.optim import attach
    >>> from robustcompress.penalties import SpectralNormPenalty
    >>> hooks = attach(torch.optim.SGD(model.parameters(), lr=0.1), model, [SpectralNormPenalty(model, exclude_head=False)])
    >>> sorted(Holder(hooks).state_dict())
    ['penalties', 'tracker']
"""

from __future__ import annotations

from typing import Any

__all__ = ["CallbackState"]


class CallbackState:
    """``state_dict`` / ``load_state_dict`` of a callback holding ``hooks`` (a PenaltyHooks) and an optional tracker.

    The class using it sets ``hooks``, ``tracker`` (or None until the tracker
    is built), ``track_every`` (None: no tracker) and ``_tracker_state`` (a
    tracker state loaded before the tracker exists).
    """

    hooks: Any
    tracker: Any
    track_every: int | None
    _tracker_state: dict | None

    def state_dict(self) -> dict[str, Any]:
        """``{"penalties": PenaltyHooks.state_dict(), "tracker": Tracker.state_dict() or None}``."""
        tracker = self.tracker.state_dict() if self.tracker is not None else self._tracker_state
        return {"penalties": self.hooks.state_dict(), "tracker": tracker}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (checked before anything is loaded)."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"penalties", "tracker"}:
            raise ValueError("Expected the state of a robustcompress PenaltyCallback (keys penalties, tracker), "
                             f"but got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)}")
        saved_tracker = state_dict["tracker"]
        if (saved_tracker is None) != (self.track_every is None):
            raise ValueError(f"The checkpoint's callback {'had no' if saved_tracker is None else 'had a'} tracker; "
                             f"this one has track_every={self.track_every}")
        self.hooks.check_state_dict(state_dict["penalties"])
        if self.tracker is not None and saved_tracker is not None:
            self.tracker.load_state_dict(saved_tracker)
        else:
            self._tracker_state = saved_tracker
        self.hooks.load_state_dict(state_dict["penalties"])
