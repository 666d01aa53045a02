"""Container entrypoint: ``python -m mnist_server``.

Serves the model version named by ``MODEL_VERSION`` on ``PORT`` (8000 by
default) with uvicorn, on uvloop's event loop and httptools' HTTP parser
(both in the ``server`` extra). uvicorn writes no access log, because
``GET /metrics`` counts requests by route and status, and a log line adds
about a quarter to the server's CPU time per ``GET /health`` (measured with
benchmarks/serving.py on 2 vCPUs). Errors are still logged.

Exits non-zero when the model cannot be loaded or fails its smoke check, so
a broken model never takes traffic.
"""

import gc
import logging

import uvicorn

from mnist_pipeline.settings import ServerSettings
from mnist_server.app import create_app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = ServerSettings.from_env()
    app = create_app(settings)

    # Move the objects of the imports (about 74,000) out of the collector's
    # reach. Otherwise every full collection while serving scans them all,
    # which took 0.09 to 0.18 s on a busy 2-vCPU machine.
    gc.collect()
    gc.freeze()

    # NOTE: uvicorn does not time out a request whose headers arrive slowly
    # or not at all, so such clients keep their connections (and file
    # descriptors) until they close. Stalled bodies get 408 from the app.
    # Batches are bounded per request but not in total, so many concurrent
    # large batches add up in memory.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="info",
    )


if __name__ == "__main__":
    main()
