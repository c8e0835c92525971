"""The containers' health check (docker/Dockerfile's HEALTHCHECK, docker-compose.yml's healthcheck):
`python -m service.probe` exits 0 while GET /readyz answers 200, else 1 with one line saying why.

It asks where the service listens, from the same variables: ACMIX_PORT, and ACMIX_HOST (its loopback
where that is every address; a fixed 127.0.0.1 failed where ACMIX_HOST named one address). Standard
library only: it runs every 30 s.
"""

from __future__ import annotations

import os
import sys
import urllib.request

EVERY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def readyz_url(environ) -> str:
    host = environ.get("ACMIX_HOST", "0.0.0.0")
    host = EVERY_ADDRESS.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{environ.get('ACMIX_PORT', '8000')}/readyz"


def main() -> int:
    url = readyz_url(os.environ)
    try:
        with urllib.request.urlopen(url, timeout=4):
            return 0
    except OSError as exc:  # URLError, HTTPError (a 503), a timeout
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
