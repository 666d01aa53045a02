"""EC2 instances of the pipeline: tags, start and terminate.

Trainer and server instances start from the stack's launch templates, which
hold the AMI, instance type, profile and user data. Everything that differs
per instance travels as an instance tag. The user data reads the tags
through the instance metadata service and passes each tag in
`TAG_ENVIRONMENT` to the container as an environment variable. The local
cloud passes the same variables to its processes.

Starting an instance copes with EC2's throttling and capacity errors at
three levels:

1. The EC2 client made with `EC2_CONFIG` retries each request in place with
   botocore's standard retry mode: at most `MAX_ATTEMPTS` attempts, with
   exponential backoff and full jitter, for throttling (RequestLimitExceeded)
   and for EC2's 5xx errors. InsufficientInstanceCapacity is one of those
   5xx errors, so botocore retries it in place before the next level.
2. `start_instance` tries each subnet in turn while the errors are those of
   one Availability Zone (`ZONE_ERRORS`), Spot in every subnet before
   On-Demand, and On-Demand when Spot fails (`SPOT_ERRORS`).
3. When every attempt fails, it terminates the instances and cancels the
   Spot requests that the attempts may have created, then raises
   `InstanceStartError` with a message that names the fix.
"""

import dataclasses
import hashlib
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from botocore.config import Config
from botocore.exceptions import ClientError

from mnist_pipeline import settings
from mnist_pipeline.exceptions import PipelineError

logger = logging.getLogger(__name__)

ROLE_TAG = "mnist-pipeline:role"
STACK_TAG = "mnist-pipeline:stack"
RUN_ID_TAG = "mnist-pipeline:run-id"
MODEL_VERSION_TAG = "mnist-pipeline:model-version"
# The ``client_token`` of the `start_instance` call that created the
# instance or Spot request, so that a later call finds what it left.
LAUNCH_TAG = "mnist-pipeline:launch"

TRAINER_ROLE = "trainer"
SERVER_ROLE = "server"

TAG_ENVIRONMENT = {
    RUN_ID_TAG: settings.RUN_ID,
    MODEL_VERSION_TAG: settings.MODEL_VERSION,
}

MAX_ATTEMPTS = 4
# Requests per RunInstances attempt, the first one included. The standard
# mode sleeps rand(0, 1) * 2**n seconds before retry n (n from 0), so an
# attempt that keeps failing spends at most 7 s waiting.
EC2_CONFIG = Config(retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS})

SPOT = "spot"
ON_DEMAND = "on-demand"

# Errors of one Availability Zone: another subnet's zone may have capacity.
ZONE_ERRORS = frozenset(
    {"InsufficientInstanceCapacity", "Unsupported", "InsufficientFreeAddressesInSubnet"}
)
# Errors of the Spot market only: On-Demand may still start.
SPOT_ERRORS = frozenset(
    {
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
    }
)
QUOTA_ERRORS = frozenset(
    {"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"}
)
THROTTLING_ERRORS = frozenset({"RequestLimitExceeded", "Throttling"})

SPOT_MARKET_OPTIONS = {
    "MarketType": "spot",
    "SpotOptions": {
        "SpotInstanceType": "one-time",
        "InstanceInterruptionBehavior": "terminate",
    },
}
LIVE_STATES = ("pending", "running")
NOT_TERMINATED_STATES = ("pending", "running", "stopping", "stopped")


@dataclasses.dataclass(frozen=True)
class FailedAttempt:
    """One RunInstances request that EC2 rejected with an error."""

    market: str
    subnet_id: str | None
    code: str
    message: str

    def __str__(self) -> str:
        subnet = self.subnet_id or "the subnet EC2 picked"

        return f"{self.market} in {subnet}: {self.code}"


