"""Run the sandbox app with uvicorn on 127.0.0.1, in the foreground or in a background thread."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from terralayr_etl.config import Settings, load_settings
from terralayr_etl.errors import ConfigError
from terralayr_etl.sandbox.app import create_app
from terralayr_etl.sandbox.engine import Engine
from terralayr_etl.sandbox.organisation import Organisation, load_organisation, synthetic_organisation

logger = logging.getLogger("terralayr_etl.sandbox")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free port."""
    # IPPROTO_TCP (not 0) lets asyncio set TCP_NODELAY; without it every request on a
    # kept-alive connection waits for the delayed ACK, about 40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port") from None
    sock.listen(2048)
    return sock


class SandboxServer:
    """A sandbox served by uvicorn in a daemon thread; use as a context manager.

    Example:
        with SandboxServer() as sandbox:
            print(sandbox.base_url)   # http://127.0.0.1:<free port>
    """

    def __init__(
        self,
        settings: Settings | None = None,
        organisation: Organisation | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
        latency_ms: float = 0,
        faults: str | None = None,
        engine: Engine | None = None,
        app=None,
        cache_mb: float = 0,
    ):
        self.settings = settings or load_settings()
        self.organisation = organisation or load_organisation()
        self.engine = engine or Engine(self.organisation, seed=seed)
        # An explicit spec (CLI, tests) wins over the organisation's configured one.
        faults = faults if faults is not None else (self.organisation.faults or None)
        self.app = app or create_app(
            self.settings, self.organisation, self.engine, latency_ms=latency_ms, faults=faults, cache_mb=cache_mb
        )
        self.host = host
        self._socket = bind_socket(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> SandboxServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the sandbox did not start on {self.base_url}")
            time.sleep(0.02)
        logger.info("Sandbox listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve_forever(
    *,
    host: str,
    port: int,
    seed: int | None,
    latency_ms: float = 0,
    virtual_assets: int | None = None,
    faults: str | None = None,
    cache_mb: float = 0,
) -> None:
    """Serve the sandbox in the foreground until interrupted."""
    settings = load_settings()
    if virtual_assets:
        organisation = synthetic_organisation(virtual_assets, seed=seed or 1)
    else:
        organisation = load_organisation()
    faults = faults if faults is not None else (organisation.faults or None)
    app = create_app(settings, organisation, Engine(organisation, seed=seed), latency_ms=latency_ms, faults=faults, cache_mb=cache_mb)
    sock = bind_socket(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    print(f"Sandbox listening on {url} (organisation {organisation.id})", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down on Ctrl+C, then raises it again. For a server, a Ctrl+C stop is
        # a normal end, so the command exits with status 0.
        pass
    print(f"Sandbox on {url} stopped", flush=True)
