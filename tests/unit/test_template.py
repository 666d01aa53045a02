"""template.yaml and the code must agree: handlers, filters, settings, pins."""

import datetime
import json
import re
import subprocess
import sys

import pytest

from mnist_pipeline import keys, settings
from mnist_pipeline.localcloud import template as cfn
from tests.conftest import ROOT

TEMPLATE = cfn.load_template(ROOT / "template.yaml")
FUNCTIONS = {spec.logical_id: spec for spec in cfn.functions(TEMPLATE)}
SETTINGS_OF = {
    "LauncherFunction": settings.LauncherSettings,
    "GateFunction": settings.GateSettings,
    "ServingFunction": settings.ServerSettings,
    "ReaperFunction": settings.ReaperSettings,
}
# Variables a function resolves itself at cold start rather than from the
# template: the serving function reads MODEL_VERSION from serving/current.json.
RESOLVED_AT_RUNTIME = {"ServingFunction": {settings.MODEL_VERSION: "a-version"}}
# Keys every part of the pipeline writes; no trigger may match them.
PIPELINE_WRITES = [
    keys.run_record("20261204T150000Z-1a2b3c4d"),
    keys.keras_model("20261204T150000Z-1a2b3c4d"),
    keys.tflite_model("20261204T150000Z-1a2b3c4d"),
    keys.smoke_digits("20261204T150000Z-1a2b3c4d"),
    keys.SERVING_CURRENT,
    keys.serving_history(
        datetime.datetime.now(datetime.UTC), "20261204T150000Z-1a2b3c4d"
    ),
    keys.upload_lock("data/x.npz", "etag"),
]


def matches(trigger: cfn.S3Trigger, key: str) -> bool:
    return key.startswith(trigger.prefix) and key.endswith(trigger.suffix)


def test_every_function_is_known():
    assert set(FUNCTIONS) == set(SETTINGS_OF)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_handler_exists(name):
    spec = FUNCTIONS[name]
    module_name, function_name = spec.handler.rsplit(".", 1)
    path = ROOT / spec.code_uri / f"{module_name}.py"

    source = path.read_text()

    assert path.is_file()
    assert re.search(
        rf"^(def {function_name}\(|{function_name} = )", source, re.MULTILINE
    )


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_template_environment_satisfies_settings(name):
    values = cfn.StackValues(TEMPLATE, "stack", "us-east-1", "123456789012")
    for logical_id, resource in TEMPLATE["Resources"].items():
        values.set_resource(logical_id, f"{resource['Type']}-id")
    environment = {
        variable: values.resolve(value)
        for variable, value in FUNCTIONS[name].environment.items()
    }
    environment.update(RESOLVED_AT_RUNTIME.get(name, {}))

    # from_env raises SettingsError naming any variable that is missing.
    loaded = SETTINGS_OF[name].from_env(environment)

    assert loaded.bucket == "dev-mnist-123456789012-us-east-1"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_local_invoke_environment_sets_every_variable(name):
    # `sam local invoke --env-vars events/env.json` sets only what the file
    # names; a variable missing there takes the settings' default instead.
    local = json.loads((ROOT / "events" / "env.json").read_text())[name]
    template_variables = set(FUNCTIONS[name].environment)
    globals_ = TEMPLATE["Globals"]["Function"]["Environment"]["Variables"]

    missing = template_variables - set(globals_) - set(local)

    assert missing <= set(RESOLVED_AT_RUNTIME.get(name, {}))
    assert SETTINGS_OF[name].from_env({**local, **RESOLVED_AT_RUNTIME.get(name, {})})


def test_launcher_fires_on_datasets_only():
    [trigger] = FUNCTIONS["LauncherFunction"].triggers

    assert matches(trigger, "data/mnist.npz")
    assert not matches(trigger, "data/")
    for key in [*PIPELINE_WRITES, keys.train_meta("r"), keys.server_ready("i-1")]:
        assert not matches(trigger, key), key


def test_gate_fires_on_meta_and_ready_reports_only():
    triggers = FUNCTIONS["GateFunction"].triggers

    assert any(
        matches(t, keys.train_meta("20261204T150000Z-1a2b3c4d")) for t in triggers
    )
    assert any(matches(t, keys.server_ready("i-0123")) for t in triggers)
    assert any(
        matches(t, keys.serving_request("2026-12-04T15:00:00Z")) for t in triggers
    )
    for key in [*PIPELINE_WRITES, "data/mnist.npz"]:
        assert not any(matches(t, key) for t in triggers), key


