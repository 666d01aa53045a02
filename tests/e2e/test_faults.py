"""Fault injection on the local cloud: whatever goes wrong, nothing is lost.

Every test injects one kind of fault into the running pipeline (moto's
server as AWS, the functions in their own processes, each instance a local
trainer or server process) and then checks the same three things with
`assert_nothing_lost`:

* run records are consistent: every run reached a final status with a
  reason, no upload has two runs, and no run had more trainer instances
  than it records;
* the model that should serve does, at the stable serving address;
* no instance runs that should not: no trainer, and one server.

Faults and where they are injected:

* duplicate and concurrent S3 events: the event S3 sent is taken from the
  function's queue and put back ten times (`dispatcher.EventDispatcher.hold`
  keeps the function from taking it first);
* odd keys, zero-byte objects, two uploads at once, bad datasets: uploads;
* unknown and malformed ``train_meta.json``: objects written by hand;
* EC2 capacity, throttling and Spot errors: `faults.FaultProxy` fails
  RunInstances requests with EC2's own errors;
* a trainer that crashes or hangs: SIGKILL or SIGSTOP to its process;
* a trainer that runs too long: more epochs than MaxTrainingMinutes allows;
* a corrupt model: the object is overwritten between training and review.

`test_loop.py` covers a trainer instance terminated mid-run, a stopped
trainer resuming from its checkpoint, and rollback on the local cloud.
`test_cutover_load.py` covers a cutover under 60 s of load.

The runs train the fast recipe for one epoch on 12,000 real digits, so
the accuracy threshold is 0.9 here.
"""

import io
import json
import os
import signal
import time
from collections import Counter
from urllib.parse import quote_plus, unquote_plus

import numpy as np
import pytest
import requests

from mnist_pipeline import instances, keys
from mnist_pipeline.cli import FINAL_STATUSES, find_run, upload_dataset, wait_for_run
from mnist_pipeline.dataset import Dataset, save_dataset
from mnist_pipeline.localcloud import LocalCloud, dispatcher
from mnist_pipeline.localcloud.runner import free_port
from mnist_pipeline.records import RunRecord, RunStatus, ServingPointer
from tests.conftest import ROOT, png
from tests.e2e.helpers import described_instances, instance_states, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

LAUNCHER = "LauncherFunction"
GATE = "GateFunction"
RUN_TIMEOUT_SECONDS = 600
HEARTBEAT_MINUTES = 1
MAX_TRAINING_MINUTES = 1
# The reaper ends a trainer this many minutes past MaxTrainingMinutes, so
# that the instance's own time limit acts first on AWS.
REAPER_GRACE_MINUTES = 5
# The dispatcher retries a failed event after 5 s, and SQS moves it to the
# dead-letter queue once the last attempt's visibility timeout (the
# function's 120 s timeout) has passed.
DEAD_LETTER_TIMEOUT_SECONDS = 400


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    local = LocalCloud(
        ROOT,
        port=free_port(),
        state_dir=tmp_path_factory.mktemp("localcloud"),
        parameter_overrides={
            "TrainingRecipe": "fast",
            "TrainingEpochs": "1",
            "AccuracyThreshold": "0.9",
            "UseSpot": "true",
            "HeartbeatMinutes": str(HEARTBEAT_MINUTES),
            # Below the template's minimum of 5, which the local cloud does
            # not enforce, so that a run past its limit shows within minutes.
            "MaxTrainingMinutes": str(MAX_TRAINING_MINUTES),
        },
        schedule_seconds=2,
        server_grace_seconds=2,
        inject_faults=True,
    )
    with local:
        yield local


@pytest.fixture(scope="module")
def digits(mnist) -> Dataset:
    """12,000 real training digits and 1,000 real test digits."""
    return Dataset(
        mnist.x_train[:12000],
        mnist.y_train[:12000],
        mnist.x_test[:1000],
        mnist.y_test[:1000],
    )


