"""Read what the local cloud needs from template.yaml.

The local cloud builds its bucket, launch templates, event wiring and
function environments from the same template that ``sam deploy`` uses, so
the two cannot drift apart. `StackValues` resolves ``Ref``, ``Fn::GetAtt``
and ``Fn::Sub`` against local values.
"""

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml


class _CloudFormationLoader(yaml.SafeLoader):
    """YAML loader that turns short tags (``!Ref X``) into their long form."""


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)

    return {name: value}


_CloudFormationLoader.add_multi_constructor("!", _construct_tag)


def load_template(path: str | Path) -> dict[str, Any]:
    with open(path) as stream:
        return yaml.load(stream, Loader=_CloudFormationLoader)  # noqa: S506


@dataclasses.dataclass
class S3Trigger:
    """One S3 event source of a function: event names and key filter."""

    name: str
    events: list[str]
    prefix: str
    suffix: str


@dataclasses.dataclass
class FunctionSpec:
    logical_id: str
    code_uri: str
    handler: str
    environment: dict[str, Any]
    timeout: int
    triggers: list[S3Trigger]
    schedule: str | None = None  # an EventBridge rate or cron expression
    # Maximum invocations at once (ReservedConcurrentExecutions), or None.
    reserved_concurrency: int | None = None


def _filter_rules(properties: dict[str, Any]) -> tuple[str, str]:
    rules = properties.get("Filter", {}).get("S3Key", {}).get("Rules", [])
    values = {rule["Name"].lower(): rule["Value"] for rule in rules}

    return values.get("prefix", ""), values.get("suffix", "")


def _reserved_concurrency(
    properties: dict[str, Any], globals_: dict[str, Any]
) -> int | None:
    value = properties.get(
        "ReservedConcurrentExecutions", globals_.get("ReservedConcurrentExecutions")
    )

    return None if value is None else int(value)


def functions(template: dict[str, Any]) -> list[FunctionSpec]:
    """Return every Serverless function with its merged Globals."""
    globals_ = template.get("Globals", {}).get("Function", {})
    specs = []
    for logical_id, resource in template["Resources"].items():
        if resource["Type"] != "AWS::Serverless::Function":
            continue
        properties = resource["Properties"]
        environment = dict(globals_.get("Environment", {}).get("Variables", {}))
        environment.update(properties.get("Environment", {}).get("Variables", {}))
        triggers = []
        schedule = None
        for name, event in properties.get("Events", {}).items():
            if event["Type"] == "Schedule":
                schedule = event["Properties"]["Schedule"]
            if event["Type"] != "S3":
                continue
            events = event["Properties"]["Events"]
            prefix, suffix = _filter_rules(event["Properties"])
            triggers.append(
                S3Trigger(
                    name=name,
                    events=[events] if isinstance(events, str) else list(events),
                    prefix=prefix,
                    suffix=suffix,
                )
            )
        specs.append(
            FunctionSpec(
                logical_id=logical_id,
                code_uri=properties["CodeUri"],
                handler=properties["Handler"],
                environment=environment,
                timeout=int(properties.get("Timeout", globals_.get("Timeout", 3))),
                triggers=triggers,
                schedule=schedule,
                reserved_concurrency=_reserved_concurrency(properties, globals_),
            )
        )

    return specs


class StackValues:
    """Resolve ``Ref``, ``Fn::GetAtt``, ``Fn::Sub`` and ``Fn::Join`` locally.

    Parameters take their template default unless overridden; resources
    resolve to the local physical ids registered with `set_resource`, and
    their attributes to the values registered with it. An attribute that
    was not registered resolves to ``<physical id>.<attribute>``, a stand-in
    like the physical id itself.
    """

    def __init__(
        self,
        template: dict[str, Any],
        stack_name: str,
        region: str,
        account_id: str,
        parameter_overrides: dict[str, str] | None = None,
    ) -> None:
        self.values: dict[str, str] = {
            "AWS::StackName": stack_name,
            "AWS::Region": region,
            "AWS::AccountId": account_id,
            "AWS::Partition": "aws",
        }
        for name, parameter in template.get("Parameters", {}).items():
            if "Default" in parameter:
                self.values[name] = str(parameter["Default"])
        self.values.update(parameter_overrides or {})

    def set_resource(
        self, logical_id: str, physical_id: str, **attributes: str
    ) -> None:
        self.values[logical_id] = physical_id
        for name, attribute in attributes.items():
            self.values[f"{logical_id}.{name}"] = attribute

    def _lookup(self, name: str) -> str:
        """Return a parameter, resource or ``Resource.Attribute`` value."""
        if name in self.values or "." not in name:
            return self.values[name]
        logical_id, attribute = name.split(".", 1)

        return f"{self.values[logical_id]}.{attribute}"

    def resolve(self, value: Any) -> str:
        if isinstance(value, str | int | float):
            return str(value)
        if isinstance(value, dict) and "Ref" in value:
            return self.values[value["Ref"]]
        if isinstance(value, dict) and "Fn::GetAtt" in value:
            return self._lookup(".".join(value["Fn::GetAtt"]))
        if isinstance(value, dict) and "Fn::Sub" in value:
            return re.sub(
                r"\$\{([^}!]+)\}", lambda m: self._lookup(m.group(1)), value["Fn::Sub"]
            )
        if isinstance(value, dict) and "Fn::Join" in value:
            delimiter, items = value["Fn::Join"]
            if isinstance(items, dict):  # a Ref to a CommaDelimitedList parameter
                items = self.resolve(items).split(",")
            return delimiter.join(self.resolve(item) for item in items)
        raise ValueError(f"The local cloud cannot resolve {value!r}")
