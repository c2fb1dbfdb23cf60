"""Graceful stop: SIGTERM or SIGUSR1 on any rank -> every rank checkpoints at the next step boundary and
exits 0. The handler only sets a flag; the training loop all-reduces it once per step (together with the
non-finite-loss flag), so every rank sees a request that reached any one of them. Slurm's `--signal`
before a time limit or preemption, `scancel --signal=USR1` and a plain `kill` all go through here."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
