"""python -m service [--host H] [--port P]: the service under uvicorn (settings: service/settings.py)."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from service.main import create_app
from service.settings import Settings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness goes false first; uvicorn then stops accepting connections,
    finishes the requests in flight, and the lifespan drains the batcher."""

    def __init__(self, config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame):
        self.state.draining = True
        super().handle_exit(sig, frame)


def main(argv=None) -> int:
    settings = Settings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    settings = settings.model_copy(update={"host": args.host, "port": args.port})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30,
        access_log=False,
    )
    server = DrainingServer(config, app.state.service)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
