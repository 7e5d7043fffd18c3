"""The stability guard: updates with a non-finite loss or gradient norm, or an outlier loss, never reach the weights."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

MIN_OBSERVATIONS = 20  # a z-score over fewer recent losses is too noisy to act on


class StabilityGuard:
    def __init__(self, spike_zscore: float, window: int, max_consecutive: int):
        self.spike_zscore = spike_zscore
        self.max_consecutive = max_consecutive
        self.history: deque[float] = deque(maxlen=max(window, 1))
        self.consecutive_skips = 0

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this update must be skipped, or None to apply it. Applied updates join the loss history."""
        reason = self._skip_reason(loss, grad_norm)
        if reason is None:
            self.consecutive_skips = 0
            self.history.append(loss)
        else:
            self.consecutive_skips += 1
        return reason

    @property
    def exhausted(self) -> bool:
        return self.consecutive_skips >= self.max_consecutive

    def _skip_reason(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self.spike_zscore > 0 and len(self.history) >= MIN_OBSERVATIONS:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            zscore = (loss - mean) / std if std > 0 else 0.0
            if zscore > self.spike_zscore:
                return f"loss spike ({loss:.4f}, z-score {zscore:.1f} over the last {len(self.history)} steps)"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])
        self.consecutive_skips = int(state["consecutive_skips"])
