"""Check the packages `sam build` made: small, no TensorFlow, no boto3.

`make test` runs `sam build --build-dir .aws-sam/build` first when the Lambda
runtime's Python is available.
"""

import os

import pytest

from tests.conftest import ROOT

BUILD_DIR = ROOT / ".aws-sam" / "build"
PACKAGES = ["LauncherFunction", "GateFunction", "ReaperFunction", "DomainLayer"]
MAX_PACKAGE_BYTES = 5 * 1024 * 1024
# Lambda's limit on a function and its layers, unzipped.
MAX_LAMBDA_BYTES = 250 * 1024 * 1024

if not (BUILD_DIR / "template.yaml").is_file():
    message = f"{BUILD_DIR} has no build; run `make build` (needs python3.13)."
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def package_files(name):
    return [path for path in (BUILD_DIR / name).rglob("*") if path.is_file()]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_is_small(name):
    size = sum(path.stat().st_size for path in package_files(name))

    assert 0 < size < MAX_PACKAGE_BYTES


@pytest.mark.parametrize("name", PACKAGES)
def test_package_has_no_heavy_dependencies(name):
    top_level = {
        path.relative_to(BUILD_DIR / name).parts[0] for path in package_files(name)
    }
    if name == "DomainLayer":
        top_level = {
            path.relative_to(BUILD_DIR / name / "python").parts[0]
            for path in package_files(name)
        }

    for forbidden in ("tensorflow", "keras", "numpy", "boto3", "botocore", "moto"):
        assert forbidden not in top_level


def test_layer_holds_domain_package():
    assert (
        BUILD_DIR / "DomainLayer" / "python" / "mnist_pipeline" / "dataset.py"
    ).is_file()


def test_serving_function_fits_lambda_without_tensorflow():
    files = package_files("ServingFunction") + package_files("ServerCodeLayer")
    top_level = {path.relative_to(BUILD_DIR).parts[1] for path in files}

    assert sum(path.stat().st_size for path in files) < MAX_LAMBDA_BYTES
    assert "ai_edge_litert" in top_level
    for forbidden in ("tensorflow", "keras", "boto3", "botocore"):
        assert forbidden not in top_level
