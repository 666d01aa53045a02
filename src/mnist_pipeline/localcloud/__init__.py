"""The local cloud: the pipeline on one machine, with moto as AWS.

A development tool, never imported by the functions or containers.
`LocalCloud` starts moto's server on 127.0.0.1, creates the bucket, launch
templates and S3 event wiring that template.yaml declares, then runs:

* `dispatcher.EventDispatcher`, which delivers S3 events to the Lambda
  handlers, each invocation in its own process with its template
  environment, retrying a failed invocation like Lambda's asynchronous
  invocation does;
* `runner.InstanceRunner`, which turns each EC2 instance started through
  the API into a local process running the trainer or server entrypoint;
* `dispatcher.Scheduler`, which invokes scheduled functions (the reaper)
  every ``schedule_seconds``.
* `address.ServingAddressProxy`, the stable serving address: a proxy on
  one fixed port that forwards each new connection to the server that the
  stack's Elastic IP is associated with.

Every component talks to moto through the normal AWS SDK with
``AWS_ENDPOINT_URL`` set; nothing else differs from AWS.
"""

from mnist_pipeline.localcloud.cloud import LocalCloud

__all__ = ["LocalCloud"]
