"""Deliver S3 events to the Lambda handlers.

S3 sends each notification to an SQS queue per function, filtered by the
template's rules. moto builds the message exactly as S3 does, with a
URL-encoded key. The dispatcher receives each message and invokes the
function in a fresh process (`invoke`), with the message body as the event.
A failed invocation is retried when the message becomes visible again, and
after `MAX_ATTEMPTS` attempts SQS moves it to the function's dead-letter
queue, as Lambda's asynchronous invocation does with its retries.

Delivery is at least once and in no fixed order, as on AWS, so handlers
must tolerate both. The dispatcher runs several invocations at once, and
no more of one function than its reserved concurrency in the template.
"""

import concurrent.futures
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RETRY_AFTER_SECONDS = 5
CONCURRENT_INVOCATIONS = 4


class FunctionQueue:
    """A function and the queue that contains its pending events."""

    def __init__(
        self,
        name: str,
        code_dir: Path,
        handler: str,
        environment: dict[str, str],
        queue_url: str,
        log_path: Path,
        concurrency: int = CONCURRENT_INVOCATIONS,
    ) -> None:
        self.name = name
        self.code_dir = code_dir
        self.handler = handler
        self.environment = environment
        self.queue_url = queue_url
        self.log_path = log_path
        self.concurrency = concurrency


class EventDispatcher:
    """Poll each function's queue and invoke the function per message."""

    def __init__(self, sqs: Any, functions: list[FunctionQueue]) -> None:
        self.sqs = sqs
        self.functions = functions
        self.invocations = 0
        self.failures = 0
        self._stop = threading.Event()
        self._held: set[str] = set()
        # Held while a function's poller receives and submits messages.
        self._receiving = {function.name: threading.Lock() for function in functions}
        # One slot per invocation a function may run at once.
        self._slots = {
            function.name: threading.BoundedSemaphore(function.concurrency)
            for function in functions
        }
        self._threads: list[threading.Thread] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(CONCURRENT_INVOCATIONS)

    def start(self) -> None:
        for function in self.functions:
            thread = threading.Thread(
                target=self._poll,
                args=(function,),
                name=f"dispatch-{function.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Invoke nothing of function ``name`` inside the block.

        Its events wait in its queue and are delivered after the block, as
        with a Lambda function throttled to a reserved concurrency of 0.
        Events received before the block are still delivered.
        """
        if name not in self._receiving:
            raise ValueError(f"No event-driven function is named {name!r}.")
        self._held.add(name)
        # Let a receive that is under way finish, so that none starts later.
        with self._receiving[name]:
            pass
        try:
            yield
        finally:
            self._held.discard(name)

    def _poll(self, function: FunctionQueue) -> None:
        slots = self._slots[function.name]
        while not self._stop.is_set():
            if function.name in self._held or not slots.acquire(timeout=0.2):
                self._stop.wait(0.2)
                continue
            # A received message keeps its slot until its invocation ends.
            with self._receiving[function.name]:
                try:
                    messages = (
                        [] if function.name in self._held else self._receive(function)
                    )
                except Exception:
                    messages = []
                    if not self._stop.is_set():
                        logger.exception(
                            "Receiving events for %s failed", function.name
                        )
                        self._stop.wait(1)
                if messages:
                    self._pool.submit(self._deliver_in_slot, function, messages[0])
                else:
                    slots.release()

    def _receive(self, function: FunctionQueue) -> list[dict[str, Any]]:
        response = self.sqs.receive_message(
            QueueUrl=function.queue_url,
            MaxNumberOfMessages=1,
            WaitTimeSeconds=1,
            AttributeNames=["ApproximateReceiveCount"],
        )

        return response.get("Messages", [])

    def _deliver_in_slot(
        self, function: FunctionQueue, message: dict[str, Any]
    ) -> None:
        try:
            self._deliver(function, message)
        finally:
            self._slots[function.name].release()

    def _deliver(self, function: FunctionQueue, message: dict[str, Any]) -> None:
        event = json.loads(message["Body"])
        if "Records" not in event:
            # S3 sends an s3:TestEvent when the notification is configured.
            self._delete(function, message)
            return

        attempt = int(message["Attributes"]["ApproximateReceiveCount"])
        error = self.invoke(function, message["Body"])
        if error is None:
            self._delete(function, message)
            return

        self.failures += 1
        if attempt < MAX_ATTEMPTS:
            logger.warning(
                "%s failed (attempt %d of %d), retrying in %d s: %s",
                function.name,
                attempt,
                MAX_ATTEMPTS,
                RETRY_AFTER_SECONDS,
                error,
            )
            self.sqs.change_message_visibility(
                QueueUrl=function.queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=RETRY_AFTER_SECONDS,
            )
        else:
            logger.error(
                "%s failed %d times; the event goes to its dead-letter queue",
                function.name,
                attempt,
            )

    def _delete(self, function: FunctionQueue, message: dict[str, Any]) -> None:
        self.sqs.delete_message(
            QueueUrl=function.queue_url, ReceiptHandle=message["ReceiptHandle"]
        )

    def invoke(self, function: FunctionQueue, event_json: str) -> str | None:
        """Run the handler once in a new process.

        Returns None on success, else the last line of its error output.
        """
        self.invocations += 1
        completed = subprocess.run(  # noqa: S603
            [
                sys.executable,
                "-m",
                "mnist_pipeline.localcloud.invoke",
                str(function.code_dir),
                function.handler,
            ],
            input=event_json,
            capture_output=True,
            env={**os.environ, **function.environment},
            text=True,
            check=False,
        )
        with open(function.log_path, "a") as log:
            log.write(completed.stdout)
            log.write(completed.stderr)
        if completed.returncode == 0:
            return None

        lines = completed.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {completed.returncode}"


class Scheduler:
    """Invoke scheduled functions every ``interval`` seconds.

    The template's schedules are minutes apart. The local cloud runs them
    more often, so that their effect shows within seconds.
    """

    def __init__(
        self,
        dispatcher: EventDispatcher,
        functions: list[FunctionQueue],
        interval: float,
    ) -> None:
        self.dispatcher = dispatcher
        self.functions = functions
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="schedule", daemon=True)

    def start(self) -> None:
        if self.functions:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            for function in self.functions:
                event = json.dumps(scheduled_event(function.name))
                error = self.dispatcher.invoke(function, event)
                if error is not None:
                    logger.warning("Scheduled %s failed: %s", function.name, error)


def scheduled_event(rule: str) -> dict[str, Any]:
    """Return an EventBridge scheduled event as Lambda receives it."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": now,
        "region": "us-east-1",
        "resources": [f"arn:aws:events:us-east-1:123456789012:rule/{rule}"],
        "detail": {},
    }
