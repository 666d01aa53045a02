"""Starting instances through EC2 throttling, capacity and Spot errors.

moto starts every instance it is asked for, so a botocore hook on the test's
EC2 client returns EC2's own XML error response and HTTP status for chosen
RunInstances requests, the way the local cloud's fault proxy does, and
passes every other request to moto. botocore then parses and retries those
answers as it would EC2's.
"""

import io
from urllib.parse import parse_qs

import boto3
import botocore.endpoint
import pytest
import urllib3
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from moto.core.models import botocore_stubber

from mnist_pipeline import instances
from mnist_pipeline.localcloud.faults import (
    ON_DEMAND,
    SPOT,
    FaultRules,
    error_response,
)
from tests.conftest import REGION, instance_state, launch_template

TOKEN = "train-20261204T150000Z-1a2b3c4d"


class RunInstancesFaults(FaultRules):
    """Fault rules applied by a hook on one EC2 client, in moto's place."""

    def __init__(self, ec2) -> None:
        super().__init__()
        # botocore hands each request to every before-send handler, so this
        # hook replaces moto's on this client rather than running before it.
        ec2.meta.events.unregister("before-send", botocore_stubber)
        ec2.meta.events.register("before-send", self._answer)

    def _answer(self, request, event_name, **kwargs):
        code = None
        if event_name == "before-send.ec2.RunInstances":
            body = request.body
            text = body.decode() if isinstance(body, bytes) else body
            code = self.check({k: v[0] for k, v in parse_qs(text).items()})
        if code is None:
            return botocore_stubber(request=request, event_name=event_name, **kwargs)
        status, payload = error_response(code)
        raw = urllib3.HTTPResponse(body=io.BytesIO(payload), preload_content=False)

        return AWSResponse(request.url, status, {}, raw)

    def attempts(self) -> list[tuple[str | None, str]]:
        """Return the subnet and market of each request, botocore's retries included."""
        return [(request.subnet_id, request.market) for request in self.requests]


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2", region_name=REGION, config=instances.EC2_CONFIG)


@pytest.fixture
def faults(ec2) -> RunInstancesFaults:
    return RunInstancesFaults(ec2)


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays botocore sleeps for, recorded instead of slept."""
    delays: list[float] = []
    monkeypatch.setattr(botocore.endpoint.time, "sleep", delays.append)

    return delays


@pytest.fixture
def subnets(ec2) -> list[str]:
    """moto's default subnets in the first three Availability Zones."""
    found = ec2.describe_subnets(
        Filters=[{"Name": "default-for-az", "Values": ["true"]}]
    )["Subnets"]
    found.sort(key=lambda subnet: subnet["AvailabilityZone"])

    return [subnet["SubnetId"] for subnet in found[:3]]


def start(ec2, subnet_ids=(), spot=False, token=TOKEN, template=None) -> str:
    return instances.start_instance(
        ec2,
        template or launch_template(ec2),
        instances.TRAINER_ROLE,
        "test-stack",
        {instances.RUN_ID_TAG: "20261204T150000Z-1a2b3c4d"},
        token,
        subnet_ids=subnet_ids,
        spot=spot,
    )


def describe(ec2, instance_id: str) -> dict:
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]

    return reservation["Instances"][0]


def live_instances(ec2) -> list[str]:
    reservations = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
    )["Reservations"]

    return [i["InstanceId"] for r in reservations for i in r["Instances"]]


def test_starts_in_first_subnet_with_tags(ec2, faults, subnets):
    instance_id = start(ec2, subnets)

    instance = describe(ec2, instance_id)
    tags = instances.tags_of(instance)
    [request] = faults.requests
    assert instance["SubnetId"] == subnets[0]
    assert "InstanceLifecycle" not in instance  # On-Demand
    assert tags[instances.LAUNCH_TAG] == TOKEN
    assert tags[instances.ROLE_TAG] == instances.TRAINER_ROLE
    assert tags[instances.STACK_TAG] == "test-stack"
    assert request.client_token.endswith(TOKEN)
    assert len(request.client_token) <= 64


def test_no_subnets_leaves_placement_to_template(ec2, faults):
    start(ec2)

    assert faults.attempts() == [(None, ON_DEMAND)]


