"""Polling and EC2 queries that the local-cloud tests share."""

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 60) -> T | None:
    """Poll ``condition`` every 0.5 s; return its first truthy result, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    return None


def described_instances(cloud: Any) -> list[dict]:
    """Return every EC2 instance the local cloud has started, in any state."""
    reservations = cloud.client("ec2").describe_instances()["Reservations"]
    return [instance for r in reservations for instance in r["Instances"]]


def instance_states(cloud: Any) -> dict[str, str]:
    """Map each instance id to its state name."""
    return {i["InstanceId"]: i["State"]["Name"] for i in described_instances(cloud)}
