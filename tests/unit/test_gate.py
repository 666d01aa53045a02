import pytest

from mnist_pipeline import instances, keys
from mnist_pipeline.records import (
    Decision,
    RunRecord,
    RunStatus,
    ServerReady,
    ServingPointer,
    TrainMeta,
    utc_now,
)
from tests.conftest import (
    BUCKET,
    instance_state,
    launch_template,
    s3_event,
    start_test_instance,
)
from tests.functions import load_function

RUN_ID = "20261204T150000Z-1a2b3c4d"
OLD_RUN_ID = "20261201T090000Z-99999999"
SERVING_URL = "http://203.0.113.10:8000"


@pytest.fixture
def address(ec2):
    """Allocation id of the stack's serving Elastic IP."""
    return ec2.allocate_address(Domain="vpc")["AllocationId"]


@pytest.fixture
def gate(ec2, address, monkeypatch):
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.setenv("SERVER_LAUNCH_TEMPLATE_ID", launch_template(ec2, "server"))
    monkeypatch.setenv("STACK_NAME", "test-stack")
    monkeypatch.setenv("ACCURACY_THRESHOLD", "0.95")
    monkeypatch.setenv("ACCURACY_TOLERANCE", "0.005")
    monkeypatch.setenv("SERVING_ALLOCATION_ID", address)
    monkeypatch.setenv("SERVING_URL", SERVING_URL)

    return load_function("gate")


def address_holder(ec2, allocation_id):
    [described] = ec2.describe_addresses(AllocationIds=[allocation_id])["Addresses"]
    return described.get("InstanceId")


def training_run(store, ec2, run_id=RUN_ID, status="succeeded", accuracy=0.99):
    """Store a run whose trainer is running and has just written its meta."""
    trainer_id = start_test_instance(ec2, instances.TRAINER_ROLE, run_id)
    now = utc_now()
    store.put_run(
        RunRecord(
            run_id=run_id,
            status=RunStatus.TRAINING,
            data_key="data/mnist.npz",
            data_etag="abc",
            created_at=now,
            updated_at=now,
            trainer_instance_id=trainer_id,
        )
    )
    store.put_train_meta(
        TrainMeta(
            run_id=run_id,
            status=status,
            data_key="data/mnist.npz",
            data_etag="abc",
            started_at=now,
            finished_at=now,
            instance_id=trainer_id,
            test_accuracy=accuracy if status == "succeeded" else None,
            error=None if status == "succeeded" else "RuntimeError: out of memory",
        )
    )
    return trainer_id


def serving(store, ec2, accuracy, allocation_id=None):
    """Store a model that is already serving, with its server running.

    With ``allocation_id`` the server also holds the serving address.
    """
    server_id = start_test_instance(ec2, instances.SERVER_ROLE, OLD_RUN_ID)
    if allocation_id:
        ec2.associate_address(AllocationId=allocation_id, InstanceId=server_id)
    store.put_serving(
        ServingPointer(
            model_version=OLD_RUN_ID,
            test_accuracy=accuracy,
            instance_id=server_id,
            url=SERVING_URL,
            since=utc_now(),
        )
    )
    return server_id


def meta_event(run_id=RUN_ID):
    return s3_event("gate_training_finished.json", key=keys.train_meta(run_id))


def servers(ec2):
    reservations = ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{instances.ROLE_TAG}", "Values": [instances.SERVER_ROLE]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def test_first_good_model_is_promoted(gate, store, ec2, lambda_context):
    trainer_id = training_run(store, ec2, accuracy=0.99)

    gate.lambda_handler(meta_event(), lambda_context)

    run = store.get_run(RUN_ID)
    [server] = servers(ec2)
    tags = instances.tags_of(server)
    assert instance_state(ec2, trainer_id) == "terminated"
    assert run.status == RunStatus.PROMOTING
    assert run.decision == Decision.PROMOTE
    assert run.test_accuracy == 0.99
    assert run.serving_test_accuracy is None
    assert run.server_instance_id == server["InstanceId"]
    assert tags[instances.MODEL_VERSION_TAG] == RUN_ID
    assert "no model is serving yet" in run.reason


def test_model_below_threshold_is_not_promoted(gate, store, ec2, lambda_context):
    trainer_id = training_run(store, ec2, accuracy=0.90)

    gate.lambda_handler(meta_event(), lambda_context)

    run = store.get_run(RUN_ID)
    assert instance_state(ec2, trainer_id) == "terminated"
    assert run.status == RunStatus.NOT_PROMOTED
    assert run.decision == Decision.REJECT
    assert "below the threshold 0.9500" in run.reason
    assert servers(ec2) == []


