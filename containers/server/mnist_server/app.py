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
from typing import Any

import anyio
import boto3
from fastapi import FastAPI, HTTPException, Request
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
from mnist_server.preprocess import (
    MAX_WORKING_SIDE,
    InvalidImageError,
    open_image,
    read_digit,
)
from mnist_server.uploads import (
    CLIENT_CLOSED_REQUEST,
    form_files_schema,
    read_form_files,
)

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 120
# Images with more pixels, or files with more bytes, than these are decoded
# on a worker thread.
INLINE_DECODE_PIXELS = MAX_WORKING_SIDE * MAX_WORKING_SIDE
INLINE_DECODE_BYTES = 16 * 1024
# Worker threads that decode large images at once. Each may hold a whole
# decoded image (up to 100 MB for 25 megapixels of RGBA), so this bounds the
# memory that concurrent large uploads take.
DECODE_THREADS = 2
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed multipart body, or a file that is not an image"},
    413: {"description": "Too many files, or a file over the byte limit"},
    422: {"description": "No file field in the form"},
}


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
        app.state.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
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

    # Routes are async and decode and classify a small image on the event
    # loop, in about 0.2 ms. Handing that work to a worker thread halved the
    # /predict rate in benchmarks/serving.py, because the thread and the loop
    # contend for the GIL. Larger images are decoded on a worker thread
    # instead, so that they do not stall the event loop. Both the pixel count
    # and the file size set the cost: on 2 vCPUs, a 110 KB PNG of 5000x5000
    # pixels took 0.55 s to decode, and a 5 MB PNG made of 437,000 empty
    # chunks took 1.1 s.

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this response is sent.
        return JSONResponse(
            status_code=500,
            content={
                "detail": "The server failed on this request and logged the error; "
                "send it again, and report the failure if it repeats."
            },
        )

    # HEAD as well as GET, because load balancers and uptime checks use both.
    # The HEAD route stays out of the OpenAPI document, whose operation ids
    # must be unique.
    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    @app.head("/health", include_in_schema=False)
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

    async def classify(
        request: Request, classifier: DigitClassifier, data: bytes, position: str
    ) -> Prediction:
        try:
            image = open_image(data)
            pixels = image.width * image.height
            if pixels > INLINE_DECODE_PIXELS or len(data) > INLINE_DECODE_BYTES:
                digit = await anyio.to_thread.run_sync(
                    read_digit, image, limiter=request.app.state.decode_limiter
                )
            else:
                digit = read_digit(image)
        except InvalidImageError as exc:
            raise HTTPException(status_code=400, detail=f"{position}: {exc}") from exc

        probabilities = classifier.predict(digit)
        best = int(probabilities.argmax())
        metrics.count_prediction(best, classifier.model_version)

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

    # The prediction routes parse their multipart body with `read_form_files`
    # and return JSON bytes themselves. FastAPI then neither parses the form
    # into UploadFile objects nor validates and serializes the response a
    # second time. `response_model` and `openapi_extra` only document them.

    @app.post(
        "/predict",
        response_model=Prediction,
        responses=UPLOAD_ERRORS,
        openapi_extra=form_files_schema(
            "file", "PNG or JPEG image of one digit", multiple=False
        ),
    )
    async def create_prediction(request: Request) -> Response:
        """Classify the digit in an uploaded image."""
        classifier = loaded_classifier(request)
        (data,) = await read_form_files(
            request, "file", max_files=1, max_file_bytes=settings.max_upload_bytes
        )
        prediction = await classify(request, classifier, data, "Upload")

        return Response(prediction.model_dump_json(), media_type="application/json")

    @app.post(
        "/predict/batch",
        response_model=BatchPrediction,
        responses=UPLOAD_ERRORS,
        openapi_extra=form_files_schema(
            "files", "PNG or JPEG images, one digit each", multiple=True
        ),
    )
    async def create_batch_prediction(request: Request) -> Response:
        """Classify the digits in several uploaded images, in order."""
        classifier = loaded_classifier(request)
        uploads = await read_form_files(
            request,
            "files",
            max_files=settings.max_batch_files,
            max_file_bytes=settings.max_upload_bytes,
        )
        predictions = []
        for index, data in enumerate(uploads, start=1):
            # A client that left gets no more of its files decoded.
            if await request.is_disconnected():
                raise HTTPException(
                    status_code=CLIENT_CLOSED_REQUEST,
                    detail=f"The client disconnected before file {index} was read.",
                )
            predictions.append(
                await classify(request, classifier, data, f"File {index}")
            )
        batch = BatchPrediction(predictions=predictions)

        return Response(batch.model_dump_json(), media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    def read_metrics() -> Response:
        """Serve the Prometheus metrics."""
        return Response(
            generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    return app
