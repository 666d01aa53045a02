"""Each role in template.yaml allows exactly the AWS calls of the code it runs.

For every Lambda function and every EC2 instance role the test finds the
code that runs under the role: the function's handler module, or the module
that the instance's container image runs. It walks that module's syntax
tree and, following names, every function of the project's own modules that
it reaches, and collects each boto3 client method call. botocore's service
models turn method names into API operations, and `OPERATION_ACTIONS` and
`ARGUMENT_ACTIONS` turn operations into IAM actions. The role's grants come
from the SAM transform of the template, so they are the policies that
CloudFormation creates.

NOTE: the walk follows names, not types. A project function that shares a
name with a called method counts as called, and AWS calls made inside
third-party libraries or through ``getattr`` go unseen. Only actions are
compared; which buckets, keys and instances each action may touch is not.
"""

import ast
import dataclasses
import functools
import importlib.util
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
from botocore import xform_name

from mnist_pipeline.localcloud import template as cfn
from tests.conftest import REGION, ROOT
from tests.sam_template import load_template, offline_aws, transform_template

TEMPLATE = load_template()
FUNCTIONS = {spec.logical_id: spec for spec in cfn.functions(TEMPLATE)}
LAUNCH_TEMPLATES = sorted(
    name
    for name, resource in TEMPLATE["Resources"].items()
    if resource["Type"] == "AWS::EC2::LaunchTemplate"
)
BOTOCORE = botocore.session.get_session()

# IAM actions of the API operations whose action is not "<service>:<Operation>",
# as the Permissions section of each operation in botocore's S3 model (taken
# from the Amazon S3 API Reference) states.
# NOTE: that model names no action for the multipart operations. They map to
# s3:PutObject as in the S3 User Guide's multipart permissions table, which
# this file does not check.
OPERATION_ACTIONS = {
    "s3:ListObjectsV2": ("s3:ListBucket",),
    "s3:ListObjects": ("s3:ListBucket",),
    "s3:HeadBucket": ("s3:ListBucket",),
    "s3:HeadObject": ("s3:GetObject",),
    "s3:ListObjectVersions": ("s3:ListBucketVersions",),
    "s3:CreateMultipartUpload": ("s3:PutObject",),
    "s3:UploadPart": ("s3:PutObject",),
    "s3:CompleteMultipartUpload": ("s3:PutObject",),
    "s3:DeleteObjects": ("s3:DeleteObject",),
    "s3:CopyObject": ("s3:GetObject", "s3:PutObject"),
    "s3:UploadPartCopy": ("s3:GetObject", "s3:PutObject"),
}
# Actions that one argument of an operation adds. RunInstances tags the new
# instance through CreateTags, and passes the role of the launch template's
# instance profile (every launch template of the stack has one).
ARGUMENT_ACTIONS = {
    ("s3:GetObject", "VersionId"): "s3:GetObjectVersion",
    ("s3:PutObject", "Tagging"): "s3:PutObjectTagging",
    ("ec2:RunInstances", "TagSpecifications"): "ec2:CreateTags",
    ("ec2:RunInstances", "LaunchTemplate"): "iam:PassRole",
}
# boto3's managed transfer methods of the S3 client and the operations they
# make: multipart for large objects, and an abort when a part fails.
TRANSFER_OPERATIONS = {
    "upload_file": (
        "PutObject",
        "CreateMultipartUpload",
        "UploadPart",
        "CompleteMultipartUpload",
        "AbortMultipartUpload",
    ),
    "download_file": ("HeadObject", "GetObject"),
    "download_fileobj": ("HeadObject", "GetObject"),
    "copy": ("HeadObject", "CopyObject", "UploadPartCopy"),
}
TRANSFER_OPERATIONS["upload_fileobj"] = TRANSFER_OPERATIONS["upload_file"]
# AWS calls of the launch templates' user data, by the command that makes
# them. A docker pull from ECR needs the actions of AWS's
# AmazonEC2ContainerRegistryPullOnly policy, less BatchImportUpstreamImage,
# which only pull-through cache repositories use.
USER_DATA_ACTIONS = {
    "aws ecr get-login-password": ("ecr:GetAuthorizationToken",),
    "docker run": ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"),
}
# Managed policies SAM attaches to every function role for the Lambda
# runtime itself: its logs, and its X-Ray traces when Tracing is Active.
RUNTIME_POLICIES = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
}
# Calls the walk finds on a path that never runs under that role, each with
# the reason. test_unreached_calls_are_still_found keeps this table current.
UNREACHED_ACTIONS = {
    ("ServingFunction", "s3:PutObject"): (
        "serving.py builds the app with announce=False, so the function never "
        "writes the server's ready report."
    ),
    ("GateFunction", "ec2:DescribeSpotInstanceRequests"): (
        "the gate starts servers On-Demand, so instances.remove_leftovers never "
        "looks for Spot requests under it."
    ),
    ("GateFunction", "ec2:CancelSpotInstanceRequests"): (
        "the gate starts servers On-Demand, so instances.remove_leftovers never "
        "cancels Spot requests under it."
    ),
}