@pytest.fixture(scope="module")
def serving(cloud, digits) -> ServingPointer:
    """A model trained, promoted and serving before any fault."""
    key, etag = upload_dataset(cloud.store, digits, "baseline", progress=False)
    run = wait_for_run(cloud.store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert run.status == RunStatus.PROMOTED, run.reason

    return assert_nothing_lost(cloud)


@pytest.fixture
def faults(cloud):
    cloud.faults.rules.clear()
    yield cloud.faults.rules
    cloud.faults.rules.clear()


def live_instances(cloud, role: str) -> list[str]:
    return sorted(
        instance["InstanceId"]
        for instance in described_instances(cloud)
        if instance["State"]["Name"] in ("pending", "running")
        and instances.tags_of(instance).get(instances.ROLE_TAG) == role
    )


def trainers_per_run(cloud) -> Counter:
    """Count the trainer instances ever started for each run id."""
    counts: Counter = Counter()
    for instance in described_instances(cloud):
        tags = instances.tags_of(instance)
        if tags.get(instances.ROLE_TAG) == instances.TRAINER_ROLE:
            counts[tags[instances.RUN_ID_TAG]] += 1

    return counts


def assert_nothing_lost(
    cloud, expected: ServingPointer | None = None
) -> ServingPointer:
    """Check records, serving model and instances once the pipeline is idle.

    ``expected`` is the pointer that must still serve; None accepts
    whatever the runs promoted last. Returns the serving pointer.
    """
    store = cloud.store

    # Every run ends, each with a reason, and each upload has one run.
    def all_final() -> list[RunRecord] | None:
        runs = store.list_runs()
        return runs if all(r.status in FINAL_STATUSES for r in runs) else None

    runs = wait_until(all_final, RUN_TIMEOUT_SECONDS)
    assert runs is not None, [(r.run_id, r.status) for r in store.list_runs()]
    uploads = Counter((r.data_key, r.data_etag) for r in runs)
    assert max(uploads.values()) == 1, uploads
    for run in runs:
        assert run.reason or run.status == RunStatus.PROMOTED, run
    # No run had more trainer instances than it records.
    started = trainers_per_run(cloud)
    for run in runs:
        assert started[run.run_id] <= run.trainer_attempts, (run, started)
        if run.status == RunStatus.REJECTED:
            assert started[run.run_id] == 0, run

    # The serving model is a promoted run, and the stable address serves it.
    pointer = store.get_serving()
    assert pointer is not None
    if expected is not None:
        assert pointer.model_version == expected.model_version
        assert pointer.instance_id == expected.instance_id
    promoted = {r.run_id for r in runs if r.status == RunStatus.PROMOTED}
    assert pointer.model_version in promoted
    health = requests.get(f"{cloud.serving_url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["model_version"] == pointer.model_version

    # No trainer runs, and only the serving server once the grace period ends.
    assert wait_until(lambda: live_instances(cloud, instances.TRAINER_ROLE) == [])
    assert wait_until(
        lambda: live_instances(cloud, instances.SERVER_ROLE) == [pointer.instance_id]
    ), live_instances(cloud, instances.SERVER_ROLE)
    assert wait_until(
        lambda: (
            [local.instance_id for local in cloud.runner.running()]
            == [pointer.instance_id]
        ),
        timeout=90,  # a hung process gets SIGKILL after the stop grace period
    )

    return pointer


def function_log(cloud, function: str) -> str:
    return (cloud.state_dir / "logs" / f"{function}.log").read_text()


def gate_log(cloud) -> str:
    return function_log(cloud, GATE)


def skipped(cloud, function: str, run_id: str) -> int:
    """Count the deliveries a function skipped as duplicates of a run's event."""
    return sum(
        "skipping duplicate event" in line and run_id in line
        for line in function_log(cloud, function).splitlines()
    )


def take_events(
    cloud, function: str, count: int = 1, timeout: float = 120
) -> list[str]:
    """Take ``count`` event bodies from a held function's queue."""
    sqs = cloud.client("sqs")
    url = next(f.queue_url for f in cloud.dispatcher.functions if f.name == function)
    bodies: list[str] = []
    deadline = time.monotonic() + timeout
    while len(bodies) < count and time.monotonic() < deadline:
        messages = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
        ).get("Messages", [])
        for message in messages:
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            if "Records" in json.loads(message["Body"]):
                bodies.append(message["Body"])
    assert len(bodies) == count, f"{function} got {len(bodies)} of {count} events"

    return bodies


def deliver(cloud, function: str, body: str, times: int) -> None:
    """Put one event ``times`` times into a function's queue."""
    sqs = cloud.client("sqs")
    url = next(f.queue_url for f in cloud.dispatcher.functions if f.name == function)
    for start in range(0, times, 10):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(number), "MessageBody": body}
                for number in range(start, min(start + 10, times))
            ],
        )


