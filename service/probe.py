"""The containers' health check (docker/Dockerfile's HEALTHCHECK, docker-compose.yml's healthcheck):
`python -m service.probe` exits 0 while GET /readyz answers 200, else 1 with one line saying why.

It asks where the service listens, from the same variables: ACMIX_PORT, and ACMIX_HOST (its loopback
where that is every address; a fixed 127.0.0.1 failed where ACMIX_HOST named one address). Standard
library only: it runs every 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

EVERY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def readyz_url(environ) -> str:
    host = environ.get("ACMIX_HOST", "0.0.0.0")
    host = EVERY_ADDRESS.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{environ.get('ACMIX_PORT', '8000')}/readyz"


def main(argv=None) -> int:
    # No options: --help says what it does (it probed instead), and a typo is refused, not ignored.
    argparse.ArgumentParser(prog="python -m service.probe", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    url = readyz_url(os.environ)
    # Straight to the service: a container's proxy variables (http_proxy) are for its way out.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4):
            return 0
    except urllib.error.HTTPError as exc:  # 503: /readyz says why
        try:
            why = json.loads(exc.read()).get("error") or exc.reason
        except ValueError:
            why = exc.reason
        print(f"not ready: {url}: {exc.code} {why}", file=sys.stderr)
    except Exception as exc:  # refused, a timeout, not HTTP at all, a bad ACMIX_PORT: one line, never a traceback
        print(f"not ready: {url}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