@dataclasses.dataclass(frozen=True)
class ApiCall:
    """One IAM action that a call in the code needs, and where the call is."""

    action: str
    location: str


@dataclasses.dataclass(frozen=True)
class Principal:
    """Code that runs under one IAM role of the stack."""

    name: str
    entry: Path
    local_dir: Path | None = None


def iam_prefix(service: str) -> str:
    return BOTOCORE.get_service_model(service).signing_name


@functools.cache
def operations_of(service: str) -> dict[str, str]:
    """Return the client method names of a service, mapped to operation names."""
    model = BOTOCORE.get_service_model(service)

    return {xform_name(name): name for name in model.operation_names}


def actions_of_operation(service: str, operation: str, arguments: set[str]) -> set:
    name = f"{iam_prefix(service)}:{operation}"
    actions = set(OPERATION_ACTIONS.get(name, (name,)))
    for action in list(actions):
        for (base, argument), extra in ARGUMENT_ACTIONS.items():
            if base == action and argument in arguments:
                actions.add(extra)

    return actions


# ------------------------------------------------------------ the code walk


def _is_project_file(path: Path) -> bool:
    # Built-in and frozen modules have an origin that is no path.
    if not path.is_absolute():
        return False
    path = path.resolve()
    return path.is_relative_to(ROOT) and not any(
        part.startswith(".venv") for part in path.relative_to(ROOT).parts
    )


def _module_file(name: str, local_dir: Path | None) -> Path | None:
    """Return the project file of an imported module, or None if it is not ours.

    Only the top-level package is looked up with importlib, which imports
    nothing for it. Submodules are found as files, because finding them
    with importlib would import their parent packages (TensorFlow, for the
    trainer's).
    """
    parts = name.split(".")
    if local_dir is not None and (local_dir / f"{name}.py").is_file():
        return local_dir / f"{name}.py"
    top = importlib.util.find_spec(parts[0])
    if top is None or top.origin is None or not _is_project_file(Path(top.origin)):
        return None
    found = Path(top.origin)
    for part in parts[1:]:
        if found.name != "__init__.py":
            return None
        package = found.parent
        if (package / part / "__init__.py").is_file():
            found = package / part / "__init__.py"
        elif (package / f"{part}.py").is_file():
            found = package / f"{part}.py"
        else:
            return None

    return found


