"""Start and stop the whole local cloud."""

import contextlib
import functools
import io
import json
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import boto3
import requests
from moto.s3 import notifications as s3_notifications
from moto.s3.responses import S3Response
from moto.server import ThreadedMotoServer

from mnist_pipeline import settings
from mnist_pipeline.exceptions import PipelineError
from mnist_pipeline.localcloud import address
from mnist_pipeline.localcloud import template as cfn
from mnist_pipeline.localcloud.dispatcher import (
    CONCURRENT_INVOCATIONS,
    MAX_ATTEMPTS,
    EventDispatcher,
    FunctionQueue,
    Scheduler,
)
from mnist_pipeline.localcloud.faults import FaultProxy
from mnist_pipeline.localcloud.runner import InstanceRunner
from mnist_pipeline.store import PipelineStore

logger = logging.getLogger(__name__)

REGION = "us-east-1"
ACCOUNT_ID = "123456789012"  # moto's default account
DEFAULT_PORT = 5000
DEFAULT_STACK_NAME = "mnist-pipeline-local"
# Availability Zones whose default subnets the stack gets as SubnetIds.
LOCAL_ZONES = 2
# Template parameter that the local cloud sets to ``server_grace_seconds``.
SERVER_GRACE_PARAMETER = "ServerGraceSeconds"


def _make_object_writes_atomic() -> None:
    """Check a PutObject's condition and write in one step, as S3 does.

    moto's server handles requests on several threads and checks
    ``If-None-Match`` and ``If-Match`` before it writes, in two steps, so
    two simultaneous conditional writes of one key could both succeed. The
    pipeline's upload lock relies on S3 refusing the second. One lock
    around moto's PutObject handler makes each write atomic again.
    """
    handler = S3Response.put_object
    if getattr(handler, "atomic", False):
        return
    lock = threading.Lock()

    @functools.wraps(handler)
    def put_object(self: S3Response) -> Any:
        with lock:
            return handler(self)

    put_object.atomic = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


def _add_version_ids_to_events() -> None:
    """Name the object version in moto's S3 event records, as S3 does.

    S3 puts ``versionId`` in each record of a versioned bucket, and the
    launcher uses it to distinguish two uploads of the same bytes. moto's
    event records leave it out.
    """
    build = s3_notifications._get_s3_event
    if getattr(build, "with_version_ids", False):
        return

    @functools.wraps(build)
    def build_with_version_id(
        event_name: str, bucket: Any, key: Any, notification_id: str
    ) -> dict[str, Any]:
        event = build(event_name, bucket, key, notification_id)
        if key.version_id and key.version_id != "null":
            for record in event["Records"]:
                record["s3"]["object"]["versionId"] = key.version_id

        return event

    build_with_version_id.with_version_ids = True  # type: ignore[attr-defined]
    s3_notifications._get_s3_event = build_with_version_id


class LocalCloudError(PipelineError):
    """The local cloud cannot start; the message names the fix."""