class InstanceStartError(PipelineError):
    """No attempt started the instance, and no attempt left one behind.

    ``attempts`` lists every failed RunInstances request in order.
    """

    def __init__(self, role: str, attempts: Sequence[FailedAttempt]) -> None:
        self.role = role
        self.attempts = list(attempts)
        tried = "; ".join(str(attempt) for attempt in self.attempts)
        super().__init__(
            f"EC2 started no {role} instance after {len(self.attempts)} "
            f"attempt(s) ({tried}). Last error: {self.attempts[-1].message} "
            f"{advice(self.attempts)}"
        )


def advice(attempts: Sequence[FailedAttempt]) -> str:
    """Return what an operator can do after these failed attempts."""
    last = attempts[-1].code
    if last in THROTTLING_ERRORS:
        return (
            "EC2 throttled the requests; the event is retried later. If this "
            "persists, reduce other EC2 API traffic in the account or request "
            "a higher EC2 API rate limit from AWS Support."
        )
    if last in QUOTA_ERRORS:
        return (
            "Request a higher quota for the instance type's family in Service "
            "Quotas (EC2 running On-Demand or Spot instances), or choose a "
            "smaller instance type."
        )
    if all(a.code in ZONE_ERRORS | SPOT_ERRORS for a in attempts):
        return (
            "Add subnets in other Availability Zones to SubnetIds, choose "
            "another instance type, or retry later."
        )

    return "Fix the launch template, subnet or IAM permission that the error names."


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _attempt_token(client_token: str, market: str, subnet_id: str | None) -> str:
    """Return the ClientToken of one attempt: the same for the same attempt.

    botocore's retries of an attempt resend the token, so a retry never
    starts a second instance. Another subnet or market gets another token,
    so a fallback attempt never gets the result of a failed one.
    """
    identity = f"{client_token}\n{market}\n{subnet_id or ''}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]

    return f"{digest}-{client_token}"[:64]


def _template_interfaces(ec2: Any, launch_template_id: str) -> list[dict[str, Any]]:
    """Return the network interfaces of a launch template as RunInstances takes them."""
    version = ec2.describe_launch_template_versions(
        LaunchTemplateId=launch_template_id, Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]
    operation = ec2.meta.service_model.operation_model("RunInstances")
    fields = operation.input_shape.members["NetworkInterfaces"].member.members
    interfaces = version["LaunchTemplateData"].get("NetworkInterfaces", [])

    return [
        {name: value for name, value in interface.items() if name in fields}
        for interface in interfaces
    ]


def _subnet_parameters(
    interfaces: list[dict[str, Any]], subnet_id: str | None
) -> dict[str, Any]:
    """Return the RunInstances parameters that put the instance in a subnet."""
    if subnet_id is None:
        return {}
    if not interfaces:
        return {"SubnetId": subnet_id}

    # EC2 rejects an instance-level SubnetId when the template has network
    # interfaces. The request repeats the template's interfaces in full, so
    # their security groups and public address do not depend on how EC2
    # merges an interface given in both places.
    placed = [
        {**interface, "SubnetId": subnet_id}
        if interface.get("DeviceIndex", 0) == 0
        else interface
        for interface in interfaces
    ]

    return {"NetworkInterfaces": placed}


def _tag_specifications(tags: dict[str, str], market: str) -> list[dict[str, Any]]:
    resource_types = ["instance"]
    if market == SPOT:
        resource_types.append("spot-instances-request")
    tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]

    return [{"ResourceType": kind, "Tags": tag_list} for kind in resource_types]