def test_worse_model_leaves_server_untouched(gate, store, ec2, address, lambda_context):
    old_server = serving(store, ec2, accuracy=0.995, allocation_id=address)
    training_run(store, ec2, accuracy=0.985)

    gate.lambda_handler(meta_event(), lambda_context)

    run = store.get_run(RUN_ID)
    assert run.status == RunStatus.NOT_PROMOTED
    assert run.serving_version == OLD_RUN_ID
    assert run.serving_test_accuracy == 0.995
    assert "worse than the serving model's 0.9950" in run.reason
    assert [s["InstanceId"] for s in servers(ec2)] == [old_server]
    assert store.get_serving().model_version == OLD_RUN_ID
    assert address_holder(ec2, address) == old_server


def test_model_within_tolerance_is_promoted(gate, store, ec2, lambda_context):
    serving(store, ec2, accuracy=0.992)
    training_run(store, ec2, accuracy=0.990)

    gate.lambda_handler(meta_event(), lambda_context)

    assert store.get_run(RUN_ID).status == RunStatus.PROMOTING
    assert len(servers(ec2)) == 2


def test_failed_training_terminates_trainer(gate, store, ec2, lambda_context):
    trainer_id = training_run(store, ec2, status="failed")

    gate.lambda_handler(meta_event(), lambda_context)

    run = store.get_run(RUN_ID)
    assert instance_state(ec2, trainer_id) == "terminated"
    assert run.status == RunStatus.FAILED
    assert "out of memory" in run.reason
    assert servers(ec2) == []


def test_duplicate_meta_event_starts_one_server(gate, store, ec2, lambda_context):
    training_run(store, ec2)

    for _ in range(3):
        gate.lambda_handler(meta_event(), lambda_context)

    assert len(servers(ec2)) == 1


def test_meta_of_unknown_run_is_ignored(gate, store, ec2, lambda_context):
    other_trainer = start_test_instance(ec2, instances.TRAINER_ROLE, "other")
    store.s3.put_object(Bucket=BUCKET, Key=keys.train_meta(RUN_ID), Body=b"{}")

    result = gate.lambda_handler(meta_event(), lambda_context)

    assert result == {"runs": []}
    assert instance_state(ec2, other_trainer) == "running"


def test_malformed_meta_is_ignored(gate, store, ec2, lambda_context):
    trainer_id = training_run(store, ec2)
    store.s3.put_object(Bucket=BUCKET, Key=keys.train_meta(RUN_ID), Body=b"{not json")

    result = gate.lambda_handler(meta_event(), lambda_context)

    assert result == {"runs": []}
    assert store.get_run(RUN_ID).status == RunStatus.TRAINING
    assert instance_state(ec2, trainer_id) == "running"


def ready(store, ec2, instance_id, run_id=RUN_ID):
    store.put_server_ready(
        ServerReady(
            instance_id=instance_id,
            model_version=run_id,
            url="http://new:8000",
            ready_at=utc_now(),
            smoke_correct=20,
            smoke_total=20,
        )
    )
    return s3_event("gate_server_ready.json", key=keys.server_ready(instance_id))


def test_ready_server_takes_over_the_address(gate, store, ec2, address, lambda_context):
    old_server = serving(store, ec2, accuracy=0.99, allocation_id=address)
    training_run(store, ec2, accuracy=0.991)
    gate.lambda_handler(meta_event(), lambda_context)
    new_server = store.get_run(RUN_ID).server_instance_id
    # The old server keeps the address until the new one reports ready.
    assert address_holder(ec2, address) == old_server

    gate.lambda_handler(ready(store, ec2, new_server), lambda_context)

    pointer = store.get_serving()
    run = store.get_run(RUN_ID)
    assert address_holder(ec2, address) == new_server
    assert pointer.model_version == RUN_ID
    assert pointer.instance_id == new_server
    assert pointer.url == SERVING_URL
    assert pointer.previous_version == OLD_RUN_ID
    assert pointer.previous_instance_id == old_server
    assert run.status == RunStatus.PROMOTED
    assert run.server_url == "http://new:8000"
    # The reaper retires the old server after the grace period.
    assert instance_state(ec2, old_server) == "running"
    assert instance_state(ec2, new_server) == "running"


