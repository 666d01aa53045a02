"""The original design's server, kept only as a benchmark baseline.

Keras ``model.predict`` inside an ``async def`` endpoint, so every request
runs TensorFlow on the event loop. Start it with
``MODEL_PATH=model.keras uvicorn benchmarks.seed_server:app``.
"""

import io
import os

import keras
import numpy as np
from fastapi import FastAPI, File, UploadFile
from PIL import Image

app = FastAPI()
model = keras.models.load_model(os.environ["MODEL_PATH"])


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict:  # noqa: B008
    image = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
    pixels = np.asarray(image, dtype=np.float32).reshape(1, 28, 28, 1)
    probabilities = model.predict(pixels, verbose=0)[0]

    return {"digit": int(probabilities.argmax())}