def test_launch_templates_pass_every_tag_to_the_container():
    user_data = {
        name: resource["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"][
            "Fn::Sub"
        ]
        for name, resource in TEMPLATE["Resources"].items()
        if resource["Type"] == "AWS::EC2::LaunchTemplate"
    }

    assert (
        f'{settings.RUN_ID}="$(metadata tags/instance/mnist-pipeline:run-id)"'
        in (user_data["TrainerLaunchTemplate"])
    )
    assert (
        f'{settings.MODEL_VERSION}="$(metadata tags/instance/'
        'mnist-pipeline:model-version)"'
    ) in user_data["ServerLaunchTemplate"]
    for script in user_data.values():
        assert f"{settings.BUCKET_NAME}=" in script
        assert f"{settings.INSTANCE_ID}=" in script


def test_powertools_layer_matches_pinned_version():
    pinned = re.search(
        r"^aws-lambda-powertools==(\S+)$",
        (ROOT / "constraints.txt").read_text(),
        re.MULTILINE,
    ).group(1)
    layers = TEMPLATE["Globals"]["Function"]["Layers"]

    assert any(
        isinstance(layer, str) and layer.endswith(f"/{pinned}}}}}") for layer in layers
    )


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("functions/launcher/launcher.py", ("numpy", "tensorflow", "keras", "moto")),
        ("functions/gate/gate.py", ("numpy", "tensorflow", "keras", "moto")),
        ("functions/reaper/reaper.py", ("numpy", "tensorflow", "keras", "moto")),
    ],
)
def test_functions_import_no_heavy_packages(module, forbidden):
    path = ROOT / module
    code = f"""
import importlib.util, os, sys
os.environ.update(BUCKET_NAME="b", TRAINER_LAUNCH_TEMPLATE_ID="lt", STACK_NAME="s",
                  SERVER_LAUNCH_TEMPLATE_ID="lt", AWS_DEFAULT_REGION="us-east-1",
                  POWERTOOLS_TRACE_DISABLED="true")
spec = importlib.util.spec_from_file_location("handler", {str(path)!r})
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(",".join(sorted(m for m in {forbidden!r} if m in sys.modules)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == ""


def test_server_imports_no_tensorflow():
    code = (
        "import sys, mnist_server.app, mnist_server.__main__; "
        "print(','.join(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == ""


def test_every_role_that_reads_can_list_the_bucket():
    # S3 returns 403 instead of 404 for a missing key without ListBucket, and
    # every role treats some missing keys as normal.
    for name, resource in TEMPLATE["Resources"].items():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::Serverless::Function":
            statements = [s for p in properties["Policies"] for s in p["Statement"]]
        elif resource["Type"] == "AWS::IAM::Role":
            statements = [
                s
                for p in properties.get("Policies", [])
                for s in p["PolicyDocument"]["Statement"]
            ]
        else:
            continue
        actions = {s["Action"] for s in statements if isinstance(s["Action"], str)}

        assert "s3:GetObject" in actions, name
        assert "s3:ListBucket" in actions, name


def test_bucket_requires_tls_and_expires_leftovers():
    resources = TEMPLATE["Resources"]
    [policy] = [r for r in resources.values() if r["Type"] == "AWS::S3::BucketPolicy"]
    [statement] = policy["Properties"]["PolicyDocument"]["Statement"]
    rules = resources["PipelineBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]

    assert statement["Effect"] == "Deny"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert {rule.get("Prefix") for rule in rules} >= {"locks/", "serving/ready/"}
    assert any("NoncurrentVersionExpiration" in rule for rule in rules)


def test_gate_decides_one_event_at_a_time():
    gate = TEMPLATE["Resources"]["GateFunction"]["Properties"]

    assert gate["ReservedConcurrentExecutions"] == 1


@pytest.mark.parametrize("name", ["LauncherFunction", "GateFunction", "ReaperFunction"])
def test_event_functions_have_dlq_and_logs(name):
    globals_ = TEMPLATE["Globals"]["Function"]
    log_groups = [
        r["Properties"]
        for r in TEMPLATE["Resources"].values()
        if r["Type"] == "AWS::Logs::LogGroup"
    ]

    assert globals_["DeadLetterQueue"]["Type"] == "SQS"
    assert globals_["ReservedConcurrentExecutions"] > 0
    assert any(
        group["LogGroupName"] == {"Fn::Sub": f"/aws/lambda/${{{name}}}"}
        and "RetentionInDays" in group
        for group in log_groups
    )
