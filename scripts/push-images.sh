#!/usr/bin/env bash
# Build the trainer and server images and push them to the stack's ECR
# repositories, with the names and tag the launch templates pull.
#
# Usage: scripts/push-images.sh [ENVIRONMENT_NAME] [IMAGE_TAG]
#   ENVIRONMENT_NAME  the stack's EnvironmentName parameter (default: dev)
#   IMAGE_TAG         the stack's ImageTag parameter (default: latest)
# Needs Docker and AWS credentials for the account and region of the stack
# (AWS_REGION, or the AWS CLI's configured region).
set -euo pipefail
cd "$(dirname "$0")/.."

environment="${1:-dev}"
tag="${2:-latest}"
region="${AWS_REGION:-$(aws configure get region)}"
account="$(aws sts get-caller-identity --query Account --output text)"
registry="${account}.dkr.ecr.${region}.amazonaws.com"
# Recorded in every train_meta.json; "-dirty" marks uncommitted changes.
code_version="$(git describe --always --dirty 2>/dev/null || echo unknown)"

aws ecr get-login-password --region "$region" \
    | docker login --username AWS --password-stdin "$registry"

for role in trainer server; do
    image="${registry}/${environment}-mnist-${role}:${tag}"
    docker build --file "containers/${role}/Dockerfile" \
        --build-arg CODE_VERSION="$code_version" --tag "$image" .
    docker push "$image"
done
