"""Container entrypoint: ``python -m mnist_trainer``.

Reads its settings from the environment (`TrainerSettings`), trains the run
and exits 0 on success and 1 on failure. The instance's user data shuts the
instance down when this process exits, and on AWS shutdown terminates it.
"""

import logging
import sys

import boto3

from mnist_pipeline.settings import TrainerSettings
from mnist_trainer.job import train_run


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = TrainerSettings.from_env()
    meta = train_run(settings, boto3.client("s3"))

    return 0 if meta.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
