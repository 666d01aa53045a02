"""The GitHub workflow users deploy with: OIDC only, tests before deploy."""

import yaml

from tests.conftest import ROOT

WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "ci-cd.yml").read_text())
TEXT = (ROOT / ".github" / "workflows" / "ci-cd.yml").read_text()


def test_deploy_needs_tests_and_main():
    deploy = WORKFLOW["jobs"]["deploy"]

    assert deploy["needs"] == "test"
    assert "refs/heads/main" in deploy["if"]


def test_deploy_uses_oidc_not_stored_keys():
    deploy = WORKFLOW["jobs"]["deploy"]
    credentials = [
        step
        for step in deploy["steps"]
        if step.get("uses", "").startswith("aws-actions/configure-aws-credentials")
    ]

    assert deploy["permissions"]["id-token"] == "write"
    assert credentials[0]["with"]["role-to-assume"]
    assert "aws-access-key-id" not in TEXT
    assert "secrets." not in TEXT


def test_workflow_runs_the_readme_test_command():
    test_steps = [step.get("run", "") for step in WORKFLOW["jobs"]["test"]["steps"]]

    assert any("make test" in run for run in test_steps)


def test_workflow_audits_dependencies_and_lints_itself():
    # Both need the internet, so they run here rather than in `make test`.
    runs = "\n".join(step.get("run", "") for step in WORKFLOW["jobs"]["test"]["steps"])

    assert ".venv/bin/pip-audit --strict" in runs
    assert "--requirement constraints.txt" in runs
    assert ".venv/bin/actionlint" in runs


def test_push_script_uses_template_repository_names():
    script = (ROOT / "scripts" / "push-images.sh").read_text()
    template = (ROOT / "template.yaml").read_text()

    assert "${environment}-mnist-${role}:${tag}" in script
    assert '!Sub "${EnvironmentName}-mnist-trainer"' in template
    assert '!Sub "${EnvironmentName}-mnist-server"' in template
