"""Read uploaded files from a multipart/form-data request body.

Starlette's ``request.form()`` wraps each file in an ``UploadFile`` backed
by a ``SpooledTemporaryFile``, and FastAPI then validates the form against
the route's parameters. For one 28x28 PNG, ``request.form()`` alone took
more than twice as long as python-multipart's parser. `read_form_files`
feeds the request stream to that parser directly, keeps the parts of one
field in memory and rejects a part as soon as it passes the byte limit.
"""

import asyncio
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

# Room in a request body, beside the files themselves, for boundaries, part
# headers and small form fields that the server ignores.
FORM_OVERHEAD_BYTES = 64 * 1024
# A request whose body stops arriving for this long gets 408, and its
# connection is closed. nginx waits 60 s by default (client_body_timeout).
BODY_IDLE_TIMEOUT_SECONDS = 30.0
# The status nginx logs for a client that closed its connection before the
# response. The metrics count it, and no client ever receives it.
CLIENT_CLOSED_REQUEST = 499


def form_files_schema(field: str, description: str, *, multiple: bool) -> dict:
    """Return the OpenAPI request body of a form with one file field.

    Routes that call `read_form_files` declare no body parameter, so FastAPI
    cannot derive this part of the OpenAPI document. The schema matches the
    one FastAPI derives for a ``File()`` parameter.
    """
    file_schema = {"type": "string", "contentMediaType": "application/octet-stream"}
    field_schema: dict[str, Any] = (
        {"type": "array", "items": file_schema} if multiple else dict(file_schema)
    )
    field_schema.update(title=field.title(), description=description)

    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {field: field_schema},
                        "required": [field],
                    }
                }
            },
        }
    }


def missing_field_error(field: str, message: str) -> RequestValidationError:
    """Return the 422 error FastAPI sends for a missing body field."""
    return RequestValidationError(
        [{"type": "missing", "loc": ("body", field), "msg": message, "input": None}]
    )


def body_too_large_error(
    size: int | None, max_body_bytes: int, max_files: int, max_file_bytes: int
) -> HTTPException:
    """Return the 413 error for a body of ``size`` bytes, or of unknown size."""
    files = "one file" if max_files == 1 else f"{max_files} files"
    size_text = "is larger than" if size is None else f"is {size} bytes, more than"

    return HTTPException(
        status_code=413,
        detail=f"The request body {size_text} the limit of {max_body_bytes} bytes "
        f"for {files} of at most {max_file_bytes} bytes; send smaller images.",
    )


class _FormFiles:
    """Collects the files of one form field from ``MultipartParser`` callbacks."""

    def __init__(self, field: str, max_files: int, max_file_bytes: int) -> None:
        self.field = field
        self._field_bytes = field.encode()
        self.max_files = max_files
        self.max_file_bytes = max_file_bytes
        self.files: list[bytes] = []
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        # The content of the current part, or None when the part is not a file
        # of `field` and its content is skipped.
        self._content: bytearray | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def name_file(self, index: int) -> str:
        # Files are counted from 1, as people count them.
        return "Upload" if self.max_files == 1 else f"File {index + 1}"

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._content = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise HTTPException(
                status_code=400,
                detail="A multipart part has no name in its Content-Disposition "
                f'header; send `Content-Disposition: form-data; name="{self.field}"`.',
            )
        if options[b"name"] != self._field_bytes:
            return

        if len(self.files) == self.max_files:
            if self.max_files == 1:
                detail = (
                    f"The form has more than one `{self.field}` part; "
                    "send one image per request."
                )
            else:
                detail = (
                    f"The batch has at least {self.max_files + 1} files, more than "
                    f"the limit of {self.max_files}; split it into smaller batches."
                )
            raise HTTPException(status_code=413, detail=detail)
        self._content = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._content is None:
            return

        self._content += data[start:end]
        if len(self._content) > self.max_file_bytes:
            raise HTTPException(
                status_code=413,
                detail=f"{self.name_file(len(self.files))} is larger than "
                f"{self.max_file_bytes} bytes; send a smaller image.",
            )

    def on_part_end(self) -> None:
        if self._content is not None:
            self.files.append(bytes(self._content))
        self._content = None

    def on_end(self) -> None:
        self.ended = True