def test_server_never_ready_leaves_address(gate, store, ec2, address, lambda_context):
    # GIVEN a promotion whose new server never reports ready
    old_server = serving(store, ec2, accuracy=0.99, allocation_id=address)
    training_run(store, ec2, accuracy=0.991)

    gate.lambda_handler(meta_event(), lambda_context)

    # THEN users keep the old server at the same address
    assert store.get_run(RUN_ID).status == RunStatus.PROMOTING
    assert address_holder(ec2, address) == old_server
    assert store.get_serving().instance_id == old_server
    assert instance_state(ec2, old_server) == "running"


def test_gate_without_address_moves_pointer_only(
    ec2, store, monkeypatch, lambda_context
):
    monkeypatch.setenv("BUCKET_NAME", BUCKET)
    monkeypatch.setenv("SERVER_LAUNCH_TEMPLATE_ID", launch_template(ec2, "server"))
    monkeypatch.setenv("STACK_NAME", "test-stack")
    monkeypatch.delenv("SERVING_ALLOCATION_ID", raising=False)
    monkeypatch.delenv("SERVING_URL", raising=False)
    gate = load_function("gate")
    training_run(store, ec2)
    gate.lambda_handler(meta_event(), lambda_context)
    server = store.get_run(RUN_ID).server_instance_id

    gate.lambda_handler(ready(store, ec2, server), lambda_context)

    pointer = store.get_serving()
    assert pointer.instance_id == server
    assert pointer.url == "http://new:8000"


def test_ready_report_of_unknown_server_is_ignored(
    gate, store, ec2, address, lambda_context
):
    old_server = serving(store, ec2, accuracy=0.99, allocation_id=address)
    training_run(store, ec2)
    gate.lambda_handler(meta_event(), lambda_context)

    result = gate.lambda_handler(
        ready(store, ec2, "i-0000000000000dead"), lambda_context
    )

    assert result == {"runs": []}
    assert store.get_serving().model_version == OLD_RUN_ID
    assert instance_state(ec2, old_server) == "running"
    assert address_holder(ec2, address) == old_server


@pytest.mark.parametrize(
    ("accuracy", "serving_accuracy", "expected"),
    [
        (0.96, None, Decision.PROMOTE),
        (0.95, None, Decision.PROMOTE),
        (0.9499, None, Decision.REJECT),
        (0.990, 0.994, Decision.PROMOTE),
        (0.989, 0.995, Decision.REJECT),
        (0.999, 0.990, Decision.PROMOTE),
    ],
)
def test_decide_table(gate, accuracy, serving_accuracy, expected):
    decision, reason = gate.decide(accuracy, serving_accuracy, 0.95, 0.005)

    assert decision == expected
    assert f"{accuracy:.4f}" in reason


def test_ready_report_before_review_is_retried(gate, store, ec2, lambda_context):
    # GIVEN a ready report that overtook the review of its run
    training_run(store, ec2)

    # WHEN it arrives THEN the gate raises, so S3's retry delivers it later
    with pytest.raises(gate.CutoverPendingError):
        gate.lambda_handler(ready(store, ec2, "i-0123456789abcdef0"), lambda_context)
    assert store.get_serving() is None


def test_cutover_retry_keeps_history_and_address(
    gate, store, ec2, address, lambda_context, monkeypatch
):
    # GIVEN a cutover that moved the address and pointer, then failed to save
    # the run
    old_server = serving(store, ec2, accuracy=0.99, allocation_id=address)
    training_run(store, ec2)
    gate.lambda_handler(meta_event(), lambda_context)
    new_server = store.get_run(RUN_ID).server_instance_id
    event = ready(store, ec2, new_server)
    original_put_run = store.put_run
    calls = []

    def failing_put_run(record):
        calls.append(record.status)
        raise RuntimeError("S3 unavailable")

    monkeypatch.setattr(
        gate.PipelineStore, "put_run", lambda self, r: failing_put_run(r)
    )
    with pytest.raises(RuntimeError):
        gate.lambda_handler(event, lambda_context)
    monkeypatch.undo()
    assert original_put_run

    # WHEN the event is retried
    associations = []
    associate = gate.ec2.associate_address
    monkeypatch.setattr(
        gate.ec2,
        "associate_address",
        lambda **kwargs: associations.append(kwargs) or associate(**kwargs),
    )
    gate.lambda_handler(event, lambda_context)

    # THEN the pointer keeps the right history and the address is not remapped
    pointer = store.get_serving()
    assert pointer.instance_id == new_server
    assert pointer.previous_version == OLD_RUN_ID
    assert pointer.previous_instance_id == old_server
    assert address_holder(ec2, address) == new_server
    assert associations == []
    assert store.get_run(RUN_ID).status == RunStatus.PROMOTED


