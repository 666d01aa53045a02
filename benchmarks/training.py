"""Train every recipe on real MNIST, side by side on this machine.

Usage: python benchmarks/training.py --data DIR [--rounds N]

DIR contains the four MNIST IDX files. Each recipe trains in a fresh Python
process, one after another, and is scored on the 10,000 test digits:

    seed      the original design as it ran: the baseline CNN fitted on
              float32 arrays with Keras' validation_split=0.1, batch 64,
              Adam, 5 epochs
    default   this project's recipes, through the trainer's own code
    fast      (`mnist_trainer.model.fit_model`)
    seed_in_pipeline  the seed recipe's numbers through the trainer's code,
              to show what the input pipeline alone changes

With ``--rounds N`` every run repeats N times, the runs of one round
back to back, and the medians count. On this virtual machine the same fit
took 10-20% longer or shorter from one run to the next. Prints one JSON line:

    seed, default, fast, seed_in_pipeline
                          {"fit_s", "test_accuracy", "epochs_run"}: medians,
                          with every round's values in "fit_s_rounds" and
                          "test_accuracy_rounds"
    default_fit_ratio     default fit_s / seed fit_s (target: at most 1)
    fast_fit_ratio        fast fit_s / seed fit_s (target: at most 1/3)
    default_spread_points with 2 or more rounds: the largest difference of
                          the default recipe's test accuracy between rounds
                          with the same data and seed, in points
    device, cpus          what the runs ran on
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

RUNS = ("seed", "default", "fast", "seed_in_pipeline")


def train_original(dataset) -> tuple:
    """Fit the seed recipe the way the original design did."""
    import time

    import keras
    from mnist_trainer.model import as_model_input, make_model

    from mnist_pipeline.hyperparameters import resolve

    seed = resolve("seed")
    keras.utils.set_random_seed(seed.seed)
    model = make_model(seed, steps=1)
    started = time.perf_counter()
    history = model.fit(
        as_model_input(dataset.x_train),
        dataset.y_train,
        batch_size=seed.batch_size,
        epochs=seed.epochs,
        validation_split=0.1,
        verbose=0,
    )
    return model, history.history, time.perf_counter() - started


def train_one(data_dir: str, run: str) -> dict:
    """Train one recipe in this process and return its numbers."""
    import tensorflow as tf
    from mnist_trainer.model import evaluate_model, fit_model, plan_for

    from mnist_pipeline.hyperparameters import resolve
    from mnist_pipeline.sources import read_source

    dataset = read_source(data_dir)
    plan = plan_for(tf.config.list_physical_devices("GPU"))
    if run == "seed":
        model, history, fit_seconds = train_original(dataset)
    else:
        recipe = "seed" if run == "seed_in_pipeline" else run
        model, history, fit_seconds = fit_model(
            dataset, resolve(recipe), plan=plan, verbose=0
        )
    evaluation = evaluate_model(model, dataset)

    return {
        "fit_s": round(fit_seconds, 2),
        "test_accuracy": round(evaluation.accuracy, 4),
        "epochs_run": len(history["loss"]),
        "device": plan.device,
    }


def run_in_subprocess(data_dir: str, recipe: str) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, "--data", data_dir, "--only", recipe],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr[-4000:])
        raise SystemExit(f"Training recipe {recipe} failed")

    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of MNIST IDX files")
    parser.add_argument(
        "--rounds", type=int, default=1, help="times to train each (default: 1)"
    )
    parser.add_argument("--only", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.only:
        print(json.dumps(train_one(args.data, args.only)))
        return 0

    rounds: dict[str, list[dict]] = {run: [] for run in RUNS}
    for _ in range(args.rounds):
        for run in RUNS:
            rounds[run].append(run_in_subprocess(args.data, run))

    results: dict = {}
    for run, measured in rounds.items():
        fit = [m["fit_s"] for m in measured]
        accuracy = [m["test_accuracy"] for m in measured]
        results[run] = {
            "fit_s": statistics.median(fit),
            "test_accuracy": statistics.median(accuracy),
            "epochs_run": measured[-1]["epochs_run"],
            "fit_s_rounds": fit,
            "test_accuracy_rounds": accuracy,
        }
    seed_fit = results["seed"]["fit_s"]
    results["default_fit_ratio"] = round(results["default"]["fit_s"] / seed_fit, 3)
    results["fast_fit_ratio"] = round(results["fast"]["fit_s"] / seed_fit, 3)
    if args.rounds > 1:
        accuracy = results["default"]["test_accuracy_rounds"]
        results["default_spread_points"] = round(
            100 * (max(accuracy) - min(accuracy)), 3
        )
    results["device"] = rounds["seed"][0]["device"]
    results["cpus"] = os.cpu_count()
    print(json.dumps(results))

    return 0


if __name__ == "__main__":
    sys.exit(main())
