"""Typed access to the pipeline bucket's documents.

`PipelineStore` reads and writes the JSON documents of `records` at the keys
of `keys`, so no component builds a key or parses a document on its own.
"""

import dataclasses
import datetime
import json
import logging
import shutil
from typing import IO, Any, TypeVar

from botocore.exceptions import ClientError

from mnist_pipeline import keys
from mnist_pipeline.exceptions import InvalidRecordError, PipelineError
from mnist_pipeline.records import (
    RollbackRequest,
    RunRecord,
    RunStatus,
    ServerReady,
    ServingPointer,
    TrainingCheckpoint,
    TrainingProgress,
    TrainMeta,
    _Document,
    utc_now,
)

D = TypeVar("D", bound=_Document)

logger = logging.getLogger(__name__)

_NOT_FOUND = ("NoSuchKey", "404", "NotFound")
# S3 returns 412 when a conditional write loses and 409 when two race.
_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class UploadInProgressError(PipelineError):
    """Another invocation holds a fresh lock on this upload; retry later."""


@dataclasses.dataclass(frozen=True)
class UploadClaim:
    """Outcome of `PipelineStore.claim_upload`.

    ``owned`` is True when this caller must handle the upload under
    ``run_id``: it created the lock, or took over a stale one whose run
    never started a trainer.
    """

    run_id: str
    owned: bool