def test_throttling_is_retried_with_backoff(ec2, faults, subnets, sleeps):
    # GIVEN EC2 throttles the first two RunInstances requests
    faults.fail_run_instances("RequestLimitExceeded", times=2)

    instance_id = start(ec2, subnets)

    # THEN botocore retried the same attempt, same token, after jittered waits
    tokens = {request.client_token for request in faults.requests}
    assert describe(ec2, instance_id)["SubnetId"] == subnets[0]
    assert faults.attempts() == [(subnets[0], ON_DEMAND)] * 3
    assert len(tokens) == 1
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 1
    assert 0 <= sleeps[1] <= 2


def test_throttling_past_max_attempts_tries_no_other_subnet(
    ec2, faults, subnets, sleeps
):
    faults.fail_run_instances("RequestLimitExceeded")

    with pytest.raises(instances.InstanceStartError) as raised:
        start(ec2, subnets)

    assert faults.attempts() == [(subnets[0], ON_DEMAND)] * instances.MAX_ATTEMPTS
    assert len(sleeps) == instances.MAX_ATTEMPTS - 1
    assert "RequestLimitExceeded" in str(raised.value)
    assert "throttled" in str(raised.value)
    assert live_instances(ec2) == []


def test_capacity_error_moves_to_next_subnet(ec2, faults, subnets, sleeps):
    # GIVEN the first subnet's zone has no capacity for the instance type
    faults.fail_run_instances("InsufficientInstanceCapacity", subnet_ids=subnets[:1])

    instance_id = start(ec2, subnets)

    # THEN botocore retried it in place (EC2 returns 500), then the next subnet won
    first = [r.client_token for r in faults.requests if r.subnet_id == subnets[0]]
    second = [r.client_token for r in faults.requests if r.subnet_id == subnets[1]]
    assert describe(ec2, instance_id)["SubnetId"] == subnets[1]
    assert len(first) == instances.MAX_ATTEMPTS
    assert len(second) == 1
    assert set(first).isdisjoint(second)
    assert live_instances(ec2) == [instance_id]


def test_unsupported_zone_moves_to_next_subnet(ec2, faults, subnets, sleeps):
    faults.fail_run_instances("Unsupported", subnet_ids=subnets[:2])

    instance_id = start(ec2, subnets)

    # Unsupported is a 400, which botocore does not retry
    assert faults.attempts() == [
        (subnets[0], ON_DEMAND),
        (subnets[1], ON_DEMAND),
        (subnets[2], ON_DEMAND),
    ]
    assert describe(ec2, instance_id)["SubnetId"] == subnets[2]
    assert sleeps == []


def test_spot_tried_in_every_subnet_before_on_demand(ec2, faults, subnets, sleeps):
    faults.fail_run_instances("Unsupported", market=SPOT)

    instance_id = start(ec2, subnets[:2], spot=True)

    assert faults.attempts() == [
        (subnets[0], SPOT),
        (subnets[1], SPOT),
        (subnets[0], ON_DEMAND),
    ]
    assert "InstanceLifecycle" not in describe(ec2, instance_id)


def test_spot_instance_when_spot_has_capacity(ec2, faults, subnets):
    instance_id = start(ec2, subnets, spot=True)

    assert faults.attempts() == [(subnets[0], SPOT)]
    assert describe(ec2, instance_id)["InstanceLifecycle"] == "spot"


def test_spot_price_error_falls_back_to_on_demand(ec2, faults, subnets):
    # GIVEN the Spot price is above what the request allows, in every zone
    faults.fail_run_instances("SpotMaxPriceTooLow", market=SPOT)

    instance_id = start(ec2, subnets, spot=True)

    # THEN one Spot attempt is enough to move to On-Demand in the first subnet
    assert faults.attempts() == [(subnets[0], SPOT), (subnets[0], ON_DEMAND)]
    assert describe(ec2, instance_id)["SubnetId"] == subnets[0]


def test_every_subnet_out_of_capacity_names_fix(ec2, faults, subnets, sleeps):
    faults.fail_run_instances("InsufficientInstanceCapacity")

    with pytest.raises(instances.InstanceStartError) as raised:
        start(ec2, subnets[:2], spot=True)

    error = raised.value
    markets = [(a.subnet_id, a.market) for a in error.attempts]
    assert markets == [
        (subnets[0], SPOT),
        (subnets[1], SPOT),
        (subnets[0], ON_DEMAND),
        (subnets[1], ON_DEMAND),
    ]
    assert {a.code for a in error.attempts} == {"InsufficientInstanceCapacity"}
    assert "after 4 attempt(s)" in str(error)
    assert "Add subnets in other Availability Zones to SubnetIds" in str(error)
    assert "choose another instance type" in str(error)
    assert live_instances(ec2) == []


