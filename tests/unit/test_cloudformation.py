"""template.yaml, through the SAM transform, creates a stack in moto.

Creating the stack resolves every Ref, Fn::GetAtt, Fn::Sub, parameter and
condition, so a reference to a missing resource or attribute fails here.
The tests then check that the created resources point at each other.
Function settings name the launch templates and the bucket, and log
groups name the functions. Launch templates name their instance profiles,
security groups and images, and every S3 permission names the stack's
bucket.

NOTE: moto 5.2 skips two resource types of the template with a warning,
AWS::S3::BucketPolicy and AWS::Lambda::Url (so the stack is created with
ServerlessServing=false), and ignores the bucket's event notifications, the
functions' layers and dead-letter queue, and managed policies attached to
roles. tests/unit/test_template.py and test_iam.py check those parts from
the template itself.
"""

import ast
import base64
import copy
import io
import json
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.conftest import REGION, ROOT
from tests.sam_template import (
    ACCOUNT_ID,
    ARTIFACT_BUCKET,
    artifact_key,
    load_template,
    offline_aws,
    transform_template,
)

STACK_NAME = "mnist-pipeline"
TEMPLATE = load_template()
# moto has none of AWS's public AMI parameters for Deep Learning AMIs, so the
# trainer's AMI parameter names one that the fixture creates.
TRAINER_AMI_PARAMETER = "/test/deeplearning/ami-id"
SKIPPED_BY_MOTO = {"AWS::S3::BucketPolicy", "AWS::Lambda::Url"}


def empty_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("placeholder.py", "")

    return buffer.getvalue()


def prepare_account(template: dict[str, Any]) -> dict[str, str]:
    """Upload code placeholders and an AMI parameter, and return stack parameters."""
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=ARTIFACT_BUCKET)
    for logical_id in template["Resources"]:
        s3.put_object(
            Bucket=ARTIFACT_BUCKET, Key=artifact_key(logical_id), Body=empty_zip()
        )
    ec2 = boto3.client("ec2", region_name=REGION)
    [vpc] = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])[
        "Vpcs"
    ]
    subnets = ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}]
    )["Subnets"]
    image_id = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    boto3.client("ssm", region_name=REGION).put_parameter(
        Name=TRAINER_AMI_PARAMETER, Value=image_id, Type="String"
    )

    return {
        "VpcId": vpc["VpcId"],
        "SubnetIds": ",".join(subnet["SubnetId"] for subnet in subnets[:2]),
    }


def create_stack(
    template: dict[str, Any], parameters: dict[str, str], name: str = STACK_NAME
) -> dict[str, Any]:
    """Transform ``template`` and create it in moto as stack ``name``.

    Returns the transformed template, the parameters, the created resources
    by logical id and the stack's description.
    """
    transformed = transform_template(template)
    transformed["Parameters"]["TrainerAmiId"]["Default"] = TRAINER_AMI_PARAMETER
    cloudformation = boto3.client("cloudformation", region_name=REGION)
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=json.dumps(transformed),
        Parameters=[
            {"ParameterKey": key, "ParameterValue": value}
            for key, value in parameters.items()
        ],
        Capabilities=["CAPABILITY_IAM"],
    )
    summaries = cloudformation.list_stack_resources(StackName=name)[
        "StackResourceSummaries"
    ]

    return {
        "transformed": transformed,
        "parameters": parameters,
        "resources": {s["LogicalResourceId"]: s for s in summaries},
        "stack": cloudformation.describe_stacks(StackName=name)["Stacks"][0],
    }


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    with (
        offline_aws(managed_policies=False),
        pytest.warns(UserWarning, match="AWS::S3::BucketPolicy"),
    ):
        yield create_stack(TEMPLATE, prepare_account(TEMPLATE))


def physical_id(stack: dict, logical_id: str) -> str:
    return stack["resources"][logical_id]["PhysicalResourceId"]


def functions(stack: dict) -> dict[str, dict]:
    """Return each created function's configuration by logical id."""
    client = boto3.client("lambda", region_name=REGION)
    return {
        logical_id: client.get_function_configuration(
            FunctionName=physical_id(stack, logical_id)
        )
        for logical_id, resource in stack["transformed"]["Resources"].items()
        if resource["Type"] == "AWS::Lambda::Function"
        and logical_id in stack["resources"]
    }


def test_stack_creates_every_resource(stack):
    expected = {
        logical_id
        for logical_id, resource in stack["transformed"]["Resources"].items()
        if resource["Type"] not in SKIPPED_BY_MOTO
        and resource.get("Condition") != "ServerlessServingEnabled"
    }
    created = {
        logical_id
        for logical_id, summary in stack["resources"].items()
        if summary["ResourceStatus"] == "CREATE_COMPLETE"
    }

    assert stack["stack"]["StackStatus"] == "CREATE_COMPLETE"
    assert expected - created == set()


def test_function_settings_name_stack_resources(stack):
    bucket = physical_id(stack, "PipelineBucket")
    checked = 0
    for logical_id, configuration in functions(stack).items():
        variables = configuration["Environment"]["Variables"]
        template_variables = stack["transformed"]["Resources"][logical_id][
            "Properties"
        ]["Environment"]["Variables"]

        assert variables["BUCKET_NAME"] == bucket, logical_id
        assert variables["STACK_NAME"] == STACK_NAME, logical_id
        for name, value in template_variables.items():
            if isinstance(value, dict) and value.get("Ref") in stack["resources"]:
                assert variables[name] == physical_id(stack, value["Ref"]), name
                checked += 1

    assert checked >= 2  # the trainer and server launch template ids


