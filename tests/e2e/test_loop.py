"""The whole retraining loop on the local cloud, with real MNIST.

moto's server plays AWS; the launcher and gate run as Lambda invocations in
their own processes, and each EC2 instance is a local trainer or server
process. Only the endpoint URL differs from AWS.
"""

import io

import numpy as np
import pytest
import requests
from PIL import Image

from mnist_pipeline import instances
from mnist_pipeline.cli import upload_dataset, wait_for_run
from mnist_pipeline.dataset import Dataset
from mnist_pipeline.localcloud import LocalCloud
from mnist_pipeline.localcloud.runner import free_port
from mnist_pipeline.records import RunStatus
from tests.conftest import ROOT, png
from tests.e2e.helpers import instance_states, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

RUN_TIMEOUT_SECONDS = 900


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    local = LocalCloud(
        ROOT,
        port=free_port(),
        state_dir=tmp_path_factory.mktemp("localcloud"),
        parameter_overrides={"TrainingEpochs": "1"},
        schedule_seconds=2,
    )
    with local:
        yield local


def test_upload_trains_gates_and_serves(cloud, mnist):
    store = cloud.store

    # GIVEN the full real MNIST uploaded, WHEN the loop runs on its own
    key, etag = upload_dataset(store, mnist, "mnist", progress=False)
    run = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)

    # THEN the model trained on 60,000 digits is promoted and serving
    assert run.status == RunStatus.PROMOTED, run.reason
    meta = store.get_train_meta(run.run_id)
    assert meta.succeeded
    assert run.train_size == 60000
    assert meta.test_accuracy >= 0.97
    serving = store.get_serving()
    assert serving.model_version == run.run_id

    # AND the trainer instance is terminated, with no trainer process left
    assert wait_until(
        lambda: instance_states(cloud)[run.trainer_instance_id] == "terminated"
    )
    assert wait_until(lambda: cloud.runner.running(instances.TRAINER_ROLE) == [])

    # AND 100 real test digits sent over HTTP come back right
    health = requests.get(f"{serving.url}/health", timeout=10).json()
    assert health == {
        "status": "ok",
        "model_version": run.run_id,
        "run_id": run.run_id,
    }
    correct = 0
    with requests.Session() as session:
        for image, label in zip(mnist.x_test[:100], mnist.y_test[:100], strict=True):
            response = session.post(
                f"{serving.url}/predict",
                files={"file": ("digit.png", png(image))},
                timeout=10,
            )
            assert response.status_code == 200
            correct += response.json()["digit"] == label
    assert correct >= 97


def test_broken_upload_starts_no_instance(cloud):
    store = cloud.store
    before = instance_states(cloud)

    store.s3.put_object(
        Bucket=store.bucket,
        Key="data/broken.npz",
        Body=b"PK\x03\x04 this archive ends here",
    )
    etag = store.s3.head_object(Bucket=store.bucket, Key="data/broken.npz")["ETag"]
    run = wait_for_run(store, "data/broken.npz", etag.strip('"'), timeout=120)

    assert run.status == RunStatus.REJECTED
    assert "not a readable .npz archive" in run.reason
    assert run.trainer_instance_id is None
    assert instance_states(cloud) == before


def test_retraining_replaces_the_server(cloud, mnist):
    store = cloud.store
    old = store.get_serving()

    key, etag = upload_dataset(store, mnist, "mnist-again", progress=False)
    run = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)

    assert run.status == RunStatus.PROMOTED, run.reason
    assert run.serving_version == old.model_version
    new = store.get_serving()
    assert new.model_version == run.run_id
    assert new.previous_version == old.model_version
    assert wait_until(lambda: instance_states(cloud)[old.instance_id] == "terminated")
    assert requests.get(f"{new.url}/health", timeout=10).json()["model_version"] == (
        run.run_id
    )

    # The runner stops a terminated instance's process within its next polls.
    def only_new_server_runs():
        running = cloud.runner.running(instances.SERVER_ROLE)
        return [server.instance_id for server in running] == [new.instance_id]

    assert wait_until(only_new_server_runs)


def as_user_picture(digit: np.ndarray, style: int) -> bytes:
    """Render an MNIST test digit the way users send digits.

    Black ink on white paper, 280x280, off-centre, as PNG, JPEG or RGBA with
    a transparent background, by ``style``.
    """
    ink = Image.fromarray(255 - digit).resize((160, 160), Image.Resampling.BICUBIC)
    paper = Image.new("L", (280, 280), 255)
    offset = (20 + 11 * (style % 7), 30 + 13 * (style % 5))
    paper.paste(ink, offset)
    buffer = io.BytesIO()
    if style % 3 == 0:
        paper.save(buffer, format="PNG")
    elif style % 3 == 1:
        paper.convert("RGB").save(buffer, format="JPEG", quality=85)
    else:
        rgba = np.zeros((280, 280, 4), np.uint8)
        rgba[..., 3] = 255 - np.asarray(paper)  # black ink, transparent paper
        Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def served_classifier(cloud):
    from mnist_server.classifier import DigitClassifier

    from mnist_pipeline import keys

    version = cloud.store.get_serving().model_version
    return DigitClassifier(cloud.store.get_bytes(keys.tflite_model(version)), version)


