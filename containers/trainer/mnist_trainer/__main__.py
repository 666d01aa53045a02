"""Container entrypoint: ``python -m mnist_trainer``.

Reads its settings from the environment (`TrainerSettings`), trains the run
and exits 0 on success, 1 on failure and 75 when a stop or spot
interruption ended it after a checkpoint. The instance's user data shuts the
instance down when this process exits, and on AWS shutdown terminates it.
"""

import logging
import sys

import boto3

from mnist_pipeline.settings import TrainerSettings
from mnist_trainer.interruption import Interruption, SpotNoticeWatcher, handle_sigterm
from mnist_trainer.job import train_run

# Exit status of a run stopped by an interruption after it saved a
# checkpoint (EX_TEMPFAIL: a later instance resumes it).
EXIT_INTERRUPTED = 75


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = TrainerSettings.from_env()
    interruption = Interruption()
    handle_sigterm(interruption)
    watcher = SpotNoticeWatcher(interruption)
    if watcher.enabled():
        watcher.start()
    meta = train_run(settings, boto3.client("s3"), interruption)
    watcher.stop()

    if meta is None:
        return EXIT_INTERRUPTED
    return 0 if meta.succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
