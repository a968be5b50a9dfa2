"""Drain a tritonserver before it stops: its ensembles take no new request and finish those in flight.

On SIGTERM, tritonserver (2.51) waits up to ``--exit-timeout-secs`` for the requests in flight, but
refuses every new inference request at once, an ensemble's own requests to its steps included: an
ensemble request in flight at SIGTERM fails at its next step.  So the server is drained first:
the ensembles are unloaded (the server runs with ``--model-control-mode=explicit``), which Triton
does once their requests in flight are answered, refusing new ones meanwhile, while the steps stay
loaded to finish them.  SIGTERM then finds nothing in flight.

Through Triton's HTTP model-repository API and the standard library alone, so any Python can run
it: ``python3 -m fasterrcnn.drain http://127.0.0.1:8000 45`` (the Docker entrypoint does, on SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import urllib.error
import urllib.request

from python_backend import names

log = logging.getLogger(__name__)

ENSEMBLES = (names.ENSEMBLE, names.ENSEMBLE_RAW)
# a model in one of these states may still hold requests (Triton's model repository index)
BUSY_STATES = ("READY", "LOADING", "UNLOADING")
INDEX_TIMEOUT_S = 10.0  # one index call; a server too busy to answer in time is asked again


# the server is asked directly, never through a proxy that http_proxy or the like may name
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(url: str, timeout: float):
    request = urllib.request.Request(url, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def _busy(http_url: str, models) -> list[str]:
    index = _post(f"{http_url}/v2/repository/index", timeout=INDEX_TIMEOUT_S)
    return [m["name"] for m in index if m.get("name") in models and m.get("state") in BUSY_STATES]


def _gone(error: Exception) -> bool:
    """The server is not there any more (refused or reset), rather than slow to answer."""
    return isinstance(getattr(error, "reason", error), ConnectionError)


def _unload(http_url: str, name: str, timeout: float, refused: list[str]) -> None:
    try:
        _post(f"{http_url}/v2/repository/models/{name}/unload", timeout=timeout)
    except urllib.error.HTTPError as e:  # a server not in explicit model control refuses at once
        refused.append(f"{name}: HTTP {e.code} {e.read().decode(errors='replace')[:200]}")
    except (OSError, ValueError) as e:  # the index poll in drain() tells the outcome
        log.debug("unloading %s: %s", name, e)


class _NoAnswer(Exception):
    """The index did not answer before the drain's deadline."""


def _ask(http_url: str, models, deadline: float, poll_s: float) -> list[str] | None:
    """The models still holding requests; None when nothing listens at ``http_url``.  A server too
    busy to answer in time, or answering with an error, is asked again every ``poll_s`` until
    ``deadline`` (then :class:`_NoAnswer`)."""
    while True:
        try:
            return _busy(http_url, models)
        except (OSError, ValueError) as e:
            if _gone(e):
                return None
            if time.monotonic() >= deadline:
                log.warning("could not drain the server at %s: %s", http_url, e)
                raise _NoAnswer from e
            log.debug("the index did not answer yet: %s", e)
            time.sleep(poll_s)  # an error answered at once would otherwise be asked again in a busy loop


def drain(http_url: str, timeout: float, models=ENSEMBLES, poll_s: float = 0.2) -> bool:
    """Unload ``models`` from the server whose HTTP endpoint is ``http_url`` (``http://host:port``) and
    wait up to ``timeout`` s until none is loaded, that is, until the requests they held are
    answered.  True when drained in time, or when nothing listens there yet (a server still
    starting holds no request); False when time ran out, the server refused to unload, or it went
    away meanwhile (then SIGTERM stops it as it would have)."""
    http_url = http_url if "://" in http_url else f"http://{http_url}"
    deadline = time.monotonic() + timeout
    try:
        busy = _ask(http_url, models, deadline, poll_s)
        if busy is None:
            log.debug("nothing listens at %s: nothing to drain", http_url)
            return True
        # an unload call returns once Triton has taken it; the index tells when its requests are answered
        refused: list[str] = []
        for name in busy:
            threading.Thread(target=_unload, args=(http_url, name, timeout, refused), daemon=True).start()
        while busy and time.monotonic() < deadline:
            time.sleep(poll_s)
            if refused:
                log.warning("the server refused to unload %s (started without --model-control-mode=explicit?)",
                            "; ".join(refused))
                return False
            busy = _ask(http_url, models, deadline, poll_s)
            if busy is None:  # it went away meanwhile
                return False
    except _NoAnswer:
        return False
    return not busy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m fasterrcnn.drain",
                                     description="Drain a tritonserver before stopping it: unload the ensembles once "
                                                 "their requests in flight are answered. Exit 0 drained, 1 not.")
    parser.add_argument("url", help="the server's HTTP endpoint, http://host:port")
    parser.add_argument("timeout", type=float, help="seconds the requests in flight get")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="drain: %(message)s")
    ok = drain(args.url, args.timeout)
    log.info("ensembles drained" if ok else "requests still in flight after %.0f s", args.timeout)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
