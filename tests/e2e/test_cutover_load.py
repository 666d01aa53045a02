"""A promotion under load: users at the stable address see no failed request.

wrk keeps 32 connections busy with ``POST /predict`` at the local cloud's
serving address for 60 s, while a second upload is trained, promoted and
cut over. Each request opens a new connection (``Connection: close``), so
each one reaches the server that the Elastic IP is associated with at that
moment. A probe thread polls ``GET /health`` at the same address to record
the order in which the model versions responded.
"""

import os
import re
import shutil
import subprocess
import threading
import time

import pytest
import requests

from mnist_pipeline.cli import find_run, upload_dataset, wait_for_run
from mnist_pipeline.records import RunStatus

# pytest finds the module-scoped `cloud` fixture through this import, so the
# test's `cloud` parameter names it (F811).
from tests.conftest import png
from tests.e2e.helpers import instance_states, wait_until
from tests.e2e.test_loop import RUN_TIMEOUT_SECONDS, cloud  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

LOAD_SECONDS = 60
CONNECTIONS = 32
BOUNDARY = "mnist-load-test"

# Sends the multipart body from WRK_BODY_FILE and counts, per wrk thread,
# the model version of every response and the first and last one seen.
WRK_SCRIPT = """
local file = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
local boundary = os.getenv("WRK_BOUNDARY")
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.headers["Connection"] = "close"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  versions = {}
  first = nil
  last = nil
end

function response(status, headers, body)
  local version = body:match('"model_version"%s*:%s*"([^"]+)"') or ("status-" .. status)
  versions[version] = (versions[version] or 0) + 1
  first = first or version
  last = version
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "wrk-result: requests=%d connect=%d read=%d write=%d status=%d timeout=%d\\n",
    summary.requests, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout))
  for _, thread in ipairs(threads) do
    local counts = {}
    for version, count in pairs(thread:get("versions")) do
      table.insert(counts, version .. ":" .. count)
    end
    io.write(string.format("wrk-thread: first=%s last=%s counts=%s\\n",
      tostring(thread:get("first")), tostring(thread:get("last")),
      table.concat(counts, ",")))
  end
end
"""


def multipart_png(image) -> bytes:
    return (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png(image)
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


class HealthProbe(threading.Thread):
    """Poll GET /health on a new connection each time and record the versions."""

    def __init__(self, url: str) -> None:
        super().__init__(name="health-probe", daemon=True)
        self.url = url
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                response = requests.get(
                    f"{self.url}/health", headers={"Connection": "close"}, timeout=30
                )
            except requests.RequestException as exc:
                self.failures.append(type(exc).__name__)
                continue
            if response.status_code != 200:
                self.failures.append(f"{response.status_code}: {response.text[:100]}")
                continue
            self.versions.append(response.json()["model_version"])


def parse_wrk(output: str) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Return wrk's request and error counts and each thread's versions."""
    [totals] = re.findall(r"^wrk-result: (.*)$", output, re.MULTILINE)
    counts = {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", totals)}
    threads = [
        dict(re.findall(r"(\w+)=(\S*)", line))
        for line in re.findall(r"^wrk-thread: (.*)$", output, re.MULTILINE)
    ]

    return counts, threads


def versions_of(thread: dict[str, str]) -> dict[str, int]:
    pairs = (item.rsplit(":", 1) for item in thread["counts"].split(",") if item)
    return {version: int(count) for version, count in pairs}


def address_holder(local_cloud) -> str | None:
    [address] = local_cloud.client("ec2").describe_addresses()["Addresses"]
    return address.get("InstanceId") or None


def test_promotion_under_load_fails_no_request(cloud, mnist, tmp_path):  # noqa: F811
    wrk = shutil.which("wrk")
    if wrk is None:
        message = "Install wrk (apt-get install wrk) to run the load test."
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    store = cloud.store

    # GIVEN a model serving at the stable address
    key, etag = upload_dataset(store, mnist, "before-load", progress=False)
    first = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert first.status == RunStatus.PROMOTED, first.reason
    old = store.get_serving()
    assert old.url == cloud.serving_url
    assert address_holder(cloud) == old.instance_id

    # AND a second upload whose new server is starting
    key, etag = upload_dataset(store, mnist, "during-load", progress=False)

    def promotion_started():
        run = find_run(store, key, etag)
        return run is not None and run.status != RunStatus.TRAINING

    assert wait_until(promotion_started, timeout=RUN_TIMEOUT_SECONDS)
    starting = find_run(store, key, etag)
    assert starting.status == RunStatus.PROMOTING, starting.reason

    # WHEN wrk loads the stable address while the new server takes over
    body = tmp_path / "predict.body"
    body.write_bytes(multipart_png(mnist.x_test[0]))
    script = tmp_path / "predict.lua"
    script.write_text(WRK_SCRIPT)
    probe = HealthProbe(cloud.serving_url)
    probe.start()
    started = time.monotonic()
    try:
        result = subprocess.run(
            [
                wrk,
                "--threads",
                "2",
                "--connections",
                str(CONNECTIONS),
                "--duration",
                f"{LOAD_SECONDS}s",
                "--timeout",
                "30s",
                "--latency",
                "--script",
                str(script),
                f"{cloud.serving_url}/predict",
            ],
            env={**os.environ, "WRK_BODY_FILE": str(body), "WRK_BOUNDARY": BOUNDARY},
            capture_output=True,
            text=True,
            timeout=LOAD_SECONDS + 60,
            check=True,
        )
    finally:
        probe.stop.set()
        probe.join(timeout=60)
    elapsed = time.monotonic() - started
    print(f"\nwrk ran {elapsed:.0f} s:\n{result.stdout}")
    totals, threads = parse_wrk(result.stdout)

    # THEN no request failed
    assert totals["requests"] > 0
    for error in ("connect", "read", "write", "status", "timeout"):
        assert totals[error] == 0, f"{totals[error]} {error} errors"
    assert probe.failures == []

    # AND the responding model version changed from the old one to the new one
    run = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert run.status == RunStatus.PROMOTED, run.reason
    new = store.get_serving()
    assert new.model_version == run.run_id
    answered: dict[str, int] = {}
    for thread in threads:
        assert thread["first"] == old.model_version
        assert thread["last"] == new.model_version
        for version, count in versions_of(thread).items():
            answered[version] = answered.get(version, 0) + count
    assert set(answered) == {old.model_version, new.model_version}
    switch = probe.versions.index(new.model_version)
    assert probe.versions[:switch] == [old.model_version] * switch
    assert probe.versions[switch:] == [new.model_version] * (
        len(probe.versions) - switch
    )
    print(f"responses by model version: {answered}")

    # AND users keep the same URL, now held by the new server
    assert new.url == cloud.serving_url
    assert address_holder(cloud) == new.instance_id

    # AND the old server ends once the grace period has passed
    assert wait_until(
        lambda: instance_states(cloud)[old.instance_id] == "terminated", timeout=120
    )
    assert instance_states(cloud)[new.instance_id] == "running"
