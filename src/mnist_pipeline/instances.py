"""EC2 instances of the pipeline: tags, start and terminate.

Trainer and server instances start from the stack's launch templates, which
hold the AMI, instance type, profile and user data. Everything that differs
per instance travels as an instance tag. The user data reads the tags
through the instance metadata service and passes each tag in
`TAG_ENVIRONMENT` to the container as an environment variable. The local
cloud passes the same variables to its processes.
"""

from typing import Any

from botocore.exceptions import ClientError

from mnist_pipeline import settings

ROLE_TAG = "mnist-pipeline:role"
STACK_TAG = "mnist-pipeline:stack"
RUN_ID_TAG = "mnist-pipeline:run-id"
MODEL_VERSION_TAG = "mnist-pipeline:model-version"

TRAINER_ROLE = "trainer"
SERVER_ROLE = "server"

TAG_ENVIRONMENT = {
    RUN_ID_TAG: settings.RUN_ID,
    MODEL_VERSION_TAG: settings.MODEL_VERSION,
}


def start_instance(
    ec2: Any,
    launch_template_id: str,
    role: str,
    stack_name: str,
    tags: dict[str, str],
    client_token: str,
) -> str:
    """Start one instance from a launch template and return its id.

    ``client_token`` makes RunInstances idempotent: a retry with the same
    token returns the instance the first call started.
    """
    all_tags = {ROLE_TAG: role, STACK_TAG: stack_name, "Name": f"{stack_name}-{role}"}
    all_tags.update(tags)
    response = ec2.run_instances(
        MinCount=1,
        MaxCount=1,
        LaunchTemplate={"LaunchTemplateId": launch_template_id, "Version": "$Latest"},
        ClientToken=client_token[:64],
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": key, "Value": value} for key, value in all_tags.items()
                ],
            }
        ],
    )

    return response["Instances"][0]["InstanceId"]


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