class PipelineStore:
    """The pipeline bucket, seen through its documents."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    def get_bytes(self, key: str) -> bytes | None:
        """Return an object's body, or None when the key does not exist."""
        try:
            response = self.s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise

        return response["Body"].read()

    def _get(self, schema: type[D], key: str) -> D | None:
        body = self.get_bytes(key)

        return None if body is None else schema.from_json(body)

    def _put(self, key: str, document: _Document) -> None:
        self.s3.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=document.to_json(),
            ContentType="application/json",
        )

    def download(self, key: str, etag: str, target: IO[bytes]) -> dict[str, str]:
        """Copy one version of an object, named by its ETag, into ``target``.

        Returns the object's user metadata (``x-amz-meta-*``, without the
        prefix).
        """
        response = self.s3.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
        shutil.copyfileobj(response["Body"], target, 1 << 20)

        return response.get("Metadata", {})

    def _write_lock(self, key: str, run_id: str, **condition: str) -> bool:
        body = json.dumps({"run_id": run_id, "created_at": utc_now()}).encode()
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, **condition)
        except ClientError as exc:
            if _error_code(exc) in _CONDITION_FAILED:
                return False
            raise

        return True

    def claim_upload(
        self,
        data_key: str,
        etag: str,
        run_id: str,
        stale_after: float,
        version_id: str | None = None,
    ) -> UploadClaim:
        """Decide which delivery of an upload's event handles it.

        S3 may deliver one event several times, even concurrently. The first
        delivery creates the upload's lock with a conditional write
        (``If-None-Match: *``) and owns the run. A later delivery gets
        ``owned=False`` once the run has a trainer or a final status. While
        the owner may still be working (lock younger than ``stale_after``
        seconds) it raises `UploadInProgressError`, so the event is retried.
        An older lock whose run never got a trainer belonged to an
        invocation that crashed: the caller takes it over with a write
        conditional on the lock's ETag and resumes the same run. A run that
        failed without ever getting a trainer (no capacity, or the reaper
        gave up on it) is taken over the same way at any age, so a retried
        or replayed event tries to start its trainer again.

        Raises
        ------
        UploadInProgressError
            When the owner may still be working, or won a takeover race.
        """
        lock_key = keys.upload_lock(data_key, etag, version_id)
        if self._write_lock(lock_key, run_id, IfNoneMatch="*"):
            return UploadClaim(run_id=run_id, owned=True)

        response = self.s3.get_object(Bucket=self.bucket, Key=lock_key)
        lock = json.loads(response["Body"].read())
        record = self.get_run(lock["run_id"])
        start_failed = (
            record is not None
            and record.status == RunStatus.FAILED
            and not record.trainer_instance_id
        )
        if (
            record is not None
            and not start_failed
            and (record.trainer_instance_id or record.status != RunStatus.TRAINING)
        ):
            return UploadClaim(run_id=lock["run_id"], owned=False)

        created = datetime.datetime.fromisoformat(
            lock["created_at"].replace("Z", "+00:00")
        )
        age = (datetime.datetime.now(datetime.UTC) - created).total_seconds()
        if age < stale_after and not start_failed:
            raise UploadInProgressError(
                f"Run {lock['run_id']} for {data_key} started {age:.0f} s ago and has "
                "no trainer yet; retry once its invocation ends."
            )
        if not self._write_lock(lock_key, lock["run_id"], IfMatch=response["ETag"]):
            raise UploadInProgressError(
                f"Another invocation took over run {lock['run_id']} for {data_key}."
            )

        return UploadClaim(run_id=lock["run_id"], owned=True)

    def _keys_under(self, prefix: str) -> list[str]:
        """Return every key under ``prefix``, sorted."""
        paginator = self.s3.get_paginator("list_objects_v2")
        found = [
            item["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        ]

        return sorted(found)

    def get_run(self, run_id: str) -> RunRecord | None:
        return self._get(RunRecord, keys.run_record(run_id))

    def put_run(self, record: RunRecord) -> None:
        self._put(keys.run_record(record.run_id), record)

    def list_runs(self) -> list[RunRecord]:
        """Return every valid run record, oldest first (run ids start with the time).

        A malformed record is skipped with a warning, so one bad document
        cannot hide every other run.
        """
        records = []
        for key in self._keys_under(keys.RUNS_PREFIX):
            try:
                record = self._get(RunRecord, key)
            except InvalidRecordError as exc:
                logger.warning("Skipping malformed run record %s: %s", key, exc)
                continue
            if record is not None:
                records.append(record)

        return records

    def get_train_meta(self, run_id: str) -> TrainMeta | None:
        return self._get(TrainMeta, keys.train_meta(run_id))

    def put_train_meta(self, meta: TrainMeta) -> None:
        self._put(keys.train_meta(meta.run_id), meta)

    def get_progress(self, run_id: str) -> TrainingProgress | None:
        return self._get(TrainingProgress, keys.progress(run_id))

    def put_progress(self, progress: TrainingProgress) -> None:
        self._put(keys.progress(progress.run_id), progress)

    def get_checkpoint(self, run_id: str) -> TrainingCheckpoint | None:
        return self._get(TrainingCheckpoint, keys.checkpoint_state(run_id))

    def put_checkpoint(self, checkpoint: TrainingCheckpoint) -> None:
        self._put(keys.checkpoint_state(checkpoint.run_id), checkpoint)

    def get_serving(self) -> ServingPointer | None:
        return self._get(ServingPointer, keys.SERVING_CURRENT)

    def put_serving(self, pointer: ServingPointer) -> None:
        self._put(keys.SERVING_CURRENT, pointer)

    def put_serving_history(self, pointer: ServingPointer) -> None:
        recorded_at = datetime.datetime.now(datetime.UTC)
        self._put(keys.serving_history(recorded_at, pointer.model_version), pointer)

    def list_serving_history(self) -> list[ServingPointer]:
        """Return every version that served, oldest first."""
        entries = [
            self._get(ServingPointer, key)
            for key in self._keys_under(keys.SERVING_HISTORY_PREFIX)
        ]

        return [entry for entry in entries if entry is not None]

    def get_rollback_request(self, key: str) -> RollbackRequest | None:
        return self._get(RollbackRequest, key)

    def put_rollback_request(self, request: RollbackRequest) -> None:
        self._put(keys.serving_request(request.requested_at), request)

    def get_server_ready(self, key: str) -> ServerReady | None:
        return self._get(ServerReady, key)

    def put_server_ready(self, ready: ServerReady) -> None:
        self._put(keys.server_ready(ready.instance_id), ready)