def event_key(body: str) -> str:
    return unquote_plus(json.loads(body)["Records"][0]["s3"]["object"]["key"])


def events_settle(cloud, quiet_seconds: float = 4, timeout: float = 120) -> None:
    """Wait until every event-driven function's queue stays empty.

    The dispatcher deletes a message once its invocation ends, so an empty
    queue means every delivered event was handled.
    """
    sqs = cloud.client("sqs")
    counts = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    quiet_since = time.monotonic()
    deadline = quiet_since + timeout
    while time.monotonic() < deadline:
        for function in cloud.dispatcher.functions:
            attributes = sqs.get_queue_attributes(
                QueueUrl=function.queue_url, AttributeNames=counts
            )["Attributes"]
            if any(int(attributes[name]) for name in counts):
                quiet_since = time.monotonic()
        if time.monotonic() - quiet_since >= quiet_seconds:
            return
        time.sleep(0.5)
    raise AssertionError(f"events were still pending after {timeout} s")


def npz_bytes(dataset: Dataset | dict) -> bytes:
    buffer = io.BytesIO()
    if isinstance(dataset, Dataset):
        save_dataset(buffer, *dataset)
    else:
        np.savez_compressed(buffer, **dataset)
    return buffer.getvalue()


def put_dataset(cloud, key: str, body: bytes) -> tuple[str, str]:
    store = cloud.store
    response = store.s3.put_object(Bucket=store.bucket, Key=key, Body=body)
    return key, response["ETag"].strip('"')


def trainer_process(cloud, run_id: str, timeout: float = 120):
    """Return the local process of a run's trainer, once it runs."""

    def started():
        run = cloud.store.get_run(run_id)
        if run is None or run.trainer_instance_id is None:
            return None
        local = cloud.runner.instances.get(run.trainer_instance_id)
        return local if local and local.process.poll() is None else None

    local = wait_until(started, timeout)
    assert local is not None, f"no trainer process for run {run_id}"
    return local.process


def started_run(store, key: str, etag: str) -> RunRecord | None:
    """Return the upload's run once its trainer instance has started."""
    run = find_run(store, key, etag)
    if run is None or run.trainer_instance_id is None:
        return None

    return run


def run_of(cloud, key: str, etag: str, timeout: float = 120) -> RunRecord:
    run = wait_until(lambda: find_run(cloud.store, key, etag), timeout)
    assert run is not None, f"no run for {key}"
    return run


# Events