def test_user_pictures_are_read_like_mnist(cloud, mnist):
    from mnist_server.preprocess import preprocess

    serving = cloud.store.get_serving()
    classifier = served_classifier(cloud)
    images, labels = mnist.x_test[:500], mnist.y_test[:500]
    correct = squeezed_correct = 0
    with requests.Session() as session:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            picture = as_user_picture(image, index)
            response = session.post(
                f"{serving.url}/predict", files={"file": ("digit", picture)}, timeout=10
            )
            assert response.status_code == 200
            correct += response.json()["digit"] == label

            # Without MNIST's steps: the picture squeezed to 28x28 and inverted.
            plain = Image.open(io.BytesIO(picture)).convert("L").resize((28, 28))
            squeezed = 255 - np.asarray(plain, dtype=np.uint8)
            squeezed_correct += classifier.predict(squeezed).argmax() == label
    assert preprocess(png(images[0])).shape == (28, 28)

    print(
        f"\nuser-style pictures: {correct}/500 correct with preprocessing, "
        f"{squeezed_correct}/500 squeezed to 28x28 without it"
    )
    assert correct >= 0.95 * len(labels)


def test_mnist_digits_pass_preprocessing_unchanged(cloud, mnist):
    from mnist_server.preprocess import preprocess

    classifier = served_classifier(cloud)
    raw = preprocessed = 0
    for image, label in zip(mnist.x_test, mnist.y_test, strict=True):
        raw += classifier.predict(image).argmax() == label
        preprocessed += classifier.predict(preprocess(png(image))).argmax() == label

    print(
        f"\nMNIST test accuracy: {raw / 100:.2f}% raw, {preprocessed / 100:.2f}% "
        "through preprocessing"
    )
    assert abs(raw - preprocessed) <= 10  # 0.1 points of 10,000 digits


def test_killed_trainer_is_reaped_and_old_model_serves(cloud, mnist):
    from mnist_pipeline.cli import find_run

    store = cloud.store
    serving = store.get_serving()
    assert serving is not None, "needs the model the earlier tests in this module serve"
    key, etag = upload_dataset(store, mnist, "killed", progress=False)

    def trainer_started():
        run = find_run(store, key, etag)
        return run is not None and run.trainer_instance_id is not None

    # GIVEN a trainer that dies mid-run, before it can report
    assert wait_until(trainer_started, timeout=60)
    run = find_run(store, key, etag)
    cloud.client("ec2").terminate_instances(InstanceIds=[run.trainer_instance_id])

    # WHEN the scheduled reaper runs THEN the run fails with the reason
    assert wait_until(
        lambda: store.get_run(run.run_id).status == RunStatus.FAILED, timeout=60
    )
    assert "without writing train_meta.json" in store.get_run(run.run_id).reason
    assert wait_until(lambda: cloud.runner.running(instances.TRAINER_ROLE) == [])
    # AND users keep the model that was serving
    assert store.get_serving() == serving
    health = requests.get(f"{serving.url}/health", timeout=10)
    assert health.json()["model_version"] == serving.model_version


def test_rollback_serves_previous_model(cloud, monkeypatch, capsys):
    from mnist_pipeline import cli

    store = cloud.store
    current = store.get_serving()
    assert current.previous_version, "needs the two promotions made above"
    for name, value in cloud.environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(cli.BUCKET_ENV, store.bucket)

    code = cli.main(["rollback", "--wait", "--timeout", "300"])

    restored = store.get_serving()
    assert code == 0
    assert restored.model_version == current.previous_version
    assert restored.instance_id != current.instance_id
    assert wait_until(
        lambda: instance_states(cloud)[current.instance_id] == "terminated"
    )
    health = requests.get(f"{restored.url}/health", timeout=10).json()
    assert health["model_version"] == current.previous_version
    history = [entry.model_version for entry in store.list_serving_history()]
    assert history[-2:] == [current.model_version, current.previous_version]
    assert cli.main(["history"]) == 0
    assert current.previous_version in capsys.readouterr().out


def test_stopped_trainer_resumes_from_its_checkpoint(cloud, mnist):
    from mnist_pipeline.cli import find_run
    from mnist_pipeline.records import TrainingState

    store = cloud.store
    ec2 = cloud.client("ec2")
    subset = Dataset(mnist.x_train[:12000], mnist.y_train[:12000], *mnist[2:])
    # Three short epochs of the fast recipe, without its early stop.
    request = {
        "train-recipe": "fast",
        "train-epochs": "3",
        "train-target-accuracy": "none",
    }
    key, etag = upload_dataset(store, subset, "resumed", False, request)

    def checkpointed():
        run = find_run(store, key, etag)
        return run is not None and store.get_checkpoint(run.run_id) is not None

    # GIVEN a trainer that finished its first epoch
    assert wait_until(checkpointed, timeout=RUN_TIMEOUT_SECONDS)
    run = find_run(store, key, etag)
    first_trainer = run.trainer_instance_id

    # WHEN its instance is stopped mid-run, as a spot interruption would
    ec2.stop_instances(InstanceIds=[first_trainer])

    # THEN it saves, the reaper starts a new trainer, and that one resumes
    final = wait_for_run(store, key, etag, timeout=RUN_TIMEOUT_SECONDS)
    assert final.status in (RunStatus.PROMOTED, RunStatus.NOT_PROMOTED), final.reason
    assert final.trainer_attempts == 2
    assert final.trainer_instance_id != first_trainer
    meta = store.get_train_meta(run.run_id)
    assert meta.succeeded, meta.error
    assert meta.resumed_from_epoch >= 1
    assert meta.epochs_run == 3
    assert len(meta.history["val_accuracy"]) == 3
    assert meta.test_accuracy >= 0.95
    assert meta.instance_id == final.trainer_instance_id
    assert store.get_progress(run.run_id).state == TrainingState.FINISHED
    # AND no trainer instance or process is left
    assert wait_until(
        lambda: instance_states(cloud)[first_trainer] == "terminated", timeout=60
    )
    assert wait_until(lambda: cloud.runner.running(instances.TRAINER_ROLE) == [])