def test_log_groups_collect_function_logs(stack):
    logs = boto3.client("logs", region_name=REGION)
    groups = {
        group["logGroupName"]
        for group in logs.describe_log_groups(logGroupNamePrefix="/aws/lambda/")[
            "logGroups"
        ]
    }

    for logical_id in ("LauncherFunction", "GateFunction", "ReaperFunction"):
        assert f"/aws/lambda/{physical_id(stack, logical_id)}" in groups, logical_id


def test_launch_templates_use_stack_resources(stack):
    ec2 = boto3.client("ec2", region_name=REGION)
    iam = boto3.client("iam", region_name=REGION)
    first_subnet = stack["parameters"]["SubnetIds"].split(",")[0]
    for name, profile, group in [
        ("TrainerLaunchTemplate", "TrainerInstanceProfile", "TrainerSecurityGroup"),
        ("ServerLaunchTemplate", "ServerInstanceProfile", "ServerSecurityGroup"),
    ]:
        [version] = ec2.describe_launch_template_versions(
            LaunchTemplateId=physical_id(stack, name)
        )["LaunchTemplateVersions"]
        data = version["LaunchTemplateData"]
        [interface] = data["NetworkInterfaces"]
        instance_profile = iam.get_instance_profile(
            InstanceProfileName=physical_id(stack, profile)
        )["InstanceProfile"]

        assert data["IamInstanceProfile"]["Arn"] == instance_profile["Arn"]
        assert len(instance_profile["Roles"]) == 1
        assert interface["Groups"] == [physical_id(stack, group)]
        assert interface["SubnetId"] == first_subnet
        assert ec2.describe_images(ImageIds=[data["ImageId"]])["Images"]


def test_user_data_pulls_stack_images(stack):
    ec2 = boto3.client("ec2", region_name=REGION)
    ecr = boto3.client("ecr", region_name=REGION)
    bucket = physical_id(stack, "PipelineBucket")
    for name, repository in [
        ("TrainerLaunchTemplate", "TrainerRepository"),
        ("ServerLaunchTemplate", "ServerRepository"),
    ]:
        [version] = ec2.describe_launch_template_versions(
            LaunchTemplateId=physical_id(stack, name)
        )["LaunchTemplateVersions"]
        script = base64.b64decode(version["LaunchTemplateData"]["UserData"]).decode()
        [uri] = [
            r["repositoryUri"]
            for r in ecr.describe_repositories()["repositories"]
            if r["repositoryName"] == physical_id(stack, repository)
        ]

        assert "${" not in script, name
        assert f"BUCKET_NAME={bucket}" in script, name
        assert f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com" in script, name
        assert uri.split("/", 1)[1] in script, name


def test_s3_permissions_name_the_stack_bucket(stack):
    iam = boto3.client("iam", region_name=REGION)
    bucket_arn = f"arn:aws:s3:::{physical_id(stack, 'PipelineBucket')}"
    roles = [
        logical_id
        for logical_id, resource in stack["transformed"]["Resources"].items()
        if resource["Type"] == "AWS::IAM::Role" and logical_id in stack["resources"]
    ]
    s3_resources = []
    for logical_id in roles:
        role_name = physical_id(stack, logical_id)
        for policy_name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
            document = iam.get_role_policy(RoleName=role_name, PolicyName=policy_name)[
                "PolicyDocument"
            ]
            # NOTE: moto 5.2 returns a policy that CloudFormation created as
            # the repr of a Python dict rather than as JSON.
            document = ast.literal_eval(document)
            for statement in document["Statement"]:
                resources = statement["Resource"]
                for resource in (
                    [resources] if isinstance(resources, str) else resources
                ):
                    if resource.startswith("arn:aws:s3:::"):
                        s3_resources.append((logical_id, resource))

    assert s3_resources
    for logical_id, resource in s3_resources:
        assert re.fullmatch(rf"{re.escape(bucket_arn)}(/.+)?", resource), logical_id


def test_reaper_schedule_targets_the_reaper(stack):
    events = boto3.client("events", region_name=REGION)
    targets = events.list_targets_by_rule(
        Rule=physical_id(stack, "ReaperFunctionEveryFiveMinutes")
    )["Targets"]
    reaper = functions(stack)["ReaperFunction"]

    assert [target["Arn"] for target in targets] == [reaper["FunctionArn"]]


def test_outputs_name_stack_resources(stack):
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["stack"]["Outputs"]}
    registry = f"{ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com"

    assert outputs["BucketName"] == physical_id(stack, "PipelineBucket")
    assert outputs["TrainerRepositoryUri"] == (
        f"{registry}/{physical_id(stack, 'TrainerRepository')}"
    )
    assert outputs["ServerRepositoryUri"] == (
        f"{registry}/{physical_id(stack, 'ServerRepository')}"
    )


def test_broken_reference_fails_the_stack(stack):
    template = copy.deepcopy(TEMPLATE)
    launch_template = template["Resources"]["TrainerLaunchTemplate"]["Properties"]
    launch_template["LaunchTemplateData"]["IamInstanceProfile"]["Arn"] = {
        "Fn::GetAtt": ["MissingInstanceProfile", "Arn"]
    }

    with pytest.raises(ClientError, match="MissingInstanceProfile"):
        create_stack(
            template,
            {**stack["parameters"], "EnvironmentName": "broken"},
            name="broken-stack",
        )


def test_deploy_guide_explains_every_parameter():
    guide = (ROOT / "docs" / "deploy.md").read_text()

    missing = [name for name in TEMPLATE["Parameters"] if f"| `{name}` |" not in guide]

    assert not missing, (
        f"docs/deploy.md has no row for the parameters {missing}; add each to "
        "its parameter table."
    )
