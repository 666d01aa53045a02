"""Notice that the instance is about to go away.

Two things end a trainer early: EC2 reclaiming a spot instance, which it
announces about two minutes ahead in the instance metadata at
``/latest/meta-data/spot/instance-action``, and a stop or shutdown, which
reaches the container as SIGTERM (``docker stop`` waits 10 s by default;
the user data gives the trainer longer). Either one sets the same
`Interruption`, and the training loop saves a checkpoint and exits.

The metadata service is read with IMDSv2 tokens, as the launch template
requires. ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (the variable botocore
reads too) points it elsewhere; ``AWS_EC2_METADATA_DISABLED=true`` turns
polling off, which is what the local cloud does.
"""

import logging
import os
import signal
import threading
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_TTL_SECONDS = 300
POLL_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 1.0


class Interruption:
    """A flag that the instance is being stopped or reclaimed, with the reason."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            logger.warning("Interruption: %s", reason)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def handle_sigterm(interruption: Interruption) -> None:
    """Turn SIGTERM into an interruption instead of an immediate exit."""

    def handler(signum: int, frame: object) -> None:
        interruption.set("the instance is stopping (SIGTERM)")

    signal.signal(signal.SIGTERM, handler)


class SpotNoticeWatcher(threading.Thread):
    """Poll the instance metadata for a spot interruption notice."""

    def __init__(
        self,
        interruption: Interruption,
        endpoint: str | None = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        super().__init__(name="spot-notice", daemon=True)
        self.interruption = interruption
        self.endpoint = (
            endpoint
            or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            or DEFAULT_ENDPOINT
        ).rstrip("/")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"Instance metadata endpoint {self.endpoint!r} is not an http(s) "
                "URL; fix AWS_EC2_METADATA_SERVICE_ENDPOINT."
            )
        self.poll_seconds = poll_seconds
        self._stopped = threading.Event()

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true"

    def _token(self) -> str:
        request = urllib.request.Request(  # noqa: S310 (http(s) only, see __init__)
            f"{self.endpoint}/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
        )
        # The endpoint is checked to be http(s) in __init__.
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as reply:  # noqa: S310
            return reply.read().decode()

    def check(self) -> bool:
        """Return whether a notice is posted; metadata errors count as none."""
        try:
            request = urllib.request.Request(  # noqa: S310
                f"{self.endpoint}/latest/meta-data/spot/instance-action",
                headers={"X-aws-ec2-metadata-token": self._token()},
            )
            with urllib.request.urlopen(  # noqa: S310 (http(s) only, see __init__)
                request, timeout=REQUEST_TIMEOUT_SECONDS
            ) as reply:
                notice = reply.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # 404: no notice
                logger.warning("Instance metadata returned HTTP %s", exc.code)
            return False
        except OSError as exc:
            logger.warning("Instance metadata unreachable: %s", exc)
            return False

        self.interruption.set(f"spot interruption notice: {notice[:200]}")
        return True

    def run(self) -> None:
        while not self._stopped.wait(self.poll_seconds):
            if self.check():
                return

    def stop(self) -> None:
        self._stopped.set()
