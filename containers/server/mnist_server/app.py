"""FastAPI app that serves digit predictions.

At startup the app downloads the LiteRT model of its model version from S3,
checks it on the run's smoke digits and only then reports healthy. Once
``GET /health`` returns 200 on its own port, the app writes a ready report
to S3; that report is what lets the gate move users to this server.
"""

import contextlib
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Annotated, Any

import boto3
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from mnist_pipeline import keys
from mnist_pipeline.records import ServerReady, utc_now
from mnist_pipeline.settings import ServerSettings
from mnist_pipeline.store import PipelineStore
from mnist_server import page
from mnist_server.classifier import DigitClassifier
from mnist_server.metrics import MetricsMiddleware, ServerMetrics
from mnist_server.preprocess import InvalidImageError, preprocess

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 120
INLINE_DECODE_BYTES = 256 * 1024


class Health(BaseModel):
    status: str = Field(description="`ok` once a model is loaded")
    model_version: str | None = Field(description="Version of the loaded model")
    run_id: str | None = Field(description="Training run that produced the model")


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9, description="Most likely digit")
    confidence: float = Field(ge=0, le=1, description="Probability of `digit`")
    probabilities: list[float] = Field(
        min_length=10, max_length=10, description="Probability of each digit 0-9"
    )
    model_version: str = Field(description="Version of the model that predicted")
    run_id: str = Field(description="Training run that produced the model")


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="One result per file, in order")


def load_classifier(
    store: PipelineStore, model_version: str
) -> tuple[DigitClassifier, int]:
    """Download a model version and check it on its smoke digits."""
    model_content = store.get_bytes(keys.tflite_model(model_version))
    smoke_digits = store.get_bytes(keys.smoke_digits(model_version))
    if model_content is None or smoke_digits is None:
        raise FileNotFoundError(
            f"Model version {model_version} has no {keys.tflite_model(model_version)} "
            f"or {keys.smoke_digits(model_version)} in bucket {store.bucket}."
        )
    classifier = DigitClassifier(model_content, model_version)
    checked = classifier.check_smoke_digits(smoke_digits)

    return classifier, checked


def announce_ready(
    store: PipelineStore, settings: ServerSettings, checked: int
) -> None:
    """Wait until /health on this server's port returns 200, then report ready."""
    health_url = f"http://127.0.0.1:{settings.port}/health"
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        logger.error(
            "%s did not return 200 within %d s; not reporting ready",
            health_url,
            READY_TIMEOUT_SECONDS,
        )
        return

    store.put_server_ready(
        ServerReady(
            instance_id=settings.instance_id,
            model_version=settings.model_version,
            url=settings.advertised_url,
            ready_at=utc_now(),
            smoke_correct=checked,
            smoke_total=checked,
        )
    )
    logger.info("Reported ready at %s", keys.server_ready(settings.instance_id))


def create_app(
    settings: ServerSettings, s3: Any = None, announce: bool = True
) -> FastAPI:
    """Build the app for one model version.

    ``announce`` writes the ready report once healthy; tests that run the
    app in-process without a socket turn it off.
    """
    store = PipelineStore(s3 or boto3.client("s3"), settings.bucket)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        classifier, checked = load_classifier(store, settings.model_version)
        app.state.classifier = classifier
        logger.info(
            "Loaded model %s, %d smoke digits correct", settings.model_version, checked
        )
        if announce:
            threading.Thread(
                target=announce_ready, args=(store, settings, checked), daemon=True
            ).start()
        yield

    app = FastAPI(
        title="MNIST digit classifier",
        description="Predicts the handwritten digit in an uploaded image.",
        version=settings.model_version,
        lifespan=lifespan,
    )
    app.state.classifier = None
    metrics = ServerMetrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(page.router)

    # Routes are async: a small image is decoded and classified in well under
    # a millisecond, less than a hop to the thread pool costs. Uploads larger
    # than INLINE_DECODE_BYTES are decoded on the thread pool instead, so a
    # large photo does not stall the event loop.

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def read_health(request: Request) -> Any:
        """Report whether a model is loaded, and which."""
        classifier = request.app.state.classifier
        if classifier is None:
            return JSONResponse(
                status_code=503,
                content={"status": "loading", "model_version": None, "run_id": None},
            )

        # The model version is the id of the run that trained it.
        return Health(
            status="ok",
            model_version=classifier.model_version,
            run_id=classifier.model_version,
        )

    async def read_upload(upload: UploadFile, position: str) -> bytes:
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(
                status_code=413,
                detail=f"{position} is larger than {settings.max_upload_bytes} bytes.",
            )

        return data

    async def classify(
        classifier: DigitClassifier, data: bytes, position: str
    ) -> Prediction:
        try:
            if len(data) > INLINE_DECODE_BYTES:
                digit = await run_in_threadpool(preprocess, data)
            else:
                digit = preprocess(data)
        except InvalidImageError as exc:
            raise HTTPException(status_code=400, detail=f"{position}: {exc}") from exc

        probabilities = classifier.predict(digit)
        best = int(probabilities.argmax())
        metrics.predictions.labels(str(best), classifier.model_version).inc()

        return Prediction(
            digit=best,
            confidence=float(probabilities[best]),
            probabilities=probabilities.tolist(),
            model_version=classifier.model_version,
            run_id=classifier.model_version,
        )

    def loaded_classifier(request: Request) -> DigitClassifier:
        classifier = request.app.state.classifier
        if classifier is None:
            raise HTTPException(status_code=503, detail="No model is loaded yet.")

        return classifier

    @app.post("/predict", response_model=Prediction, responses={400: {}, 413: {}})
    async def create_prediction(
        request: Request,
        file: Annotated[UploadFile, File(description="PNG or JPEG image of one digit")],
    ) -> Prediction:
        """Classify the digit in an uploaded image."""
        classifier = loaded_classifier(request)
        data = await read_upload(file, "The file")

        return await classify(classifier, data, "The file")

    @app.post(
        "/predict/batch", response_model=BatchPrediction, responses={400: {}, 413: {}}
    )
    async def create_batch_prediction(
        request: Request,
        files: Annotated[
            list[UploadFile], File(description="PNG or JPEG images, one digit each")
        ],
    ) -> BatchPrediction:
        """Classify the digits in several uploaded images, in order."""
        classifier = loaded_classifier(request)
        if len(files) > settings.max_batch_files:
            raise HTTPException(
                status_code=413,
                detail=f"The batch has {len(files)} files, more than the limit of "
                f"{settings.max_batch_files}; split it into smaller batches.",
            )

        uploads = [
            await read_upload(upload, f"File {index}")
            for index, upload in enumerate(files)
        ]
        predictions = [
            await classify(classifier, data, f"File {index}")
            for index, data in enumerate(uploads)
        ]

        return BatchPrediction(predictions=predictions)

    @app.get("/metrics", include_in_schema=False)
    def read_metrics() -> Response:
        """Serve the Prometheus metrics."""
        return Response(
            generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return app
