"""Requests sent in a loop until stopped, each one's outcome counted: the soak's load.

Every request is accounted for by the client that sent it (succeeded, or failed with its error's
message), so a failed good request is counted where it happens, and a bad request passes only if
its answer is an error that names the problem.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

BAD_INPUT_ERROR = "bad input image"  # how the preprocess step's per-request errors begin


@dataclass
class Tally:
    """Outcomes of the requests of one payload."""

    sent: int = 0
    succeeded: int = 0
    errors: list[str] = field(default_factory=list)  # each failed request's error message

    @property
    def answered(self) -> int:
        return self.succeeded + len(self.errors)


class RequestLoop(threading.Thread):
    """Sends ``payloads`` ({name: encoded bytes or decoded uint8 array}) to ``model`` until
    :meth:`stop`, cycling through them, ``concurrency`` requests in flight
    (``client.detect.infer_iter``) and ``pause_s`` between sends.  ``tallies[name]`` counts what each
    request of that payload got, as the answers arrive.  ``client``: a tritonclient gRPC client of
    its own."""

    def __init__(self, client, model: str, payloads: dict, concurrency: int = 1, pause_s: float = 0.0):
        super().__init__(daemon=True)
        if not payloads:
            raise ValueError("RequestLoop needs at least one payload")
        self.client, self.model, self.payloads = client, model, payloads
        self.concurrency = max(1, concurrency)
        self.pause_s = pause_s
        self.tallies = {name: Tally() for name in payloads}
        self.error: BaseException | None = None  # what ended the loop early, if anything
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._names = list(payloads)

    def _requests(self):
        """The payloads in turn, each counted as sent when handed over, until :meth:`stop`."""
        k = 0
        while not self._stop_event.is_set():
            name = self._names[k % len(self._names)]
            k += 1
            with self._lock:
                self.tallies[name].sent += 1
            yield self.payloads[name]
            if self.pause_s:
                self._stop_event.wait(self.pause_s)

    def run(self) -> None:
        from client.detect import infer_iter

        try:
            replies = infer_iter(self.client, self._requests(), self.concurrency, self.model)
            for k, (result, _) in enumerate(replies):  # in sending order: payload k % len(names)
                tally = self.tallies[self._names[k % len(self._names)]]
                with self._lock:
                    if isinstance(result, Exception):
                        tally.errors.append(str(result)[:300])
                    else:
                        tally.succeeded += 1
        except Exception as e:  # noqa: BLE001  kept for the caller: the loop's thread can't raise to it
            self.error = e

    def stop(self, timeout: float = 120.0) -> None:
        """Send no more, wait for the answers in flight; raises RuntimeError if the loop died or hangs."""
        self._stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError(f"requests to {self.model} still in flight {timeout:.0f} s after stop")
        if self.error is not None:
            raise RuntimeError(f"request loop on {self.model} ended early: {self.error!r}") from self.error

    def totals(self) -> Tally:
        """All payloads' tallies added up."""
        with self._lock:
            out = Tally()
            for t in self.tallies.values():
                out.sent += t.sent
                out.succeeded += t.succeeded
                out.errors += t.errors
            return out


def request_checks(good: Tally, bad: Tally, expected_error: str = BAD_INPUT_ERROR) -> dict[str, bool]:
    """The soak's request criteria, as {statement with the counts: met?}: every good request sent was
    answered and none failed; every bad request sent got an error containing ``expected_error``."""
    named = sum(expected_error in e for e in bad.errors)
    return {
        f"good requests: {good.succeeded} of {good.sent} succeeded, {len(good.errors)} failed, "
        f"{good.sent - good.answered} unanswered": good.sent > 0 and good.succeeded == good.sent,
        f"bad requests: {named} of {bad.sent} answered with a '{expected_error}' error "
        f"({bad.succeeded} succeeded)": bad.sent > 0 and named == bad.sent,
    }


def unexpected_answers(good: dict[str, Tally], bad: dict[str, Tally], expected_error: str = BAD_INPUT_ERROR,
                       limit: int = 5) -> list[str]:
    """Up to ``limit`` examples, by payload name, of what broke :func:`request_checks`."""
    out = [f"{name}: failed: {e}" for name, t in good.items() for e in t.errors]
    out += [f"{name}: answered with another error: {e}" for name, t in bad.items() for e in t.errors
            if expected_error not in e]
    out += [f"{name}: succeeded {t.succeeded} times" for name, t in bad.items() if t.succeeded]
    return out[:limit]
