"""Drain a tritonserver before it stops: its ensembles take no new request and finish those in flight.

On SIGTERM, tritonserver (2.51) waits up to ``--exit-timeout-secs`` for the requests in flight, but
refuses every new inference request at once, an ensemble's own requests to its steps included: an
ensemble request in flight at SIGTERM fails at its next step.  So the server is drained first:
the ensembles are unloaded (the server runs with ``--model-control-mode=explicit``), which Triton
does once their requests in flight are answered, refusing new ones meanwhile, while the steps stay
loaded to finish them.  SIGTERM then finds nothing in flight.

``python -m fasterrcnn.drain URL TIMEOUT`` does the same from a shell (the Docker entrypoint).
"""
from __future__ import annotations

import argparse
import logging
import threading
import time

from python_backend import names

log = logging.getLogger(__name__)

ENSEMBLES = (names.ENSEMBLE, names.ENSEMBLE_RAW)
# a model in one of these states may still hold requests (Triton's model repository index)
BUSY_STATES = ("READY", "LOADING", "UNLOADING")


def _busy(client, models) -> list[str]:
    index = client.get_model_repository_index()
    return [m.name for m in index.models if m.name in models and m.state in BUSY_STATES]


def drain(grpc_url: str, timeout: float, models=ENSEMBLES, poll_s: float = 0.2) -> bool:
    """Unload ``models`` from the server at ``grpc_url`` and wait up to ``timeout`` s until none of them
    is loaded, that is, until the requests they held are answered.  True when drained in time;
    False when time ran out or the server could not be asked (then SIGTERM stops it as it would)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    deadline = time.monotonic() + timeout
    try:
        busy = _busy(client, models)
    except Exception as e:  # noqa: BLE001 - a server that does not answer can't be drained
        log.warning("could not drain the server at %s: %s", grpc_url, e)
        return False
    # unloading returns once the model is gone, which is when its requests are answered: one thread each
    for name in busy:
        threading.Thread(target=_unload, args=(grpc_url, name, timeout), daemon=True).start()
    while busy and time.monotonic() < deadline:
        time.sleep(poll_s)
        try:
            busy = _busy(client, models)
        except Exception:  # noqa: BLE001 - the server went away: nothing left to wait for
            return False
    return not busy


def _unload(grpc_url: str, name: str, timeout: float) -> None:
    import tritonclient.grpc as grpcclient

    try:
        grpcclient.InferenceServerClient(grpc_url).unload_model(name, client_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - the poll in drain() tells the outcome
        log.debug("unloading %s: %s", name, e)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Drain a tritonserver before stopping it: unload the ensembles "
                                                 "once their requests in flight are answered.")
    parser.add_argument("url", help="the server's gRPC address, host:port")
    parser.add_argument("timeout", type=float, help="seconds to wait for the requests in flight")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="drain: %(message)s")
    ok = drain(args.url, args.timeout)
    log.info("drained" if ok else "not drained in %.0f s", args.timeout)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
