"""Run each EC2 instance of the local cloud as a local process.

The runner polls EC2 (moto) for the stack's instances. A new instance with
the trainer or server role becomes a ``python -m mnist_trainer`` or
``python -m mnist_server`` process, with the environment the launch
template's user data would give its container: the bucket, the instance
id, and every tag in `instances.TAG_ENVIRONMENT`. A server also gets a free
local port and the URL it is reachable at.

Terminating the instance through the API stops its process. A process
that exits terminates its instance, as ``shutdown -h now`` does with the
launch templates' ``InstanceInitiatedShutdownBehavior: terminate``.
"""

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mnist_pipeline import instances, settings

logger = logging.getLogger(__name__)

ENTRYPOINTS = {
    instances.TRAINER_ROLE: "mnist_trainer",
    instances.SERVER_ROLE: "mnist_server",
}
POLL_SECONDS = 0.5
# Like `docker run --stop-timeout` in the launch templates: time for the
# trainer to save a checkpoint after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class LocalInstance:
    instance_id: str
    role: str
    process: subprocess.Popen
    log_path: Path
    url: str | None = None


class InstanceRunner:
    """Keep one local process per running instance of the stack."""

    def __init__(
        self,
        ec2: Any,
        stack_name: str,
        bucket: str,
        environment: dict[str, str],
        log_dir: Path,
    ) -> None:
        self.ec2 = ec2
        self.stack_name = stack_name
        self.bucket = bucket
        self.environment = environment
        self.log_dir = log_dir
        self.instances: dict[str, LocalInstance] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="instances", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and end every process, as terminating would."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for instance in self.instances.values():
                self._end_process(instance)

    def running(self, role: str | None = None) -> list[LocalInstance]:
        with self._lock:
            return [
                instance
                for instance in self.instances.values()
                if instance.process.poll() is None and role in (None, instance.role)
            ]

    def endpoint_of(self, instance_id: str) -> tuple[str, int] | None:
        """Return the host and port of a running server process, or None."""
        with self._lock:
            local = self.instances.get(instance_id)
        if local is None or local.url is None or local.process.poll() is not None:
            return None
        parts = urlsplit(local.url)

        return parts.hostname or "127.0.0.1", parts.port or 80

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                if self._stop.is_set():
                    return
                logger.exception("Syncing local instances with EC2 failed")
            self._stop.wait(POLL_SECONDS)

    def _describe(self) -> list[dict[str, Any]]:
        paginator = self.ec2.get_paginator("describe_instances")
        pages = paginator.paginate(
            Filters=[
                {"Name": f"tag:{instances.STACK_TAG}", "Values": [self.stack_name]}
            ]
        )

        return [
            instance
            for page in pages
            for reservation in page["Reservations"]
            for instance in reservation["Instances"]
        ]

    def sync(self) -> None:
        """Start, stop and terminate so that processes match EC2's states."""
        for description in self._describe():
            instance_id = description["InstanceId"]
            state = description["State"]["Name"]
            with self._lock:
                local = self.instances.get(instance_id)
            if state in ("pending", "running") and local is None:
                self._launch(description)
            elif state in ("pending", "running") and local.process.poll() is not None:
                logger.info(
                    "Instance %s process exited with %s; terminating it",
                    instance_id,
                    local.process.returncode,
                )
                instances.terminate_instance(self.ec2, instance_id)
            elif state not in ("pending", "running") and local is not None:
                self._end_process(local)

    def _launch(self, description: dict[str, Any]) -> None:
        instance_id = description["InstanceId"]
        tags = instances.tags_of(description)
        role = tags.get(instances.ROLE_TAG)
        if role not in ENTRYPOINTS:
            logger.warning(
                "Instance %s has no known role tag, ignoring it", instance_id
            )
            return

        environment = {
            **os.environ,
            **self.environment,
            settings.BUCKET_NAME: self.bucket,
            settings.INSTANCE_ID: instance_id,
            # No instance metadata service here: the trainer's spot notice
            # polling stays off, and stops arrive as SIGTERM.
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for tag, variable in instances.TAG_ENVIRONMENT.items():
            if tag in tags:
                environment[variable] = tags[tag]
        url = None
        if role == instances.SERVER_ROLE:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            environment.update(
                {
                    settings.PORT: str(port),
                    settings.HOST: "127.0.0.1",
                    settings.ADVERTISED_URL: url,
                }
            )

        log_path = self.log_dir / f"{instance_id}-{role}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", ENTRYPOINTS[role]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,
            )
        with self._lock:
            self.instances[instance_id] = LocalInstance(
                instance_id, role, process, log_path, url
            )
        logger.info(
            "Instance %s (%s) started as process %d, log %s",
            instance_id,
            role,
            process.pid,
            log_path,
        )

    def _end_process(self, instance: LocalInstance) -> None:
        if instance.process.poll() is not None:
            return
        logger.info("Stopping instance %s (%s)", instance.instance_id, instance.role)
        os.killpg(instance.process.pid, signal.SIGTERM)
        try:
            instance.process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(instance.process.pid, signal.SIGKILL)
            instance.process.wait()
