"""The local cloud's serving Elastic IP: a reverse proxy on one fixed port.

On AWS users reach the serving model at an Elastic IP, which the gate
moves to each new server once it is ready. Locally every instance is a
process on a port of its own, so `ServingAddressProxy` listens on one fixed
port on 127.0.0.1 and forwards each new TCP connection to the instance
that the Elastic IP is associated with in moto (``DescribeAddresses``).

A connection stays with the instance it was opened to until one side
closes it, so clients that keep connections alive keep talking to the
previous server until it is terminated. Unlike on AWS, where moving the
address cuts such connections off at once, the previous server keeps
serving them during the grace period.
"""

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger(__name__)

BUFFER_BYTES = 64 * 1024
# A new connection may use an association looked up this long ago. The
# previous server keeps running well beyond it after a cutover.
LOOKUP_MAX_AGE_SECONDS = 0.25
STOP_TIMEOUT_SECONDS = 5

Endpoint = tuple[str, int]


def listen(port: int, host: str = "127.0.0.1") -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free one.

    Raises
    ------
    OSError
        When the port is in use or cannot be bound.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)

    return listener


# On AWS an Elastic IP without a running instance accepts no connection.
# Locally the address responds 503 instead, so that a user who calls it
# before the first promotion reads why.
_NO_SERVER_DETAIL = (
    b'{"detail": "No model is serving yet: the serving address has no running '
    b"server. Upload a dataset and wait for a run to be promoted "
    b'(mnist-pipeline status)."}'
)
NO_SERVER_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_NO_SERVER_DETAIL)).encode() + b"\r\n"
    b"Connection: close\r\n\r\n" + _NO_SERVER_DETAIL
)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until end of stream, then half-close the other side.

    A reset or a failed write closes ``writer``, so the peer on that side
    sees the failure and the copy in the other direction ends too.
    """
    try:
        while data := await reader.read(BUFFER_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


class ServingAddressProxy:
    """Forward connections on one port to the holder of an Elastic IP.

    Parameters
    ----------
    listener
        A bound, listening socket from `listen`.
    ec2
        EC2 client of the local cloud (moto).
    allocation_id
        Allocation id of the Elastic IP that the gate moves.
    locate
        Returns the local host and port of an instance id, or None when the
        instance has no running server process.
    """

    def __init__(
        self,
        listener: socket.socket,
        ec2: Any,
        allocation_id: str,
        locate: Callable[[str], Endpoint | None],
    ) -> None:
        self.listener = listener
        self.ec2 = ec2
        self.allocation_id = allocation_id
        self.locate = locate
        host, port = listener.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.connections = 0
        self.rejected = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="serving-address", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._lookup_lock: asyncio.Lock | None = None
        self._target: Endpoint | None = None
        self._looked_up_at = float("-inf")

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result()
        logger.info("Serving address %s listening on %s", self.allocation_id, self.url)

    def stop(self) -> None:
        """Close the listener and every open connection, then the loop."""
        if not self._thread.is_alive():
            self.listener.close()
            self._loop.close()
            return
        future = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        future.result(timeout=STOP_TIMEOUT_SECONDS)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
        self._loop.close()

    async def _serve(self) -> None:
        self._lookup_lock = asyncio.Lock()
        self._server = await asyncio.start_server(self._accept, sock=self.listener)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def associated_endpoint(self) -> Endpoint | None:
        """Look up the Elastic IP's instance in EC2 and return its endpoint."""
        try:
            response = self.ec2.describe_addresses(AllocationIds=[self.allocation_id])
        except (BotoCoreError, ClientError) as exc:
            logger.warning("Looking up %s failed: %s", self.allocation_id, exc)
            return None
        instance_id = response["Addresses"][0].get("InstanceId")

        return self.locate(instance_id) if instance_id else None

    async def _endpoint(self, refresh: bool = False) -> Endpoint | None:
        """Return the holder's endpoint, looked up at most once per interval."""
        assert self._lookup_lock is not None
        async with self._lookup_lock:
            age = time.monotonic() - self._looked_up_at
            if refresh or age > LOOKUP_MAX_AGE_SECONDS:
                self._target = await asyncio.to_thread(self.associated_endpoint)
                self._looked_up_at = time.monotonic()

            return self._target

    async def _connect(
        self, refresh: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        endpoint = await self._endpoint(refresh)
        if endpoint is None:
            return None
        try:
            return await asyncio.open_connection(*endpoint)
        except OSError:
            return None

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.connections += 1
        try:
            # A server that ended since the last lookup refuses the
            # connection; look the holder up again once before giving up.
            upstream = await self._connect(refresh=False)
            if upstream is None:
                upstream = await self._connect(refresh=True)
            if upstream is None:
                self.rejected += 1
                if self.rejected == 1 or self.rejected % 100 == 0:
                    logger.warning(
                        "No running server holds %s; answered %d connections with 503",
                        self.allocation_id,
                        self.rejected,
                    )
                client_writer.write(NO_SERVER_RESPONSE)
                with contextlib.suppress(OSError):
                    await client_writer.drain()
                return
            upstream_reader, upstream_writer = upstream
            try:
                await asyncio.gather(
                    _pipe(client_reader, upstream_writer),
                    _pipe(upstream_reader, client_writer),
                )
            finally:
                upstream_writer.close()
        except asyncio.CancelledError:
            # `stop` cancels open connections. Python 3.11's start_server
            # logs a cancelled handler as an error, so end this one normally.
            pass
        finally:
            client_writer.close()
            self._handlers.discard(handler)