def test_duplicate_events_start_one_trainer_and_one_server(cloud, digits, serving):
    store = cloud.store
    with cloud.dispatcher.hold(GATE):
        with cloud.dispatcher.hold(LAUNCHER):
            # GIVEN the S3 event of one upload, delivered 10 times, 4 at once
            key, etag = upload_dataset(store, digits, "duplicated", progress=False)
            [uploaded] = take_events(cloud, LAUNCHER)
            deliver(cloud, LAUNCHER, uploaded, 10)
        run = run_of(cloud, key, etag)
        meta = wait_until(lambda: store.get_train_meta(run.run_id), RUN_TIMEOUT_SECONDS)
        assert meta is not None, "the trainer wrote no train_meta.json"
        # AND the event of its train_meta.json 10 times too, which the gate
        # takes one at a time (its reserved concurrency is 1)
        [finished] = take_events(cloud, GATE)
        assert event_key(finished) == keys.train_meta(run.run_id)
        deliver(cloud, GATE, finished, 10)

    # THEN one run, one trainer and one server for the upload
    final = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert final.status == RunStatus.PROMOTED, final.reason
    assert trainers_per_run(cloud)[final.run_id] == 1
    servers = [
        i
        for i in described_instances(cloud)
        if instances.tags_of(i).get(instances.MODEL_VERSION_TAG) == final.run_id
    ]
    assert [s["InstanceId"] for s in servers] == [final.server_instance_id]
    history = [p.model_version for p in store.list_serving_history()]
    assert history.count(final.run_id) == 1
    # AND the other deliveries were each skipped, with the reason logged
    assert skipped(cloud, LAUNCHER, final.run_id) >= 9
    assert skipped(cloud, GATE, final.run_id) >= 9
    assert assert_nothing_lost(cloud).model_version == final.run_id


def test_odd_keys_and_two_close_uploads(cloud, digits, serving):
    store = cloud.store
    odd = Dataset(digits.x_train[:6000], digits.y_train[:6000], *digits[2:])
    odd_name = "data/zahlen März+v2 ü.npz"
    with cloud.dispatcher.hold(LAUNCHER):
        # GIVEN a key with a space, a plus sign and non-ASCII letters
        odd_key, odd_etag = put_dataset(cloud, odd_name, npz_bytes(odd))
        [odd_event] = take_events(cloud, LAUNCHER)
        # AND a second dataset uploaded at the same moment
        other_key, other_etag = upload_dataset(store, digits, "close", progress=False)
        # AND a zero-byte object and a folder placeholder, whose event the
        # suffix filter drops; it is delivered here all the same
        empty_key, empty_etag = put_dataset(cloud, "data/empty.npz", b"")
        store.s3.put_object(Bucket=store.bucket, Key="data/folder/", Body=b"")
        placeholder = json.loads(odd_event)
        placeholder["Records"][0]["s3"]["object"].update(
            key=quote_plus("data/folder/"), size=0
        )
        # S3 sends the key URL-encoded, with "+" for a space.
        raw_key = json.loads(odd_event)["Records"][0]["s3"]["object"]["key"]
        assert raw_key == quote_plus(odd_name)
        deliver(cloud, LAUNCHER, odd_event, 1)
        deliver(cloud, LAUNCHER, json.dumps(placeholder), 1)

    # THEN both datasets train, each in its own run (uploads do not queue)
    odd_run = wait_for_run(store, odd_key, odd_etag, timeout=RUN_TIMEOUT_SECONDS)
    other_run = wait_for_run(store, other_key, other_etag, timeout=RUN_TIMEOUT_SECONDS)
    assert odd_run.data_key == odd_name
    assert odd_run.train_size == 6000
    for run in (odd_run, other_run):
        assert run.status in (RunStatus.PROMOTED, RunStatus.NOT_PROMOTED), run.reason
        assert store.get_train_meta(run.run_id).data_key == run.data_key
    # AND the zero-byte object is rejected with the fix
    empty = wait_for_run(store, empty_key, empty_etag, timeout=120)
    assert empty.status == RunStatus.REJECTED
    assert "mnist-pipeline upload" in empty.reason
    # AND the placeholder starts nothing
    events_settle(cloud)
    assert all(r.data_key != "data/folder/" for r in store.list_runs())

    # AND the model that serves is one of them, or the earlier one
    pointer = assert_nothing_lost(cloud)
    promoted = {
        r.run_id for r in (odd_run, other_run) if r.status == RunStatus.PROMOTED
    }
    assert pointer.model_version in promoted | {serving.model_version}
    if promoted:
        assert pointer.model_version in promoted


