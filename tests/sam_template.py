"""template.yaml as CloudFormation receives it: the SAM transform, offline."""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from moto import mock_aws
from samtranslator.translator.managed_policy_translator import ManagedPolicyLoader
from samtranslator.translator.transform import transform

from mnist_pipeline.localcloud import template as cfn
from tests.conftest import REGION, ROOT

ACCOUNT_ID = "123456789012"
# The bucket `sam deploy` uploads code folders to; here it only names them.
ARTIFACT_BUCKET = "sam-artifacts"
CODE_PROPERTIES = ("CodeUri", "ContentUri")
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}


def load_template() -> dict[str, Any]:
    return cfn.load_template(ROOT / "template.yaml")


def artifact_key(logical_id: str) -> str:
    return f"{logical_id}.zip"


@contextmanager
def offline_aws(managed_policies: bool = True) -> Iterator[None]:
    """Run moto with fake credentials.

    ``managed_policies`` loads AWS's managed IAM policies into moto's IAM,
    which takes a few seconds.
    """
    config = {"iam": {"load_aws_managed_policies": managed_policies}}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in FAKE_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        with mock_aws(config=config):
            yield


def transform_template(template: dict[str, Any]) -> dict[str, Any]:
    """Return the CloudFormation template that `sam deploy` makes of ``template``.

    Local code folders become S3 locations in `ARTIFACT_BUCKET`, as `sam
    package` makes them. Call it inside `offline_aws`, because the translator
    looks managed policy names up in IAM.
    """
    template = copy.deepcopy(template)
    for logical_id, resource in template["Resources"].items():
        properties = resource.get("Properties", {})
        for name in CODE_PROPERTIES:
            if name in properties:
                properties[name] = f"s3://{ARTIFACT_BUCKET}/{artifact_key(logical_id)}"
    loader = ManagedPolicyLoader(boto3.client("iam", region_name=REGION))

    return transform(template, {}, loader)
