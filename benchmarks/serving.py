"""Measure the server's throughput and latency with wrk.

Usage: python benchmarks/serving.py --data DIR [--duration 10]

DIR contains the four MNIST IDX files. The script trains the baseline CNN
for 2 epochs, or reuses the one in .benchmarks/. It starts moto's server
with the model in a bucket and starts ``python -m mnist_server``. wrk
(Debian package ``wrk``) then drives it at 8 connections, posting one 28x28
PNG as multipart form data. It then measures two reference servers the same
way, `bare_server` (the same image work with no web framework) and the
original design's `seed_server`, and prints one JSON line:

    predict_rps, predict_p50_ms, predict_p99_ms   POST /predict
    health_rps                                    GET /health, same run
    predict_health_ratio                          predict_rps / health_rps
    predict_cpu_us, health_cpu_us                 server CPU time per request
    startup_s                                     process start to /health 200
    rss_mb                                        server memory after the load
    bare_predict_rps, bare_predict_cpu_us         the same image work and model
                                                  with no web framework
    bare_predict_health_ratio                     bare_predict_rps / health_rps
    seed_predict_rps, seed_predict_p99_ms         the original design's server
"""

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import requests
from moto.server import ThreadedMotoServer

from mnist_pipeline import keys
from mnist_pipeline.localcloud.runner import free_port
from mnist_pipeline.sources import read_source

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".benchmarks"
VERSION = "20261204T000000Z-benchmark"
CONNECTIONS = 8
# Epochs of the served model: its architecture, not its accuracy, sets the speed.
MODEL_EPOCHS = 2
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def trained_model(data_dir: str) -> Path:
    """Train and export the default recipe's CNN once; later runs reuse it.

    The cache is named after the recipe, so a changed recipe trains anew.
    """
    from mnist_pipeline.hyperparameters import DEFAULT_RECIPE

    cache = CACHE / f"{DEFAULT_RECIPE}-{MODEL_EPOCHS}-epochs"
    if (cache / "model.tflite").exists():
        return cache
    from mnist_trainer.export import export_tflite, select_smoke_digits
    from mnist_trainer.model import train_and_evaluate

    dataset = read_source(data_dir)
    result = train_and_evaluate(dataset, epochs=MODEL_EPOCHS, verbose=0)
    tflite, _ = export_tflite(result.model, dataset.x_test)
    images, labels = select_smoke_digits(result.model, dataset.x_test, dataset.y_test)
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "model.tflite").write_bytes(tflite)
    result.model.save(cache / "model.keras")
    with open(cache / "smoke.npz", "wb") as smoke:
        np.savez_compressed(smoke, images=images, labels=labels)

    return cache


def digit_png(data_dir: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(read_source(data_dir).x_test[0]).save(buffer, format="PNG")

    return buffer.getvalue()


def wait_healthy(url: str, timeout: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return time.monotonic() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"{url}/health did not return 200 within {timeout} s")


def run_wrk(url: str, duration: int, script: Path | None = None) -> dict:
    command = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency", url]
    if script:
        command[1:1] = ["-s", str(script)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout

    def latency_ms(percent: str) -> float:
        value, unit = re.search(
            rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)", output, re.M
        ).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)

    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        "p50_ms": latency_ms("50"),
        "p99_ms": latency_ms("99"),
        "errors": int(errors.group(1)) if errors else 0,
    }


def multipart_script(work: Path, png: bytes) -> Path:
    boundary = "benchmarkboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="digit.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    (work / "body.bin").write_bytes(body)
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"\n'
        f'local file = io.open("{work / "body.bin"}", "rb")\n'
        'wrk.body = file:read("*all")\nfile:close()\n'
    )

    return script


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    # utime and stime, fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk_measuring_cpu(url: str, duration: int, pid: int, **options) -> dict:
    """Run wrk and add the server's CPU microseconds per request to its result."""
    before = cpu_seconds(pid)
    result = run_wrk(url, duration, **options)
    used = cpu_seconds(pid) - before
    result["cpu_us"] = round(used / (result["rps"] * duration) * 1e6, 1)

    return result


def start_uvicorn(
    app: str, port: int, environment: dict[str, str], *options: str
) -> subprocess.Popen:
    """Start a reference server from this repository with uvicorn."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *options,
        ],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()

    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of MNIST IDX files")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load")
    args = parser.parse_args()

    model_dir = trained_model(args.data)
    png = digit_png(args.data)
    moto_port, port = free_port(), free_port()
    bare_port, seed_port = free_port(), free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="benchmark")
    s3.put_object(
        Bucket="benchmark",
        Key=keys.tflite_model(VERSION),
        Body=(model_dir / "model.tflite").read_bytes(),
    )
    s3.put_object(
        Bucket="benchmark",
        Key=keys.smoke_digits(VERSION),
        Body=(model_dir / "smoke.npz").read_bytes(),
    )

    environment = {
        **os.environ,
        **AWS_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "BUCKET_NAME": "benchmark",
        "MODEL_VERSION": VERSION,
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as work_dir:
        script = multipart_script(Path(work_dir), png)
        server = subprocess.Popen(
            [sys.executable, "-m", "mnist_server"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            startup = wait_healthy(url)
            predict = run_wrk_measuring_cpu(
                f"{url}/predict", args.duration, server.pid, script=script
            )
            health = run_wrk_measuring_cpu(f"{url}/health", args.duration, server.pid)
            memory = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait()

        bare = start_uvicorn(
            "benchmarks.bare_server:app",
            bare_port,
            {**environment, "MODEL_PATH": str(model_dir / "model.tflite")},
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
        )
        try:
            wait_healthy(f"http://127.0.0.1:{bare_port}")
            bare_predict = run_wrk_measuring_cpu(
                f"http://127.0.0.1:{bare_port}/predict",
                args.duration,
                bare.pid,
                script=script,
            )
        finally:
            bare.terminate()
            bare.wait()

        seed = start_uvicorn(
            "benchmarks.seed_server:app",
            seed_port,
            {**environment, "MODEL_PATH": str(model_dir / "model.keras")},
        )
        try:
            wait_healthy(f"http://127.0.0.1:{seed_port}")
            seed_predict = run_wrk(
                f"http://127.0.0.1:{seed_port}/predict", args.duration, script
            )
        finally:
            seed.terminate()
            seed.wait()
    moto.stop()

    print(
        json.dumps(
            {
                "predict_rps": predict["rps"],
                "predict_p50_ms": predict["p50_ms"],
                "predict_p99_ms": predict["p99_ms"],
                "predict_errors": predict["errors"],
                "health_rps": health["rps"],
                "predict_health_ratio": round(predict["rps"] / health["rps"], 3),
                "predict_cpu_us": predict["cpu_us"],
                "health_cpu_us": health["cpu_us"],
                "startup_s": round(startup, 3),
                "rss_mb": round(memory, 1),
                "bare_predict_rps": bare_predict["rps"],
                "bare_predict_health_ratio": round(
                    bare_predict["rps"] / health["rps"], 3
                ),
                "bare_predict_cpu_us": bare_predict["cpu_us"],
                "seed_predict_rps": seed_predict["rps"],
                "seed_predict_p99_ms": seed_predict["p99_ms"],
                "connections": CONNECTIONS,
                "duration_s": args.duration,
            }
        )
    )

    return 0


if __name__ == "__main__":
    sys.exit(main())