def _imported_names(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _import_time_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Yield the statements a module runs on import, without function bodies."""
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(statement, ast.ClassDef):
            yield from (
                node
                for node in statement.body
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            )
            continue
        yield statement


def _dict_keys(scope: ast.AST, name: str) -> set[str]:
    """Return the string keys a scope puts in the dict variable ``name``.

    Finds ``name = {"Key": ...}`` and ``name["Key"] = ...``, so that a call
    made with ``**name`` shows which arguments it passes.
    """
    keys = set()
    for node in ast.walk(scope):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if (
                isinstance(target, ast.Name)
                and target.id == name
                and isinstance(node.value, ast.Dict)
            ):
                keys.update(
                    key.value
                    for key in node.value.keys
                    if isinstance(key, ast.Constant) and isinstance(key.value, str)
                )
            elif (
                isinstance(target, ast.Subscript)
                and isinstance(target.value, ast.Name)
                and target.value.id == name
                and isinstance(target.slice, ast.Constant)
            ):
                keys.add(target.slice.value)

    return keys


class CodeWalk:
    """The AWS calls reachable from one entry module, through project modules."""

    def __init__(self, entry: Path, local_dir: Path | None = None) -> None:
        self.modules: dict[Path, ast.Module] = {}
        self._load(entry.resolve(), local_dir)
        self.definitions: dict[str, list[tuple[Path, ast.AST]]] = {}
        for path, tree in self.modules.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    self.definitions.setdefault(node.name, []).append((path, node))
        self.services = self._client_services()
        self.calls = self._walk(entry.resolve())

    def _load(self, path: Path, local_dir: Path | None) -> None:
        if path in self.modules:
            return
        tree = ast.parse(path.read_text(), filename=str(path))
        self.modules[path] = tree
        for name in _imported_names(tree):
            found = _module_file(name, local_dir)
            if found is not None:
                self._load(found.resolve(), local_dir)

    def _client_services(self) -> set[str]:
        """Return the services the modules create boto3 clients for."""
        services = set()
        available = set(BOTOCORE.get_available_services())
        for path, tree in self.modules.items():
            for node in ast.walk(tree):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("client", "resource")
                ):
                    continue
                argument = node.args[0] if node.args else None
                if isinstance(argument, ast.Constant) and argument.value in available:
                    services.add(argument.value)
                elif ast.unparse(node.func.value) in ("boto3", "session"):
                    raise AssertionError(
                        f"{self.where(path, node)}: the walk cannot tell which "
                        "service this client is for; name it with a string literal."
                    )

        return services

    def where(self, path: Path, node: ast.AST) -> str:
        relative = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        return f"{relative}:{node.lineno}"

    def _walk(self, entry: Path) -> list[ApiCall]:
        pending: list[tuple[Path, ast.AST]] = [(entry, self.modules[entry])]
        for path, tree in self.modules.items():
            if path != entry:
                pending.extend((path, node) for node in _import_time_nodes(tree))
        seen: set[int] = set()
        calls = []
        while pending:
            path, root = pending.pop()
            if id(root) in seen:
                continue
            seen.add(id(root))
            for node in ast.walk(root):
                name = None
                if isinstance(node, ast.Name):
                    name = node.id
                elif isinstance(node, ast.Attribute):
                    name = node.attr
                if name in self.definitions:
                    pending.extend(self.definitions[name])
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    calls.extend(self._api_calls(path, node, root))

        return calls

    def _api_calls(self, path: Path, call: ast.Call, scope: ast.AST) -> list[ApiCall]:
        method = call.func.attr
        receiver = ast.unparse(call.func.value)
        arguments = {keyword.arg for keyword in call.keywords if keyword.arg}
        for keyword in call.keywords:
            if keyword.arg is None and isinstance(keyword.value, ast.Name):
                arguments |= _dict_keys(scope, keyword.value.id)
        first = call.args[0] if call.args else None
        literal = first.value if isinstance(first, ast.Constant) else None
        where = f"{self.where(path, call)} {receiver}.{method}()"
        found: list[tuple[str, str]] = []
        for service in sorted(self.services):
            operations = operations_of(service)
            if method in operations:
                found.append((service, operations[method]))
            elif method in ("get_paginator", "can_paginate") and literal in operations:
                found.append((service, operations[literal]))
            elif method == "get_waiter" and isinstance(literal, str):
                waiters = BOTOCORE.get_waiter_model(service).waiter_names
                waiter = {xform_name(w): w for w in waiters}.get(literal)
                if waiter is not None:
                    model = BOTOCORE.get_waiter_model(service).get_waiter(waiter)
                    found.append((service, model.operation))
            elif (
                service == "s3"
                and method in TRANSFER_OPERATIONS
                and (method != "copy" or "s3" in receiver.lower())
            ):
                found.extend(("s3", op) for op in TRANSFER_OPERATIONS[method])
        services = {service for service, _ in found}
        if len(services) > 1:
            services = {s for s in services if s in receiver.lower()} or services
            found = [(s, op) for s, op in found if s in services]
            assert len(services) == 1, (
                f"{where}: the method exists in {sorted(services)}; name the "
                "client variable after its service."
            )

        return [
            ApiCall(action, where)
            for service, operation in found
            for action in actions_of_operation(service, operation, arguments)
        ]

    def actions(self) -> dict[str, list[str]]:
        """Return each action the code needs, with the calls that need it."""
        needed: dict[str, list[str]] = {}
        for call in self.calls:
            places = needed.setdefault(call.action, [])
            if call.location not in places:
                places.append(call.location)
        # S3 returns 403 instead of 404 for a GET of a missing key unless the
        # caller may list the bucket, and every role treats some missing keys
        # as normal (template.yaml states this beside each ListBucket).
        if "s3:GetObject" in needed:
            needed.setdefault("s3:ListBucket", []).append(
                "S3 returns 404 for a missing key only with ListBucket"
            )

        return needed


# ------------------------------------------------------ roles and their code


def _logical_id(value: Any) -> str:
    if isinstance(value, dict) and "Ref" in value:
        return value["Ref"]
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        return value["Fn::GetAtt"][0]
    raise AssertionError(f"Expected a Ref or Fn::GetAtt, found {value!r}.")


def _sub_text(value: Any) -> str:
    """Return the text of an Fn::Sub, in either of its two forms."""
    value = value["Fn::Sub"]
    return value[0] if isinstance(value, list) else value


def user_data(template: dict, launch_template: str) -> str:
    data = template["Resources"][launch_template]["Properties"]["LaunchTemplateData"]
    return _sub_text(data["UserData"]["Fn::Base64"])


def container_entry(launch_template: str) -> Path:
    """Return the module that the launch template's container image runs.

    The user data runs an image of one of the stack's ECR repositories;
    scripts/push-images.sh builds repository ``<env>-mnist-<role>`` from
    ``containers/<role>/Dockerfile``, whose ENTRYPOINT runs ``python -m``.
    """
    resources = TEMPLATE["Resources"]
    repositories = [
        name
        for name in re.findall(r"\$\{(\w+)\}", user_data(TEMPLATE, launch_template))
        if resources.get(name, {}).get("Type") == "AWS::ECR::Repository"
    ]
    assert len(repositories) == 1, f"{launch_template} runs no single ECR image."
    repository = _sub_text(resources[repositories[0]]["Properties"]["RepositoryName"])
    role = repository.rsplit("-mnist-", 1)[1]
    dockerfile = (ROOT / "containers" / role / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.MULTILINE)
    command = json.loads(entrypoint.group(1))
    assert command[:2] == ["python", "-m"], f"containers/{role}: {command}"

    return _module_file(f"{command[2]}.__main__", None)


def principal(name: str) -> Principal:
    if name in FUNCTIONS:
        spec = FUNCTIONS[name]
        module = spec.handler.rsplit(".", 1)[0]
        local_dir = ROOT / spec.code_uri

        return Principal(name, local_dir / f"{module}.py", local_dir)

    return Principal(name, container_entry(name))


def role_of(template: dict, name: str) -> str:
    """Return the logical id of the IAM role a function or launch template uses."""
    properties = template["Resources"][name]["Properties"]
    if name in FUNCTIONS:
        return _logical_id(properties["Role"])
    profile = _logical_id(properties["LaunchTemplateData"]["IamInstanceProfile"]["Arn"])
    [role] = template["Resources"][profile]["Properties"]["Roles"]

    return _logical_id(role)


def _statements(document: dict) -> Iterator[dict]:
    statements = document["Statement"]
    for statement in statements if isinstance(statements, list) else [statements]:
        if "Fn::If" in statement:
            yield from (s for s in statement["Fn::If"][1:] if isinstance(s, dict))
        else:
            yield statement


def _policy_arn(arn: Any) -> str:
    if isinstance(arn, dict):
        return _sub_text(arn).replace("${AWS::Partition}", "aws")
    return arn


def _managed_policy_document(iam: Any, arn: str) -> dict:
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]

    return iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"][
        "Document"
    ]


def granted_actions(template: dict, iam: Any, role: str) -> set[str]:
    """Return the actions a role's inline and managed policies allow."""
    properties = template["Resources"][role]["Properties"]
    documents = [policy["PolicyDocument"] for policy in properties.get("Policies", [])]
    documents.extend(
        _managed_policy_document(iam, arn)
        for arn in map(_policy_arn, properties.get("ManagedPolicyArns", []))
        if arn not in RUNTIME_POLICIES
    )
    actions = set()
    for document in documents:
        for statement in _statements(document):
            assert "NotAction" not in statement, f"{role}: NotAction: {statement}"
            if statement["Effect"] != "Allow":
                continue
            action = statement["Action"]
            actions.update([action] if isinstance(action, str) else action)

    return actions


@functools.cache
def walk(name: str) -> CodeWalk:
    found = principal(name)
    return CodeWalk(found.entry, found.local_dir)


def needed_actions(template: dict, name: str) -> dict[str, list[str]]:
    """Return the actions the code under a role needs, with where each comes from."""
    needed = walk(name).actions()
    for (unreached_in, action), _reason in UNREACHED_ACTIONS.items():
        if unreached_in == name:
            needed.pop(action, None)
    properties = template["Resources"][name]["Properties"]
    if name in FUNCTIONS and "DeadLetterConfig" in properties:
        # Lambda sends the events the function failed on with its role.
        needed.setdefault("sqs:SendMessage", []).append("DeadLetterConfig")
    if name in LAUNCH_TEMPLATES:
        script = user_data(template, name)
        for command in re.findall(r"\baws [a-z0-9-]+ [a-z0-9-]+", script):
            assert command in USER_DATA_ACTIONS, (
                f"{name}'s user data runs `{command}`; add the IAM actions it "
                "needs to USER_DATA_ACTIONS."
            )
        for command, actions in USER_DATA_ACTIONS.items():
            if command in script:
                for action in actions:
                    needed.setdefault(action, []).append(f"{name} user data: {command}")

    return needed


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[dict, Any]]:
    """The transformed template, and moto's IAM for AWS's managed policies."""
    with offline_aws():
        yield transform_template(TEMPLATE), boto3.client("iam", region_name=REGION)


