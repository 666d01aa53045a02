import json

import pytest

from mnist_pipeline import keys
from mnist_pipeline.exceptions import InvalidRecordError, SettingsError
from mnist_pipeline.records import RunRecord, RunStatus, TrainMeta, utc_now
from mnist_pipeline.settings import GateSettings, LauncherSettings


def record(**changes):
    now = utc_now()
    fields = dict(
        run_id="20261204T150000Z-1a2b3c4d",
        status=RunStatus.TRAINING,
        data_key="data/x.npz",
        data_etag="e",
        created_at=now,
        updated_at=now,
    )
    fields.update(changes)
    return RunRecord(**fields)


def test_run_record_round_trip():
    original = record(test_accuracy=0.99, hyperparameters={"epochs": 3})

    assert RunRecord.from_json(original.to_json()) == original


def test_unknown_fields_are_ignored():
    data = json.loads(record().to_json())
    data["added_by_a_newer_writer"] = 1

    assert RunRecord.from_dict(data).run_id == "20261204T150000Z-1a2b3c4d"


def test_missing_field_is_named():
    data = json.loads(record().to_json())
    del data["data_key"]

    with pytest.raises(InvalidRecordError, match="missing field 'data_key'"):
        RunRecord.from_dict(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("status", "exploded"),
        ("test_accuracy", "high"),
        ("data_size", True),
    ],
)
def test_wrong_type_is_named(field, value):
    data = json.loads(record().to_json())
    data[field] = value

    with pytest.raises(InvalidRecordError, match=f"RunRecord.{field}"):
        RunRecord.from_dict(data)


def test_meta_rejects_non_object():
    with pytest.raises(InvalidRecordError, match="must be a JSON object"):
        TrainMeta.from_json(b"[1, 2]")


def test_integer_accuracy_is_accepted_as_float():
    meta = TrainMeta.from_dict(
        {
            "run_id": "r",
            "status": "succeeded",
            "data_key": "k",
            "data_etag": "e",
            "started_at": "t",
            "finished_at": "t",
            "test_accuracy": 1,
        }
    )
    assert meta.test_accuracy == 1.0


def test_keys_parse_train_meta():
    run_id = "20261204T150000Z-1a2b3c4d"

    assert keys.run_id_from_train_meta(keys.train_meta(run_id)) == run_id
    assert keys.run_id_from_train_meta("models/../train_meta.json") is None
    assert keys.run_id_from_train_meta(f"models/{run_id}/extra/train_meta.json") is None


def test_missing_setting_is_named():
    with pytest.raises(SettingsError, match="BUCKET_NAME is missing"):
        LauncherSettings.from_env({})


@pytest.mark.parametrize(
    ("value", "expected"), [("1.5", "from 0 to 1"), ("x", "from 0 to 1")]
)
def test_invalid_threshold_is_named(value, expected):
    environ = {
        "BUCKET_NAME": "b",
        "SERVER_LAUNCH_TEMPLATE_ID": "lt",
        "STACK_NAME": "s",
        "ACCURACY_THRESHOLD": value,
    }

    with pytest.raises(
        SettingsError, match=f"ACCURACY_THRESHOLD='{value}'.*{expected}"
    ):
        GateSettings.from_env(environ)