def test_train_meta_of_unknown_runs_is_ignored(cloud, serving):
    store = cloud.store
    current = store.get_serving()
    runs_before = store.list_runs()
    states_before = instance_states(cloud)
    invoked = cloud.dispatcher.invocations
    meta = json.loads(store.get_bytes(keys.train_meta(current.model_version)))

    # GIVEN a train_meta.json of a run that does not exist, and another
    # that is not JSON either
    meta["run_id"] = "20261204T000000Z-deadbeef"
    store.s3.put_object(
        Bucket=store.bucket,
        Key=keys.train_meta(meta["run_id"]),
        Body=json.dumps(meta).encode(),
    )
    store.s3.put_object(
        Bucket=store.bucket,
        Key=keys.train_meta("20261204T000001Z-deadbeef"),
        Body=b"{not json",
    )

    # THEN the gate reads both, logs why, and changes nothing
    assert wait_until(lambda: cloud.dispatcher.invocations >= invoked + 2)
    events_settle(cloud)
    assert store.list_runs() == runs_before
    assert instance_states(cloud) == states_before
    assert gate_log(cloud).count("No run record for this train_meta.json") >= 2
    assert assert_nothing_lost(cloud, current) == current


def test_malformed_meta_of_training_run_ignored(cloud, digits, serving):
    store = cloud.store
    current = store.get_serving()
    key, etag = upload_dataset(store, digits, "malformed-meta", progress=False)
    run = run_of(cloud, key, etag)
    trainer = trainer_process(cloud, run.run_id)
    other_meta = store.get_bytes(keys.train_meta(current.model_version))

    # GIVEN a training run (its trainer paused while the test writes) whose
    # train_meta.json key first gets bytes that are not a train_meta.json,
    # then the train_meta.json of another run
    os.killpg(trainer.pid, signal.SIGSTOP)
    try:
        for body in (b'{"run_id": 7}', other_meta):
            invoked = cloud.dispatcher.invocations
            store.s3.put_object(
                Bucket=store.bucket, Key=keys.train_meta(run.run_id), Body=body
            )
            assert wait_until(lambda: cloud.dispatcher.invocations > invoked)  # noqa: B023
            events_settle(cloud)

        # THEN the gate ignores both: the trainer runs, nothing is promoted
        assert store.get_run(run.run_id).status == RunStatus.TRAINING
        assert instance_states(cloud)[run.trainer_instance_id] == "running"
        assert store.get_serving() == current
    finally:
        os.killpg(trainer.pid, signal.SIGCONT)
    log = gate_log(cloud)
    assert "Malformed train_meta.json, ignoring it" in log
    assert "train_meta.json is missing or names another run, ignoring it" in log

    # AND the run's own train_meta.json, written at the end, is reviewed
    final = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert final.status in (RunStatus.PROMOTED, RunStatus.NOT_PROMOTED), final.reason
    assert store.get_train_meta(run.run_id).run_id == run.run_id
    assert_nothing_lost(cloud)


# Bad data