class LocalCloud:
    """moto's server plus the pipeline's resources, events and instances.

    Parameters
    ----------
    project_dir
        Directory holding template.yaml and functions/.
    port
        Port of moto's server on 127.0.0.1.
    state_dir
        Where function and instance logs go.
    parameter_overrides
        Template parameter values, as ``sam deploy --parameter-overrides``.
    schedule_seconds
        Seconds between runs of the scheduled functions (the reaper). Far
        shorter than the template's schedule, so their effect shows quickly.
    serving_port
        Port on 127.0.0.1 of the stable serving address, the local stand-in
        for the stack's Elastic IP; 0 picks a free port.
    server_grace_seconds
        Seconds a replaced server keeps running after a cutover, in place of
        the template's ``ServerGraceSeconds`` unless ``parameter_overrides``
        sets it. Short for the same reason as ``schedule_seconds``.
    inject_faults
        Send the functions' and instances' EC2 requests through a
        `faults.FaultProxy`, whose ``rules`` fail chosen RunInstances
        requests; for tests.

    Unless ``parameter_overrides`` sets them, ``VpcId`` and ``SubnetIds``
    name moto's default VPC and its subnets in the first ``LOCAL_ZONES``
    Availability Zones, as a deployment across zones would.
    """

    def __init__(
        self,
        project_dir: str | Path = ".",
        port: int = DEFAULT_PORT,
        state_dir: str | Path = ".localcloud",
        parameter_overrides: dict[str, str] | None = None,
        stack_name: str = DEFAULT_STACK_NAME,
        schedule_seconds: float = 30,
        serving_port: int = 0,
        server_grace_seconds: int = 10,
        inject_faults: bool = False,
    ) -> None:
        self.project_dir = Path(project_dir).resolve()
        self.template_path = self.project_dir / "template.yaml"
        if not self.template_path.is_file():
            raise LocalCloudError(
                f"{self.template_path} not found; run from the repository root or "
                "pass it with --project-dir."
            )
        self.port = port
        self.state_dir = Path(state_dir).resolve()
        self.parameter_overrides = {
            SERVER_GRACE_PARAMETER: str(server_grace_seconds),
            **(parameter_overrides or {}),
        }
        self.stack_name = stack_name
        self.schedule_seconds = schedule_seconds
        self.serving_port = serving_port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self.environment = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }
        self._server: ThreadedMotoServer | None = None
        self.dispatcher: EventDispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.runner: InstanceRunner | None = None
        self.serving_address: address.ServingAddressProxy | None = None
        self._serving_listener: socket.socket | None = None
        self.bucket = ""
        self.inject_faults = inject_faults
        self.faults: FaultProxy | None = None
        self.subnet_ids: list[str] = []

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto's fixed key
        )

    @property
    def store(self) -> PipelineStore:
        return PipelineStore(self.client("s3"), self.bucket)

    @property
    def serving_url(self) -> str | None:
        """The stable URL of the serving model, once the cloud has started."""
        if self._serving_listener is None:
            return None
        host, port = self._serving_listener.getsockname()[:2]

        return f"http://{host}:{port}"

    def start(self) -> "LocalCloud":
        """Start moto, create the stack's resources and start the workers."""
        if self.serving_port == self.port:
            raise LocalCloudError(
                f"The AWS endpoint and the serving address both asked for port "
                f"{self.port}; give --port and --serving-port different values."
            )
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        # moto's server waits forever for a port it cannot bind; check first.
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError as exc:
                raise LocalCloudError(
                    f"Port {self.port} on 127.0.0.1 is in use ({exc.strerror}); pass "
                    "a free one with --port (make demo PORT=...)."
                ) from exc
        try:
            self._serving_listener = address.listen(self.serving_port)
        except OSError as exc:
            raise LocalCloudError(
                f"Port {self.serving_port} on 127.0.0.1 is in use ({exc.strerror}); "
                "pass a free one with --serving-port."
            ) from exc
        _make_object_writes_atomic()
        _add_version_ids_to_events()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        with contextlib.redirect_stdout(io.StringIO()):
            self._server.start()  # moto prints a start banner to stdout
        # moto keeps its state in module globals, shared by every server in
        # this process: start from an empty cloud, as a new account would.
        requests.post(f"{self.endpoint_url}/moto-api/reset", timeout=30)
        logger.info("moto server listening on %s", self.endpoint_url)
        if self.inject_faults:
            self.faults = FaultProxy(self.endpoint_url).start()
            self.environment["AWS_ENDPOINT_URL_EC2"] = self.faults.url

        template = cfn.load_template(self.template_path)
        overrides = {**self._default_network(), **self.parameter_overrides}
        self.subnet_ids = [s for s in overrides["SubnetIds"].split(",") if s]
        values = cfn.StackValues(
            template, self.stack_name, REGION, ACCOUNT_ID, overrides
        )
        self._create_bucket(template, values)
        self._create_launch_templates(template, values)
        allocation_id = self._create_serving_address(template, values)
        functions = self._wire_functions(template, values)

        self.dispatcher = EventDispatcher(self.client("sqs"), functions)
        self.dispatcher.start()
        scheduled = [
            self._function(spec, values, queue_url="")
            for spec in cfn.functions(template)
            if spec.schedule
        ]
        self.scheduler = Scheduler(self.dispatcher, scheduled, self.schedule_seconds)
        self.scheduler.start()
        self.runner = InstanceRunner(
            self.client("ec2"),
            stack_name=self.stack_name,
            bucket=self.bucket,
            environment=self.environment,
            log_dir=self.state_dir / "logs",
        )
        self.runner.start()
        self.serving_address = address.ServingAddressProxy(
            self._serving_listener,
            self.client("ec2"),
            allocation_id,
            self.runner.endpoint_of,
        )
        self.serving_address.start()

        return self

    def stop(self) -> None:
        """End every instance process, the workers and moto."""
        if self.serving_address:
            self.serving_address.stop()
        elif self._serving_listener:
            self._serving_listener.close()
        if self.scheduler:
            self.scheduler.stop()
        if self.runner:
            self.runner.stop()
        if self.dispatcher:
            self.dispatcher.stop()
        if self._server:
            self._server.stop()
        if self.faults:
            self.faults.stop()
        logger.info("Local cloud stopped")

    def __enter__(self) -> "LocalCloud":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _create_bucket(self, template: dict[str, Any], values: cfn.StackValues) -> None:
        buckets = [
            (logical_id, resource)
            for logical_id, resource in template["Resources"].items()
            if resource["Type"] == "AWS::S3::Bucket"
        ]
        logical_id, resource = buckets[0]
        self.bucket = values.resolve(resource["Properties"]["BucketName"])
        values.set_resource(logical_id, self.bucket)

        s3 = self.client("s3")
        s3.create_bucket(Bucket=self.bucket)
        s3.put_bucket_versioning(
            Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
        )

    def _create_launch_templates(
        self, template: dict[str, Any], values: cfn.StackValues
    ) -> None:
        ec2 = self.client("ec2")
        image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        for logical_id, resource in template["Resources"].items():
            if resource["Type"] != "AWS::EC2::LaunchTemplate":
                continue
            data = resource["Properties"]["LaunchTemplateData"]
            created = ec2.create_launch_template(
                LaunchTemplateName=f"{self.stack_name}-{logical_id}",
                LaunchTemplateData={
                    # The template's AMIs come from public SSM parameters
                    # that moto lacks; any image does for a local process.
                    "ImageId": image_id,
                    "InstanceType": values.resolve(data["InstanceType"]),
                    "InstanceInitiatedShutdownBehavior": "terminate",
                },
            )
            values.set_resource(
                logical_id, created["LaunchTemplate"]["LaunchTemplateId"]
            )

    def _create_serving_address(
        self, template: dict[str, Any], values: cfn.StackValues
    ) -> str:
        """Allocate the template's Elastic IP in moto; return its allocation id."""
        addresses = [
            logical_id
            for logical_id, resource in template["Resources"].items()
            if resource["Type"] == "AWS::EC2::EIP"
        ]
        if len(addresses) != 1:
            raise LocalCloudError(
                f"{self.template_path} declares {len(addresses)} AWS::EC2::EIP "
                "resources; the local cloud serves exactly one."
            )
        allocated = self.client("ec2").allocate_address(Domain="vpc")
        values.set_resource(
            addresses[0], allocated["PublicIp"], AllocationId=allocated["AllocationId"]
        )

        return allocated["AllocationId"]

    def _default_network(self) -> dict[str, str]:
        """Return VpcId and SubnetIds for moto's default VPC."""
        ec2 = self.client("ec2")
        [vpc] = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])[
            "Vpcs"
        ]
        subnets = ec2.describe_subnets(
            Filters=[
                {"Name": "vpc-id", "Values": [vpc["VpcId"]]},
                {"Name": "default-for-az", "Values": ["true"]},
            ]
        )["Subnets"]
        subnets.sort(key=lambda subnet: subnet["AvailabilityZone"])
        subnet_ids = [subnet["SubnetId"] for subnet in subnets[:LOCAL_ZONES]]

        return {"VpcId": vpc["VpcId"], "SubnetIds": ",".join(subnet_ids)}

    def _wire_functions(
        self, template: dict[str, Any], values: cfn.StackValues
    ) -> list[FunctionQueue]:
        """Create a queue per function and point the bucket's events at it."""
        sqs = self.client("sqs")
        queue_configurations = []
        functions = []
        for spec in cfn.functions(template):
            if not spec.triggers:
                continue  # only S3-triggered functions belong to the loop
            queue_name = f"{self.stack_name}-{spec.logical_id}"
            dead_letter_url = sqs.create_queue(QueueName=f"{queue_name}-dlq")[
                "QueueUrl"
            ]
            dead_letter_arn = sqs.get_queue_attributes(
                QueueUrl=dead_letter_url, AttributeNames=["QueueArn"]
            )["Attributes"]["QueueArn"]
            queue_url = sqs.create_queue(
                QueueName=queue_name,
                Attributes={
                    "VisibilityTimeout": str(spec.timeout),
                    "RedrivePolicy": json.dumps(
                        {
                            "deadLetterTargetArn": dead_letter_arn,
                            "maxReceiveCount": str(MAX_ATTEMPTS),
                        }
                    ),
                },
            )["QueueUrl"]
            queue_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT_ID}:{queue_name}"
            for trigger in spec.triggers:
                rules = [{"Name": "prefix", "Value": trigger.prefix}]
                if trigger.suffix:
                    rules.append({"Name": "suffix", "Value": trigger.suffix})
                queue_configurations.append(
                    {
                        "Id": f"{spec.logical_id}-{trigger.name}",
                        "QueueArn": queue_arn,
                        "Events": trigger.events,
                        "Filter": {"Key": {"FilterRules": rules}},
                    }
                )

            functions.append(self._function(spec, values, queue_url))

        self.client("s3").put_bucket_notification_configuration(
            Bucket=self.bucket,
            NotificationConfiguration={"QueueConfigurations": queue_configurations},
        )

        return functions

    def _function(
        self, spec: cfn.FunctionSpec, values: cfn.StackValues, queue_url: str
    ) -> FunctionQueue:
        """Return a function with the environment the template gives it."""
        environment = {
            name: values.resolve(value) for name, value in spec.environment.items()
        }
        if settings.SERVING_URL in environment:
            # The template builds the URL from the Elastic IP's public
            # address, which moto makes up; locally it is the proxy's.
            environment[settings.SERVING_URL] = self.serving_url
        environment.update(self.environment)
        environment.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": f"{self.stack_name}-{spec.logical_id}",
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(spec.timeout),
                # No X-Ray daemon runs locally, as under `sam local invoke`.
                "POWERTOOLS_TRACE_DISABLED": "true",
            }
        )

        return FunctionQueue(
            name=spec.logical_id,
            code_dir=self.project_dir / spec.code_uri,
            handler=spec.handler,
            environment=environment,
            queue_url=queue_url,
            log_path=self.state_dir / "logs" / f"{spec.logical_id}.log",
            concurrency=min(
                spec.reserved_concurrency or CONCURRENT_INVOCATIONS,
                CONCURRENT_INVOCATIONS,
            ),
        )

    def export_lines(self) -> list[str]:
        """Return shell lines that point the CLI and the AWS SDK here."""
        lines = [f"export {name}={value}" for name, value in self.environment.items()]
        lines.append(f"export MNIST_PIPELINE_BUCKET={self.bucket}")

        return lines
