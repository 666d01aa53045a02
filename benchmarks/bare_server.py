"""The served model behind a bare ASGI app, kept only as a benchmark reference.

It does the image work of the shipped server's ``/predict`` with no web
framework: python-multipart's parser, `mnist_server.preprocess` and
`mnist_server.classifier` on the same LiteRT model, and a JSON response.
No routing, validation, error handling or metrics. Its request rate is the
most a single-process server could reach with this image work, so it shows
how much of ``/predict``'s cost the framework adds. Start it with
``MODEL_PATH=model.tflite uvicorn benchmarks.bare_server:app --http httptools
--loop uvloop``.
"""

import json
import os
from pathlib import Path

from mnist_server.classifier import DigitClassifier
from mnist_server.preprocess import preprocess
from python_multipart.multipart import MultipartParser, parse_options_header

classifier = DigitClassifier(Path(os.environ["MODEL_PATH"]).read_bytes(), "bare")
HEALTH = json.dumps({"status": "ok"}).encode()


def first_file(body: bytes, content_type: bytes) -> bytes:
    """Return the content of the first part of a multipart body."""
    _, options = parse_options_header(content_type)
    parts: list[bytes] = []
    content = bytearray()
    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_part_data": lambda data, start, end: content.extend(data[start:end]),
            "on_part_end": lambda: parts.append(bytes(content)),
        },
    )
    parser.write(body)

    return parts[0]


async def app(scope: dict, receive, send) -> None:
    if scope["type"] != "http":
        return

    if scope["path"] == "/predict":
        chunks = []
        more_body = True
        while more_body:
            message = await receive()
            chunks.append(message.get("body", b""))
            more_body = message.get("more_body", False)
        headers = dict(scope["headers"])
        image = first_file(b"".join(chunks), headers[b"content-type"])
        probabilities = classifier.predict(preprocess(image))
        digit = int(probabilities.argmax())
        body = json.dumps(
            {
                "digit": digit,
                "confidence": float(probabilities[digit]),
                "probabilities": probabilities.tolist(),
            }
        ).encode()
    else:
        body = HEALTH

    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