def bad_datasets(digits: Dataset) -> dict[str, tuple[bytes, str]]:
    """Real digits packed wrongly, each with a phrase of the expected reason."""
    arrays = {
        "x_train": digits.x_train[:2000],
        "y_train": digits.y_train[:2000],
        "x_test": digits.x_test[:200],
        "y_test": digits.y_test[:200],
    }

    def changed(**replacements) -> bytes:
        return npz_bytes({**arrays, **replacements})

    whole = changed()
    without_test = {k: v for k, v in arrays.items() if not k.endswith("_test")}
    return {
        "pickled labels": (
            changed(y_train=arrays["y_train"].astype(object)),
            "object and pickled",
        ),
        "float images": (changed(x_train=arrays["x_train"] / 255.0), "expected uint8"),
        "int64 labels": (changed(y_test=arrays["y_test"].astype(np.int64)), "uint8"),
        "flat images": (
            changed(x_test=arrays["x_test"].reshape(200, 784)),
            "3 dimensions",
        ),
        "labels outside 0-9": (changed(y_train=arrays["y_train"] + 10), "outside 0-9"),
        "count mismatch": (changed(y_train=arrays["y_train"][:1500]), "1500 labels"),
        "tiny train split": (
            changed(x_train=arrays["x_train"][:50], y_train=arrays["y_train"][:50]),
            "fewer than 1000",
        ),
        "empty test split": (
            changed(x_test=arrays["x_test"][:0], y_test=arrays["y_test"][:0]),
            "fewer than 100",
        ),
        "missing test split": (npz_bytes(without_test), "x_test"),
        "truncated object": (whole[: len(whole) // 2], "not a readable .npz"),
        "not an archive": (b"x_train,y_train\n", "not a readable .npz"),
    }


def test_bad_datasets_are_rejected_before_any_instance(cloud, digits, serving):
    store = cloud.store
    current = store.get_serving()
    cases = bad_datasets(digits)
    launched_before = len(described_instances(cloud))

    # GIVEN every kind of broken dataset, uploaded at once
    uploads = {
        case: put_dataset(cloud, f"data/bad/{case.replace(' ', '-')}.npz", body)
        for case, (body, _) in cases.items()
    }

    # THEN each run is rejected with its reason, and no instance starts
    for case, (key, etag) in uploads.items():
        run = wait_for_run(store, key, etag, timeout=120)
        assert run.status == RunStatus.REJECTED, (case, run.status)
        assert cases[case][1] in run.reason, (case, run.reason)
        assert run.trainer_instance_id is None
    assert len(described_instances(cloud)) == launched_before
    assert assert_nothing_lost(cloud, current) == current


def test_imbalanced_and_repeated_data_trains_with_warnings(cloud, digits, serving):
    store = cloud.store
    # GIVEN real digits where 0 outnumbers 1 five to one, and 100 repeats
    ones = np.flatnonzero(digits.y_train == 1)
    keep = np.setdiff1d(np.arange(12000), ones[len(ones) // 5 :])
    x_train = np.concatenate([digits.x_train[keep], digits.x_train[:100]])
    y_train = np.concatenate([digits.y_train[keep], digits.y_train[:100]])
    skewed = Dataset(x_train, y_train, digits.x_test, digits.y_test)
    key, etag = put_dataset(cloud, "data/skewed.npz", npz_bytes(skewed))

    # THEN the run trains, and its record carries the warnings
    run = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert run.status in (RunStatus.PROMOTED, RunStatus.NOT_PROMOTED), run.reason
    assert any("Strong class imbalance" in w for w in run.warnings)
    assert "x_train repeats 100 images." in run.warnings
    assert_nothing_lost(cloud)


# Trainers that crash or hang


def test_crashed_trainer_fails_its_run(cloud, digits, serving):
    store = cloud.store
    current = store.get_serving()
    key, etag = upload_dataset(store, digits, "crashed", progress=False)
    run = run_of(cloud, key, etag)

    # GIVEN a trainer container that dies before its first checkpoint
    os.killpg(trainer_process(cloud, run.run_id).pid, signal.SIGKILL)

    # THEN its instance ends and the reaper fails the run with the reason
    final = wait_for_run(store, key, etag, timeout=120)
    assert final.status == RunStatus.FAILED
    assert "ended without writing train_meta.json" in final.reason
    assert instance_states(cloud)[run.trainer_instance_id] == "terminated"
    assert assert_nothing_lost(cloud, current) == current


def test_hung_trainer_is_terminated_and_fails_its_run(cloud, digits, serving):
    store = cloud.store
    current = store.get_serving()
    key, etag = upload_dataset(store, digits, "hung", progress=False)
    run = run_of(cloud, key, etag)

    # GIVEN a trainer that stops making progress, as a deadlock would
    os.killpg(trainer_process(cloud, run.run_id).pid, signal.SIGSTOP)

    # THEN once it is silent past HeartbeatMinutes, the reaper ends it
    final = wait_for_run(store, key, etag, timeout=HEARTBEAT_MINUTES * 60 + 120)
    assert final.status == RunStatus.FAILED
    assert "sent no heartbeat" in final.reason
    assert wait_until(
        lambda: instance_states(cloud)[run.trainer_instance_id] == "terminated"
    )
    assert assert_nothing_lost(cloud, current) == current


def test_trainer_past_time_limit_is_terminated(cloud, mnist, serving):
    store = cloud.store
    current = store.get_serving()
    # GIVEN a run asked to train far longer than MaxTrainingMinutes allows
    # (200 epochs of 60,000 digits, about 10 s each here), whose trainer
    # keeps reporting progress
    request = {
        "train-recipe": "default",
        "train-epochs": "200",
        "train-target-accuracy": "none",
    }
    key, etag = upload_dataset(store, mnist, "too-long", False, request)
    run = run_of(cloud, key, etag)

    # THEN the reaper terminates it once it is past the limit and the grace
    limit_minutes = MAX_TRAINING_MINUTES + REAPER_GRACE_MINUTES
    final = wait_for_run(store, key, etag, timeout=(limit_minutes + 3) * 60)
    assert final.status == RunStatus.FAILED
    assert f"past the limit of {limit_minutes}" in final.reason
    assert store.get_progress(run.run_id).epoch >= 1
    assert wait_until(
        lambda: instance_states(cloud)[run.trainer_instance_id] == "terminated"
    )
    assert assert_nothing_lost(cloud, current) == current


# Safe cutover


def test_corrupt_model_never_reaches_users(cloud, digits, serving):
    store = cloud.store
    current = store.get_serving()
    with cloud.dispatcher.hold(GATE):
        key, etag = upload_dataset(store, digits, "corrupt-model", progress=False)
        run = run_of(cloud, key, etag)
        assert wait_until(lambda: store.get_train_meta(run.run_id), RUN_TIMEOUT_SECONDS)
        # GIVEN a model damaged after training, before the gate reviews it
        model = store.get_bytes(keys.tflite_model(run.run_id))
        store.s3.put_object(
            Bucket=store.bucket,
            Key=keys.tflite_model(run.run_id),
            Body=model[: len(model) // 2],
        )

    # THEN the gate promotes it on its accuracy, but its server never gets
    # healthy: it is terminated, the run fails, and users keep the old model
    final = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert final.status == RunStatus.FAILED
    assert final.decision == "promote"
    assert "ended before it reported ready" in final.reason
    assert instance_states(cloud)[final.server_instance_id] == "terminated"
    assert assert_nothing_lost(cloud, current) == current
    correct = 0
    with requests.Session() as session:
        for image, label in zip(digits.x_test[:20], digits.y_test[:20], strict=True):
            response = session.post(
                f"{cloud.serving_url}/predict",
                files={"file": ("digit.png", png(image))},
                timeout=10,
            )
            assert response.status_code == 200
            assert response.json()["model_version"] == current.model_version
            correct += response.json()["digit"] == label
    assert correct >= 18


# EC2 failures


def test_spot_errors_fall_back_to_on_demand(cloud, faults, digits, serving):
    store = cloud.store
    first, second = cloud.subnet_ids
    # GIVEN EC2 throttles twice, then has no Spot capacity anywhere
    faults.fail_run_instances("RequestLimitExceeded", times=2)
    faults.fail_run_instances("InsufficientInstanceCapacity", market="spot")

    key, etag = upload_dataset(store, digits, "on-demand", progress=False)

    # THEN the throttled request is retried in place, each subnet is tried
    # for Spot, and the trainer starts On-Demand in the first subnet
    run = wait_until(lambda: started_run(store, key, etag), 120)
    assert run, "no trainer started"
    seen = [(r.subnet_id, r.market, r.error_code) for r in faults.requests]
    assert seen[:2] == [(first, "spot", "RequestLimitExceeded")] * 2
    assert (second, "spot", "InsufficientInstanceCapacity") in seen
    assert seen[-1] == (first, "on-demand", None)
    [trainer] = [
        i
        for i in described_instances(cloud)
        if i["InstanceId"] == run.trainer_instance_id
    ]
    assert trainer["SubnetId"] == first
    assert "InstanceLifecycle" not in trainer  # On-Demand

    final = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert final.status in (RunStatus.PROMOTED, RunStatus.NOT_PROMOTED), final.reason
    assert_nothing_lost(cloud)


def dead_letters(cloud) -> list[dict]:
    sqs = cloud.client("sqs")
    url = sqs.get_queue_url(QueueName=f"{cloud.stack_name}-{LAUNCHER}-dlq")
    messages = sqs.receive_message(
        QueueUrl=url["QueueUrl"], MaxNumberOfMessages=10, WaitTimeSeconds=1
    )
    return [json.loads(message["Body"]) for message in messages.get("Messages", [])]


def test_no_capacity_fails_run_and_dead_letters_event(cloud, faults, digits, serving):
    store = cloud.store
    current = store.get_serving()

    # GIVEN no subnet of the stack has capacity, Spot or On-Demand
    faults.fail_run_instances("InsufficientInstanceCapacity")

    key, etag = upload_dataset(store, digits, "no-capacity", progress=False)

    # THEN the launcher fails every delivery and the event is dead-lettered
    letters = wait_until(lambda: dead_letters(cloud), DEAD_LETTER_TIMEOUT_SECONDS)
    assert letters, "the launcher's event never reached its dead-letter queue"
    [event] = letters
    assert unquote_plus(event["Records"][0]["s3"]["object"]["key"]) == key
    run = find_run(store, key, etag)
    assert run.status == RunStatus.FAILED
    assert run.trainer_instance_id is None
    assert "InsufficientInstanceCapacity" in run.reason
    assert "Add subnets in other Availability Zones to SubnetIds" in run.reason
    # AND each delivery tried both subnets for Spot, then for On-Demand,
    # with botocore's retries in each
    tried = [(request.subnet_id, request.market) for request in faults.requests]
    per_delivery = instances.MAX_ATTEMPTS * len(cloud.subnet_ids) * 2
    assert len(tried) == dispatcher.MAX_ATTEMPTS * per_delivery
    assert set(tried) == {
        (subnet, market)
        for subnet in cloud.subnet_ids
        for market in ("spot", "on-demand")
    }
    assert all(request.error_code for request in faults.requests)
    # AND no instance was started for it, and nothing else changed
    assert trainers_per_run(cloud)[run.run_id] == 0
    assert assert_nothing_lost(cloud, current) == current


def test_trainer_starts_in_second_subnet(cloud, faults, digits, serving):
    store = cloud.store
    first, second = cloud.subnet_ids

    # GIVEN the first subnet's zone has no capacity of either market
    faults.fail_run_instances("InsufficientInstanceCapacity", subnet_ids=[first])

    key, etag = upload_dataset(store, digits, "second-subnet", progress=False)

    # THEN the trainer starts as Spot in the second subnet
    run = wait_until(lambda: started_run(store, key, etag), 120)
    assert run, "no trainer started"
    [trainer] = [
        i
        for i in described_instances(cloud)
        if i["InstanceId"] == run.trainer_instance_id
    ]
    assert trainer["SubnetId"] == second
    assert faults.requests[-1].subnet_id == second
    assert faults.requests[-1].market == "spot"

    final = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert final.status in (RunStatus.PROMOTED, RunStatus.NOT_PROMOTED), final.reason
    assert_nothing_lost(cloud)