def _normalized(actions: Any) -> dict[str, str]:
    return {action.lower(): action for action in actions}


# ------------------------------------------------------------------- tests

PRINCIPALS = sorted(FUNCTIONS) + LAUNCH_TEMPLATES


@pytest.mark.parametrize("name", PRINCIPALS)
def test_role_allows_every_call(stack, name):
    template, iam = stack
    role = role_of(template, name)
    needed = needed_actions(template, name)
    granted = _normalized(granted_actions(template, iam, role))

    missing = {
        action: places
        for action, places in needed.items()
        if action.lower() not in granted
    }

    assert not missing, (
        f"{name} makes AWS calls that its role {role} does not allow. Add these "
        f"actions to its policy in template.yaml:\n"
        + "\n".join(
            f"  {action}: {'; '.join(places)}"
            for action, places in sorted(missing.items())
        )
    )


@pytest.mark.parametrize("name", PRINCIPALS)
def test_role_allows_no_other_action(stack, name):
    template, iam = stack
    role = role_of(template, name)
    needed = _normalized(needed_actions(template, name))
    granted = granted_actions(template, iam, role)

    extra = sorted(action for action in granted if action.lower() not in needed)

    assert not extra, (
        f"{role} ({name}) allows actions that no code under it calls: {extra}. "
        "Remove them from template.yaml, or list each action explicitly "
        "rather than with a wildcard."
    )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_roles_add_only_runtime_policies(stack, name):
    template, _ = stack
    properties = template["Resources"][role_of(template, name)]["Properties"]
    managed = set(map(_policy_arn, properties.get("ManagedPolicyArns", [])))

    assert managed == RUNTIME_POLICIES


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functions_pass_only_their_launch_templates_role(stack, name):
    # A function may pass to EC2 only the role of the launch template that
    # its RunInstances statement is limited to.
    template, _ = stack
    role = template["Resources"][role_of(template, name)]["Properties"]
    statements = [
        statement
        for policy in role["Policies"]
        for statement in _statements(policy["PolicyDocument"])
    ]
    launch_template_conditions = [
        s["Condition"]["ArnLike"]["ec2:LaunchTemplate"]
        for s in statements
        if s["Action"] == "ec2:RunInstances"
        and "ec2:LaunchTemplate" in s.get("Condition", {}).get("ArnLike", {})
    ]
    pass_role = [s for s in statements if s["Action"] == "iam:PassRole"]
    if not launch_template_conditions:
        assert not pass_role
        return
    [condition] = launch_template_conditions
    [pass_statement] = pass_role
    [launch_template] = re.findall(r"launch-template/\$\{(\w+)\}", _sub_text(condition))

    assert pass_statement["Resource"] == {
        "Fn::GetAtt": [role_of(template, launch_template), "Arn"]
    }
    assert pass_statement["Condition"] == {
        "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}
    }


