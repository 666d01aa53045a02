"""Invoke one Lambda handler in this process, like the Lambda runtime does.

``python -m mnist_pipeline.localcloud.invoke CODE_DIR HANDLER`` reads the
event JSON from standard input, imports ``HANDLER`` (``module.function``)
from ``CODE_DIR`` and calls it with a Lambda context. It prints the
handler's result as JSON and exits 1 when the handler raises, so the
dispatcher can retry.
"""

import dataclasses
import importlib
import json
import os
import sys
import time
import uuid


@dataclasses.dataclass
class LocalLambdaContext:
    """The attributes of the Lambda context object that handlers use."""

    function_name: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    aws_request_id: str
    timeout_seconds: int
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = ""

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def main() -> int:
    code_dir, handler = sys.argv[1], sys.argv[2]
    sys.path.insert(0, code_dir)
    module_name, function_name = handler.rsplit(".", 1)
    handler_function = getattr(importlib.import_module(module_name), function_name)

    name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", module_name)
    context = LocalLambdaContext(
        function_name=name,
        memory_limit_in_mb=int(
            os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        ),
        invoked_function_arn=f"arn:aws:lambda:us-east-1:123456789012:function:{name}",
        aws_request_id=str(uuid.uuid4()),
        timeout_seconds=int(os.environ.get("AWS_LAMBDA_FUNCTION_TIMEOUT", "120")),
    )
    result = handler_function(json.load(sys.stdin), context)
    print(json.dumps(result, default=str))

    return 0


if __name__ == "__main__":
    sys.exit(main())