def instances_started_by(
    ec2: Any, client_token: str, states: Sequence[str] = LIVE_STATES
) -> list[str]:
    """Return the ids of instances that `start_instance` started with a token."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{LAUNCH_TAG}", "Values": [client_token]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )

    return [
        instance["InstanceId"]
        for page in pages
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]


def remove_leftovers(ec2: Any, client_token: str, spot: bool) -> None:
    """Cancel the Spot requests and terminate the instances a start left.

    A RunInstances request that fails creates nothing, but one whose outcome
    was lost (a timeout) may have. They all carry the start's token as a tag.
    """
    token_filter = {"Name": f"tag:{LAUNCH_TAG}", "Values": [client_token]}
    if spot:
        pages = ec2.get_paginator("describe_spot_instance_requests").paginate(
            Filters=[token_filter, {"Name": "state", "Values": ["open", "active"]}]
        )
        request_ids = [
            request["SpotInstanceRequestId"]
            for page in pages
            for request in page["SpotInstanceRequests"]
        ]
        if request_ids:
            ec2.cancel_spot_instance_requests(SpotInstanceRequestIds=request_ids)
            logger.warning("Cancelled leftover Spot requests %s", request_ids)

    for instance_id in instances_started_by(ec2, client_token, NOT_TERMINATED_STATES):
        terminate_instance(ec2, instance_id)
        logger.warning("Terminated leftover instance %s", instance_id)


def start_instance(
    ec2: Any,
    launch_template_id: str,
    role: str,
    stack_name: str,
    tags: dict[str, str],
    client_token: str,
    subnet_ids: Sequence[str] = (),
    spot: bool = False,
) -> str:
    """Start one instance from a launch template and return its id.

    Attempts go through ``subnet_ids`` in order, Spot in every subnet first
    when ``spot`` is set, then On-Demand. With no subnets, the instance goes
    where the launch template puts it. A zone error moves on to the next
    subnet, a Spot error moves on to On-Demand, and any other error ends the
    attempts. Use ``ec2`` made with `EC2_CONFIG`, whose retries handle
    throttling.

    ``client_token`` names this start, the same on every delivery of one
    event. When an instance started with it still runs, for example because
    an earlier invocation crashed before recording it, that instance's id is
    returned and nothing new starts.

    Raises
    ------
    InstanceStartError
        When no attempt started the instance. What the attempts may have
        created is cancelled or terminated first.
    """
    running = instances_started_by(ec2, client_token)
    if running:
        logger.info("Instance %s already started for %s", running[0], client_token)
        return running[0]

    all_tags = {
        ROLE_TAG: role,
        STACK_TAG: stack_name,
        "Name": f"{stack_name}-{role}",
        LAUNCH_TAG: client_token,
    }
    all_tags.update(tags)
    interfaces = _template_interfaces(ec2, launch_template_id) if subnet_ids else []
    markets = [SPOT, ON_DEMAND] if spot else [ON_DEMAND]
    failed: list[FailedAttempt] = []
    spot_failed = False
    for market, subnet_id in itertools.product(markets, subnet_ids or [None]):
        if market == SPOT and spot_failed:
            continue

        request = {
            "MinCount": 1,
            "MaxCount": 1,
            "LaunchTemplate": {
                "LaunchTemplateId": launch_template_id,
                "Version": "$Latest",
            },
            "ClientToken": _attempt_token(client_token, market, subnet_id),
            "TagSpecifications": _tag_specifications(all_tags, market),
            **_subnet_parameters(interfaces, subnet_id),
        }
        if market == SPOT:
            request["InstanceMarketOptions"] = SPOT_MARKET_OPTIONS
        try:
            response = ec2.run_instances(**request)
        except ClientError as exc:
            attempt = FailedAttempt(
                market,
                subnet_id,
                _error_code(exc),
                str(exc.response.get("Error", {}).get("Message", exc)),
            )
            failed.append(attempt)
            logger.warning("Starting a %s instance failed: %s", role, attempt)
            if attempt.code in ZONE_ERRORS:
                continue
            if market == SPOT and attempt.code in SPOT_ERRORS:
                spot_failed = True
                continue
            break

        instance_id = response["Instances"][0]["InstanceId"]
        logger.info("Started %s instance %s (%s)", role, instance_id, market)
        return instance_id

    remove_leftovers(ec2, client_token, spot)
    raise InstanceStartError(role, failed)


def terminate_instance(ec2: Any, instance_id: str) -> bool:
    """Terminate an instance; return False if EC2 reports it not found."""
    try:
        ec2.terminate_instances(InstanceIds=[instance_id])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return False
        raise

    return True


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    """Return an instance description's tags as a dict."""
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
