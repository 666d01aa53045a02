"""Container entrypoint: ``python -m mnist_server``.

Serves the model version named by ``MODEL_VERSION`` on ``PORT`` (8000 by
default) with uvicorn. Exits non-zero when the model cannot be loaded or
fails its smoke check, so a broken model never takes traffic.
"""

import logging

import uvicorn

from mnist_pipeline.settings import ServerSettings
from mnist_server.app import create_app


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = ServerSettings.from_env()
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level="info"
    )


if __name__ == "__main__":
    main()
