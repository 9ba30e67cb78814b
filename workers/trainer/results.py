"""A job's result file: its per-step metrics as CSV, in OpenAI's column names (`result_files` of the job,
read with `GET /v1/files/{id}/content`). Empty cells where a metric was not measured at that step."""

from __future__ import annotations

import csv
import io

COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
_SOURCE = {"train_accuracy": "train_mean_token_accuracy"}  # CSV column → history key, where they differ


def metrics_csv(history: list[dict]) -> bytes:
    """history: TrainingResult.history rows → CSV bytes with a header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in history:
        values = (row.get(_SOURCE.get(c, c)) for c in COLUMNS)
        writer.writerow("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in values)
    return out.getvalue().encode()
