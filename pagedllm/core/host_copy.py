"""Results of a step copied to the host without waiting (prompt logprobs, pooled hidden states): the copies are
queued right after the values are computed, an event marks their end, and reading them back waits on it."""

from __future__ import annotations

from typing import TypeVar

import torch

_T = TypeVar("_T", bound="HostCopy")


class HostCopy:
    """Mixin of a result whose host copy is under way: the class has a ``_copied: torch.Event | None`` field."""

    __slots__ = ()
    _copied: torch.Event | None

    def _mark_copied(self, device: torch.device) -> None:
        """Record the end of the copies just queued from ``device`` (nothing to mark on the CPU)."""
        if device.type != "cpu":
            self._copied = torch.Event(device=device)
            self._copied.record()

    def wait(self: _T) -> _T:
        """Wait for the copies (nothing to wait for on the CPU); returns self."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self
