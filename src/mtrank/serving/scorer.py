"""Batch scoring over a trained run's artifact directory."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtrank.data.pipeline import encode_for_scoring
from mtrank.errors import DataError
from mtrank.training.evaluation import predict
from mtrank.training.run import LoadedRun, load_run

logger = logging.getLogger(__name__)


class Scorer:
    """Score rows with a trained ranker; one named output per task.

    Position is never read: at serving time the shallow tower receives the missing position and the
    device, as the ranker does in eval mode.
    """

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self.task_names = run.config.task_names()
        self.loss_kinds = [t.loss or "bce" for t in run.config.tasks]

    @classmethod
    def from_run(cls, run_dir: str | Path, *, peft: str | Path | None = None) -> Scorer:
        """Load a scorer from a run directory, optionally with a fine-tuned PEFT set.

        Args:
            run_dir: the run folder.
            peft: a PEFT set name under ``RUN/peft/`` or a set folder; its new tasks become extra
                output columns after the base tasks.
        """
        return cls(load_run(Path(run_dir), peft=peft))

    def score_path(self, path: str, *, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
        """Score a file; return ``(row_ids, predictions (N, T))``; invalid rows are skipped and logged."""
        data, _skipped = encode_for_scoring(self.run.encoders, self.run.config.data, path, with_labels=False)
        return data.row_ids, predict(self.run.model, data, self.loss_kinds, batch_size)

    def score_file(self, path: str, out: Path, *, batch_size: int = 8192) -> int:
        """Score ``path`` and write ``row`` plus one column per task to ``out`` (.csv or .parquet).

        Returns:
            The number of rows written.
        """
        suffix = out.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise DataError(f"--out {out}: use a .csv or .parquet file name")
        rows, predictions = self.score_path(path, batch_size=batch_size)
        if len(rows) == 0:
            raise DataError(
                f"{path}: no row could be scored (all were invalid or the file is empty); see the log"
            )
        columns = {"row": pa.array(rows)}
        for t, name in enumerate(self.task_names):
            columns[name] = pa.array(predictions[:, t])
        table = pa.table(columns)
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            pq.write_table(table, out)
        else:
            pacsv.write_csv(table, out)
        logger.info("wrote %d predictions to %s", table.num_rows, out)
        return table.num_rows