def test_malformed_run_record_is_ignored(gate, store, ec2, lambda_context):
    trainer_id = training_run(store, ec2)
    store.s3.put_object(
        Bucket=BUCKET,
        Key=keys.run_record(RUN_ID),
        Body=b'{"run_id": "x", "train_size": 1.5}',
    )

    result = gate.lambda_handler(meta_event(), lambda_context)

    assert result == {"runs": []}
    assert instance_state(ec2, trainer_id) == "running"


def test_parallel_promotions_keep_better_model(
    gate, store, ec2, address, lambda_context
):
    # GIVEN two runs both promoted against the same older model
    serving(store, ec2, accuracy=0.955, allocation_id=address)
    better, worse = "20261204T150000Z-aaaaaaaa", "20261204T150001Z-bbbbbbbb"
    training_run(store, ec2, run_id=better, accuracy=0.99)
    training_run(store, ec2, run_id=worse, accuracy=0.96)
    gate.lambda_handler(meta_event(better), lambda_context)
    gate.lambda_handler(meta_event(worse), lambda_context)
    better_server = store.get_run(better).server_instance_id
    worse_server = store.get_run(worse).server_instance_id

    # WHEN the better one is ready first, then the worse one
    gate.lambda_handler(ready(store, ec2, better_server, better), lambda_context)
    gate.lambda_handler(ready(store, ec2, worse_server, worse), lambda_context)

    # THEN the better model keeps serving and the worse server is gone
    assert store.get_serving().model_version == better
    assert address_holder(ec2, address) == better_server
    assert store.get_run(worse).status == RunStatus.NOT_PROMOTED
    assert "was promoted while this server started" in store.get_run(worse).reason
    assert instance_state(ec2, worse_server) == "terminated"
    assert instance_state(ec2, better_server) == "running"


def test_cutover_records_history(gate, store, ec2, lambda_context):
    training_run(store, ec2)
    gate.lambda_handler(meta_event(), lambda_context)
    server = store.get_run(RUN_ID).server_instance_id

    gate.lambda_handler(ready(store, ec2, server), lambda_context)

    [entry] = store.list_serving_history()
    assert entry.model_version == RUN_ID
    assert entry.instance_id == server


def test_rollback_serves_earlier_model_safely(
    gate, store, ec2, address, lambda_context
):
    # GIVEN a better old model replaced by a newer one within the tolerance
    from mnist_pipeline.records import RollbackRequest

    old_run, new_run = "20261204T150000Z-aaaaaaaa", "20261204T160000Z-bbbbbbbb"
    training_run(store, ec2, run_id=old_run, accuracy=0.992)
    gate.lambda_handler(meta_event(old_run), lambda_context)
    old_server = store.get_run(old_run).server_instance_id
    gate.lambda_handler(ready(store, ec2, old_server, old_run), lambda_context)
    training_run(store, ec2, run_id=new_run, accuracy=0.990)
    gate.lambda_handler(meta_event(new_run), lambda_context)
    new_server = store.get_run(new_run).server_instance_id
    gate.lambda_handler(ready(store, ec2, new_server, new_run), lambda_context)
    assert address_holder(ec2, address) == new_server

    # WHEN a user asks for the old version back
    request = RollbackRequest(model_version=old_run, requested_at=utc_now())
    store.put_rollback_request(request)
    event = s3_event(
        "gate_server_ready.json", key=keys.serving_request(request.requested_at)
    )
    gate.lambda_handler(event, lambda_context)
    rollback_server = store.get_run(old_run).server_instance_id
    # The current server keeps serving until the rollback server is ready.
    assert store.get_serving().model_version == new_run
    assert address_holder(ec2, address) == new_server
    gate.lambda_handler(ready(store, ec2, rollback_server, old_run), lambda_context)

    # THEN the old version serves from a new server and history shows all three
    assert store.get_serving().model_version == old_run
    assert store.get_serving().previous_instance_id == new_server
    assert address_holder(ec2, address) == rollback_server
    assert instance_state(ec2, rollback_server) == "running"
    assert store.get_run(old_run).rollback_requested_at is None
    versions = [entry.model_version for entry in store.list_serving_history()]
    assert versions == [old_run, new_run, old_run]


def test_rollback_to_unknown_version_is_ignored(gate, store, lambda_context):
    from mnist_pipeline.records import RollbackRequest

    request = RollbackRequest(
        model_version="20261204T150000Z-00000000", requested_at=utc_now()
    )
    store.put_rollback_request(request)
    event = s3_event(
        "gate_server_ready.json", key=keys.serving_request(request.requested_at)
    )

    assert gate.lambda_handler(event, lambda_context) == {"runs": []}