async def read_form_files(
    request: Request, field: str, *, max_files: int, max_file_bytes: int
) -> list[bytes]:
    """Read the files of form field ``field`` from the request body, in order.

    Parts of other fields are skipped. The body is read as it streams in and
    rejected once it, or one file, passes its limit.

    Raises
    ------
    HTTPException
        400 for a malformed multipart body, 413 for more than ``max_files``
        files, a file over ``max_file_bytes`` or a body over what those
        files need, 408 when the body stops arriving for
        ``BODY_IDLE_TIMEOUT_SECONDS``, 499 when the client disconnects before
        the body ends.
    RequestValidationError
        422 when the body is not multipart/form-data or has no ``field`` part.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        received = (
            f"is {content_type.decode('latin-1')}" if content_type else "is missing"
        )
        raise missing_field_error(
            field,
            f"Field required; the request's Content-Type {received}, so send "
            f"multipart/form-data with the image in a file field named `{field}`.",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(
            status_code=400,
            detail="The multipart/form-data Content-Type has no boundary "
            "parameter; let the HTTP client build the multipart body and its "
            "header.",
        )

    # Checked before reading the body when the client sends Content-Length,
    # and again as chunks arrive when it does not.
    max_body_bytes = max_files * max_file_bytes + FORM_OVERHEAD_BYTES
    content_length = request.headers.get("content-length", "")
    if content_length.isdigit() and int(content_length) > max_body_bytes:
        raise body_too_large_error(
            int(content_length), max_body_bytes, max_files, max_file_bytes
        )

    form = _FormFiles(field, max_files, max_file_bytes)
    received_bytes = 0
    loop = asyncio.get_running_loop()
    try:
        parser = MultipartParser(boundary, form.callbacks())
        # One timeout for the whole body, moved on by every chunk. A new
        # timeout for every chunk added 25 to 50 us to a small upload.
        async with asyncio.timeout(BODY_IDLE_TIMEOUT_SECONDS) as idle:
            async for chunk in request.stream():
                idle.reschedule(loop.time() + BODY_IDLE_TIMEOUT_SECONDS)
                received_bytes += len(chunk)
                if received_bytes > max_body_bytes:
                    raise body_too_large_error(
                        None, max_body_bytes, max_files, max_file_bytes
                    )
                parser.write(chunk)
    except TimeoutError as exc:
        # uvicorn closes the connection after a response with this header.
        raise HTTPException(
            status_code=408,
            detail=f"No part of the request body arrived for "
            f"{BODY_IDLE_TIMEOUT_SECONDS:g} s; send the request again.",
            headers={"Connection": "close"},
        ) from exc
    except FormParserError as exc:
        raise HTTPException(
            status_code=400,
            detail=f"The multipart body is malformed: {exc}. Let the HTTP client "
            "build the multipart body, for example with `curl -F file=@digit.png`.",
        ) from exc
    except ClientDisconnect as exc:
        raise HTTPException(
            status_code=CLIENT_CLOSED_REQUEST,
            detail="The client closed the connection before the body ended.",
        ) from exc
    if received_bytes == 0:
        raise missing_field_error(
            field,
            f"Field required; the request body is empty, so send the image in a "
            f"multipart file field named `{field}`.",
        )
    if not form.ended:
        raise HTTPException(
            status_code=400,
            detail="The multipart body ends before its closing boundary; the "
            "upload was cut off, so send it again.",
        )
    if not form.files:
        raise missing_field_error(
            field,
            f"Field required; send the image in a multipart file field named "
            f"`{field}`.",
        )

    return form.files
