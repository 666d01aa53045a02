"""Time the whole retraining loop on the local cloud.

Usage: python benchmarks/loop.py --data DIR [--epochs N]

DIR contains the four MNIST IDX files. Starts the local cloud, uploads the
dataset, waits until the model serves, classifies 100 test digits over
HTTP and prints one JSON line:

    upload_s        packaging, checking and uploading the dataset
    to_training_s   upload done until the launcher started the trainer
    to_serving_s    upload done until the new server took over
    fit_s           the trainer's model.fit time, from train_meta.json
    test_accuracy   the served model's accuracy on the 10,000 test digits
    http_correct    correct predictions for the first 100 test digits over HTTP
    total_s         start of the local cloud to the last prediction
"""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from mnist_pipeline.cli import encode_png, find_run, predict_files, upload_dataset
from mnist_pipeline.localcloud import LocalCloud
from mnist_pipeline.localcloud.runner import free_port
from mnist_pipeline.records import RunStatus
from mnist_pipeline.sources import read_source

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=5, help="epochs (default: 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dataset = read_source(args.data)
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as state_dir,
        LocalCloud(
            ROOT,
            port=free_port(),
            state_dir=state_dir,
            parameter_overrides={"TrainingEpochs": str(args.epochs)},
        ) as cloud,
    ):
        store = cloud.store
        upload_started = time.monotonic()
        key, etag = upload_dataset(store, dataset, "benchmark", progress=False)
        uploaded = time.monotonic()

        to_training = None
        record = None
        while time.monotonic() - uploaded < 3600:
            record = find_run(store, key, etag)
            if record and to_training is None and record.trainer_instance_id:
                to_training = time.monotonic() - uploaded
            if record and record.status in (
                RunStatus.PROMOTED,
                RunStatus.FAILED,
                RunStatus.NOT_PROMOTED,
                RunStatus.REJECTED,
            ):
                break
            time.sleep(0.2)
        to_serving = time.monotonic() - uploaded
        if record is None or record.status != RunStatus.PROMOTED:
            print(f"run did not serve: {record}", file=sys.stderr)
            return 1

        meta = store.get_train_meta(record.run_id)
        serving = store.get_serving()
        files = {f"{i}.png": encode_png(dataset.x_test[i]) for i in range(100)}
        predictions = predict_files(serving.url, files)
        correct = sum(
            prediction["digit"] == int(dataset.y_test[i])
            for i, prediction in enumerate(predictions.values())
        )
        total = time.monotonic() - started

    print(
        json.dumps(
            {
                "epochs": args.epochs,
                "upload_s": round(uploaded - upload_started, 2),
                "to_training_s": round(to_training or 0.0, 2),
                "to_serving_s": round(to_serving, 2),
                "fit_s": round(meta.timings["fit_s"], 2),
                "test_accuracy": round(meta.test_accuracy, 4),
                "http_correct": correct,
                "total_s": round(total, 2),
            }
        )
    )

    return 0


if __name__ == "__main__":
    sys.exit(main())
