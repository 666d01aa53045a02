"""Serving Lambda: the prediction API behind a Lambda function URL.

For users who want serverless serving instead of (or beside) the EC2 serving
host. Mangum adapts the same FastAPI app the server container runs. At cold
start the function loads the model version named by ``MODEL_VERSION``, or,
when that is unset, the version ``serving/current.json`` names, so it
follows promotions on its next cold start. It writes no ready report: the
gate's cutover concerns the EC2 host only.
"""

import os

import boto3
from mangum import Mangum
from mnist_server.app import create_app

from mnist_pipeline import settings
from mnist_pipeline.exceptions import SettingsError
from mnist_pipeline.store import PipelineStore


def _settings() -> settings.ServerSettings:
    environ = dict(os.environ)
    if not environ.get(settings.MODEL_VERSION):
        bucket = environ.get(settings.BUCKET_NAME, "")
        serving = PipelineStore(boto3.client("s3"), bucket).get_serving()
        if serving is None:
            raise SettingsError(
                f"No model is serving yet in bucket {bucket!r} and "
                f"{settings.MODEL_VERSION} is not set; promote a model first or "
                "set the variable."
            )
        environ[settings.MODEL_VERSION] = serving.model_version

    return settings.ServerSettings.from_env(environ)


app = create_app(_settings(), announce=False)
lambda_handler = Mangum(app, lifespan="auto")