def test_unreached_calls_are_still_found(stack):
    template, iam = stack
    for (name, action), reason in UNREACHED_ACTIONS.items():
        walked = walk(name).actions()
        granted = _normalized(granted_actions(template, iam, role_of(template, name)))

        assert action in walked, f"{name} no longer calls {action}: {reason}"
        assert action.lower() not in granted, f"{name} now allows {action}"


def test_walk_follows_calls_into_project_modules():
    actions = walk("LauncherFunction").actions()

    assert "src/mnist_pipeline/instances.py" in actions["ec2:RunInstances"][0]
    assert {"ec2:CreateTags", "iam:PassRole", "s3:GetObject"} <= set(actions)
    assert "ec2:AssociateAddress" not in actions


def test_trainer_entry_is_its_container_module():
    actions = walk("TrainerLaunchTemplate").actions()

    assert (
        principal("TrainerLaunchTemplate").entry
        == ROOT / "containers/trainer/mnist_trainer/__main__.py"
    )
    assert any("mnist_trainer/job.py" in place for place in actions["s3:PutObject"])


def test_walk_reports_a_new_call(tmp_path):
    handler = tmp_path / "handler.py"
    handler.write_text(
        textwrap.dedent(
            """
            import boto3
            from helpers import attach

            ec2 = boto3.client("ec2")
            s3 = boto3.client("s3")

            def lambda_handler(event, context):
                attach(ec2, event["instance_id"])
                s3.get_paginator("list_objects_v2")
                s3.upload_file("model.keras", "bucket", "models/run/model.keras")
            """
        )
    )
    (tmp_path / "helpers.py").write_text(
        textwrap.dedent(
            """
            def attach(ec2, instance_id):
                ec2.describe_addresses()
                ec2.associate_address(InstanceId=instance_id, AllocationId="a")

            def unused(ec2):
                ec2.release_address(AllocationId="a")
            """
        )
    )

    actions = CodeWalk(handler, tmp_path).actions()

    assert {
        "ec2:DescribeAddresses",
        "ec2:AssociateAddress",
        "s3:ListBucket",
        "s3:PutObject",
        "s3:AbortMultipartUpload",
    } == set(actions)
    assert "helpers.py" in actions["ec2:AssociateAddress"][0]