def test_quota_error_ends_attempts_and_names_quota(ec2, faults, subnets):
    faults.fail_run_instances("VcpuLimitExceeded")

    with pytest.raises(instances.InstanceStartError) as raised:
        start(ec2, subnets)

    assert faults.attempts() == [(subnets[0], ON_DEMAND)]
    assert "VcpuLimitExceeded" in str(raised.value)
    assert "Service Quotas" in str(raised.value)


def test_other_error_ends_attempts_and_names_it(ec2, faults, subnets):
    faults.fail_run_instances("InvalidParameterValue")

    with pytest.raises(instances.InstanceStartError) as raised:
        start(ec2, subnets, spot=True)

    assert faults.attempts() == [(subnets[0], SPOT)]
    assert "InvalidParameterValue" in str(raised.value)
    assert "launch template" in str(raised.value)


def test_failed_start_leaves_no_instance_or_spot_request(ec2, faults, subnets):
    # GIVEN a Spot request left by an earlier attempt of this start
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    leftover_request = ec2.request_spot_instances(
        InstanceCount=1,
        LaunchSpecification={"ImageId": image_id, "InstanceType": "t3.small"},
        TagSpecifications=[
            {
                "ResourceType": "spot-instances-request",
                "Tags": [{"Key": instances.LAUNCH_TAG, "Value": TOKEN}],
            }
        ],
    )["SpotInstanceRequests"][0]["SpotInstanceRequestId"]

    # AND an attempt whose instance started although EC2 returned an error,
    # as when the response to a successful request is lost
    def report_failure(http_response, parsed, **kwargs):
        if http_response.status_code == 200:
            http_response.status_code = 500
            parsed["Error"] = {"Code": "InsufficientInstanceCapacity", "Message": ""}

    ec2.meta.events.register("after-call.ec2.RunInstances", report_failure)

    with pytest.raises(instances.InstanceStartError):
        start(ec2, subnets[:2], spot=True)

    # THEN every instance the attempts started is terminated, the request cancelled
    open_requests = ec2.describe_spot_instance_requests(
        Filters=[{"Name": "state", "Values": ["open", "active"]}]
    )["SpotInstanceRequests"]
    started = instances.instances_started_by(ec2, TOKEN, ["terminated"])
    assert len(started) == 4
    assert instances.instances_started_by(ec2, TOKEN) == []
    assert leftover_request not in [r["SpotInstanceRequestId"] for r in open_requests]


def test_running_instance_of_same_start_is_returned(ec2, faults, subnets):
    # GIVEN an invocation that started the instance and crashed before recording it
    first = start(ec2, subnets)

    # WHEN the event's next delivery starts again with the same token
    second = start(ec2, subnets)

    assert second == first
    assert len(faults.requests) == 1


def test_other_start_gets_its_own_instance(ec2, faults, subnets):
    first = start(ec2, subnets, token="serve-run-1")
    second = start(ec2, subnets, token="serve-run-2")

    assert second != first
    assert instance_state(ec2, first) == "running"


def test_template_interfaces_move_to_next_subnet(ec2, faults, subnets):
    # GIVEN a launch template whose network interface sets the security
    # group and a public address, as the stack's templates do
    vpc_id = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(
        GroupName="trainer", Description="trainer", VpcId=vpc_id
    )["GroupId"]
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    template = ec2.create_launch_template(
        LaunchTemplateName="with-interfaces",
        LaunchTemplateData={
            "ImageId": image_id,
            "InstanceType": "g4dn.xlarge",
            "NetworkInterfaces": [
                {
                    "DeviceIndex": 0,
                    "SubnetId": subnets[0],
                    "Groups": [group],
                    "AssociatePublicIpAddress": True,
                    "DeleteOnTermination": True,
                }
            ],
        },
    )["LaunchTemplate"]["LaunchTemplateId"]
    faults.fail_run_instances("Unsupported", subnet_ids=subnets[:1])

    instance_id = start(ec2, subnets, template=template)

    # THEN the instance is in the second subnet with the template's group
    [interface] = describe(ec2, instance_id)["NetworkInterfaces"]
    assert interface["SubnetId"] == subnets[1]
    assert [g["GroupId"] for g in interface["Groups"]] == [group]
    assert "PublicIp" in interface["Association"]


def test_client_error_outside_run_instances_propagates(ec2, faults, subnets):
    with pytest.raises(ClientError, match="InvalidLaunchTemplateId"):
        start(ec2, subnets, template="lt-0000000000000000f")
