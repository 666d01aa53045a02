"""The local cloud's stable serving address, against moto's EC2."""

import http.client
import http.server
import json
import threading
import time

import pytest

from mnist_pipeline.localcloud.address import ServingAddressProxy, listen
from tests.conftest import launch_template


class NamedHandler(http.server.BaseHTTPRequestHandler):
    """Reply to every GET with the server's name and keep the connection open."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backends():
    """Two HTTP servers named ``a`` and ``b``, by name."""
    servers = {}
    for name in ("a", "b"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NamedHandler)
        server.daemon_threads = True
        server.name = name
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture
def instances(ec2):
    """Two instances in moto, by the name of the server each one runs."""
    template = launch_template(ec2)
    started = ec2.run_instances(
        MinCount=2,
        MaxCount=2,
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"},
    )
    return {
        name: instance["InstanceId"]
        for name, instance in zip(("a", "b"), started["Instances"], strict=True)
    }


@pytest.fixture
def address(ec2):
    return ec2.allocate_address(Domain="vpc")["AllocationId"]


@pytest.fixture
def proxy(ec2, address, instances, backends):
    running = {
        instances[name]: server.server_address[:2] for name, server in backends.items()
    }
    serving = ServingAddressProxy(listen(0), ec2, address, running.get)
    serving.start()
    yield serving
    serving.stop()


def get(connection: http.client.HTTPConnection) -> str:
    connection.request("GET", "/")
    return connection.getresponse().read().decode()


def answer_of_new_connection(proxy: ServingAddressProxy) -> str:
    host, port = proxy.listener.getsockname()[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        return get(connection)
    finally:
        connection.close()


def wait_for_answer(proxy, expected: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer_of_new_connection(proxy) == expected:
            return True
        time.sleep(0.05)
    return False


def test_new_connections_follow_the_address(proxy, ec2, address, instances):
    ec2.associate_address(AllocationId=address, InstanceId=instances["a"])
    assert wait_for_answer(proxy, "a")

    ec2.associate_address(
        AllocationId=address, InstanceId=instances["b"], AllowReassociation=True
    )

    assert wait_for_answer(proxy, "b")
    assert answer_of_new_connection(proxy) == "b"


def test_open_connection_stays_with_its_server(proxy, ec2, address, instances):
    ec2.associate_address(AllocationId=address, InstanceId=instances["a"])
    assert wait_for_answer(proxy, "a")
    host, port = proxy.listener.getsockname()[:2]
    kept_alive = http.client.HTTPConnection(host, port, timeout=10)
    assert get(kept_alive) == "a"

    ec2.associate_address(
        AllocationId=address, InstanceId=instances["b"], AllowReassociation=True
    )
    assert wait_for_answer(proxy, "b")

    assert get(kept_alive) == "a"
    kept_alive.close()


def no_server_response(proxy: ServingAddressProxy) -> http.client.HTTPResponse:
    host, port = proxy.listener.getsockname()[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", "/health")
    response = connection.getresponse()
    response.body = json.loads(response.read())
    connection.close()
    return response


def test_unassociated_address_answers_503(proxy):
    response = no_server_response(proxy)

    assert response.status == 503
    assert "No model is serving yet" in response.body["detail"]
    assert proxy.rejected == 1


def test_holder_without_server_answers_503(proxy, ec2, address):
    template = launch_template(ec2)
    [stray] = ec2.run_instances(
        MinCount=1,
        MaxCount=1,
        LaunchTemplate={"LaunchTemplateId": template, "Version": "$Latest"},
    )["Instances"]
    ec2.associate_address(AllocationId=address, InstanceId=stray["InstanceId"])

    assert no_server_response(proxy).status == 503
    assert proxy.rejected == 1


def test_stop_closes_open_connections(ec2, address, instances, backends):
    running = {instances["a"]: backends["a"].server_address[:2]}
    ec2.associate_address(AllocationId=address, InstanceId=instances["a"])
    serving = ServingAddressProxy(listen(0), ec2, address, running.get)
    serving.start()
    host, port = serving.listener.getsockname()[:2]
    kept_alive = http.client.HTTPConnection(host, port, timeout=10)
    assert get(kept_alive) == "a"

    serving.stop()

    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        get(kept_alive)


def test_port_in_use_is_reported():
    occupied = listen(0)
    try:
        with pytest.raises(OSError):
            listen(occupied.getsockname()[1])
    finally:
        occupied.close()
