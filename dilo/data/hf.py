"""Reading local dataset files with the Hugging Face `datasets` library (the hf corpus and
`dilo data prepare`).

    columns = load_columns("train.jsonl", "auto", {"text": "data.text_field"})   # {"text": [...]}

The loader comes from `data.format` or the extension: .jsonl/.json/.ndjson -> json, .parquet,
.arrow, .csv, anything else text (one document per file). datasets writes an Arrow cache while it
loads; it goes to a temporary directory that is deleted once the columns are in memory, so nothing
stays on disk, and the hub is never asked (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE default to 1).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from dilo.errors import DataError

_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
}


def loader_for(path: str, fmt: str) -> str:
    """The datasets builder for `path`: `fmt` unless it is "auto", else by extension."""
    return _BY_SUFFIX.get(Path(path).suffix.lower(), "text") if fmt == "auto" else fmt


def load_columns(path: str, fmt: str, fields: dict[str, str]) -> dict[str, list[Any]]:
    """The columns `fields` names (column -> the setting that names it, for errors) of one local
    file, as Python lists; a missing column raises DataError naming it, the setting and the
    columns the file has."""
    builder = loader_for(path, fmt)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the hf extra is missing
        raise DataError("data.corpus='hf' needs the datasets package: pip install 'dilo[hf]'") from e
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    extra: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
    with tempfile.TemporaryDirectory(prefix="dilo-datasets-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=[path], split="train", cache_dir=cache, **extra)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the message is what matters
            raise DataError(f"{path}: the datasets {builder!r} loader could not read it ({e}); set data.format") from e
        names = list(ds.column_names)
        for f, which in fields.items():
            if f not in names:
                raise DataError(
                    f"{path}: has no column {f!r} ({which}); its columns are {names}: set {which} to one of them"
                )
        out = {f: list(ds[f]) for f in fields}
        del ds
    return out
