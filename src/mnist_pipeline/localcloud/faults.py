"""Fail chosen EC2 RunInstances requests, to test how the pipeline copes.

moto starts every instance it is asked for. `FaultProxy` is an HTTP proxy
on 127.0.0.1 in front of moto's server that forwards every EC2 request
unchanged, except RunInstances requests that match a `FaultRules` rule:
those get the error response EC2 returns when it has no capacity, throttles
or rejects a Spot request, in EC2's XML error format with its HTTP status.
The functions reach the proxy through the AWS SDK's own setting
``AWS_ENDPOINT_URL_EC2``, so the code under test is the production code.

`FaultRules` and `error_response` also serve unit tests, which answer
RunInstances from a botocore event hook instead of a proxy.

A development and test tool; nothing in the pipeline imports it.
"""

import dataclasses
import http.server
import logging
import threading
import uuid
from collections.abc import Mapping
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

import requests

logger = logging.getLogger(__name__)

SPOT = "spot"
ON_DEMAND = "on-demand"

# HTTP status of EC2's error response per error code; any other gets 400.
# EC2 counts capacity errors among its server errors (500), so botocore
# retries them in place before the pipeline tries another subnet.
ERROR_STATUS = {
    "InsufficientInstanceCapacity": 500,
    "InternalError": 500,
    "RequestLimitExceeded": 503,
    "Unavailable": 503,
}
ERROR_MESSAGES = {
    "InsufficientInstanceCapacity": (
        "We currently do not have sufficient capacity in the Availability Zone "
        "you requested. Our system will be working on provisioning additional "
        "capacity."
    ),
    "Unsupported": (
        "Your requested instance type is not supported in your requested "
        "Availability Zone."
    ),
    "RequestLimitExceeded": "Request limit exceeded.",
    "SpotMaxPriceTooLow": (
        "Your Spot request price is lower than the minimum required Spot "
        "request fulfillment price."
    ),
    "MaxSpotInstanceCountExceeded": "Max spot instance count exceeded.",
    "VcpuLimitExceeded": (
        "You have requested more vCPU capacity than your current vCPU limit "
        "allows for the instance bucket that the specified instance type "
        "belongs to."
    ),
}
# Headers of one HTTP connection, and those the proxy sets itself.
NOT_FORWARDED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)


@dataclasses.dataclass
class Fault:
    """One rule: fail matching RunInstances requests with an EC2 error.

    ``subnet_ids`` None matches any subnet and a request that names none;
    ``market`` None matches Spot and On-Demand; ``times`` None matches
    every request, else only that many.
    """

    code: str
    subnet_ids: frozenset[str] | None = None
    market: str | None = None
    times: int | None = None

    def matches(self, subnet_id: str | None, market: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.market is not None and self.market != market:
            return False

        return self.subnet_ids is None or subnet_id in self.subnet_ids


@dataclasses.dataclass(frozen=True)
class RunInstancesRequest:
    """A RunInstances request seen, and the error code it got (None: none)."""

    subnet_id: str | None
    market: str
    client_token: str | None
    error_code: str | None


def run_instances_target(form: Mapping[str, str]) -> tuple[str | None, str]:
    """Return the subnet and market of a RunInstances request's query fields.

    The subnet is the top-level ``SubnetId`` or that of the network
    interface with device index 0.
    """
    subnet_id = form.get("SubnetId")
    number = 1
    while subnet_id is None and f"NetworkInterface.{number}.DeviceIndex" in form:
        if form[f"NetworkInterface.{number}.DeviceIndex"] == "0":
            subnet_id = form.get(f"NetworkInterface.{number}.SubnetId")
        number += 1
    spot = form.get("InstanceMarketOptions.MarketType") == "spot"

    return subnet_id, SPOT if spot else ON_DEMAND


def error_response(code: str, message: str | None = None) -> tuple[int, bytes]:
    """Return the HTTP status and XML body of an EC2 error response."""
    text = message or ERROR_MESSAGES.get(code, f"The request failed with {code}.")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(text)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    )

    return ERROR_STATUS.get(code, 400), body.encode()


class FaultRules:
    """Thread-safe rules for RunInstances, with a log of every request seen."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.requests: list[RunInstancesRequest] = []

    def fail_run_instances(
        self,
        code: str,
        subnet_ids: list[str] | None = None,
        market: str | None = None,
        times: int | None = None,
    ) -> None:
        """Fail matching RunInstances requests with EC2's ``code`` error.

        The first rule added that matches a request decides its response.
        """
        subnets = None if subnet_ids is None else frozenset(subnet_ids)
        with self._lock:
            self._faults.append(Fault(code, subnets, market, times))

    def clear(self) -> None:
        """Remove every rule and forget the requests seen."""
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def check(self, form: Mapping[str, str]) -> str | None:
        """Record a RunInstances request; return the error code it gets, if any."""
        subnet_id, market = run_instances_target(form)
        with self._lock:
            fault = next(
                (f for f in self._faults if f.matches(subnet_id, market)), None
            )
            if fault is not None and fault.times is not None:
                fault.times -= 1
            code = fault.code if fault else None
            self.requests.append(
                RunInstancesRequest(subnet_id, market, form.get("ClientToken"), code)
            )

        return code


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: "_ProxyServer"
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        form = {
            name: values[0]
            for name, values in parse_qs(body.decode(errors="replace")).items()
        }
        code = None
        if form.get("Action") == "RunInstances":
            code = self.server.rules.check(form)
        if code is not None:
            logger.info("Failing RunInstances with %s", code)
            status, payload = error_response(code)
            self._reply(status, {"Content-Type": "text/xml;charset=UTF-8"}, payload)
            return

        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() not in NOT_FORWARDED_HEADERS
        }
        upstream = self.server.session.post(
            self.server.target_url + self.path, data=body, headers=headers
        )
        forwarded = {
            name: value
            for name, value in upstream.headers.items()
            if name.lower() not in NOT_FORWARDED_HEADERS | {"content-encoding"}
        }
        self._reply(upstream.status_code, forwarded, upstream.content)

    def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug(format, *args)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, target_url: str, rules: FaultRules) -> None:
        super().__init__(("127.0.0.1", port), _ProxyHandler)
        self.target_url = target_url.rstrip("/")
        self.rules = rules
        self.session = requests.Session()


class FaultProxy:
    """An EC2 endpoint on 127.0.0.1 that forwards to moto, failing by `rules`.

    EC2's API takes every request as a form-encoded POST, so the proxy
    forwards POST only; point just EC2 at it (``AWS_ENDPOINT_URL_EC2``).
    """

    def __init__(self, target_url: str, port: int = 0) -> None:
        self.rules = FaultRules()
        self._server = _ProxyServer(port, target_url, self.rules)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fault-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        logger.info("EC2 fault proxy listening on %s", self.url)

        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.session.close()
        self._thread.join(timeout=5)
