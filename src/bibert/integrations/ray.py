"""Score a Ray Dataset with a packed model (pip install 'bibert[ray]'):

    import ray, bibert.integrations.ray as bray
    ds = ray.data.read_parquet("s3://bucket/reviews/")
    scored = bray.predict(ds, "model.bibert", workers=8, text_columns="review")
    scored.write_parquet("s3://bucket/scored/")

`predict` checks the model and the columns on the driver, then maps the dataset's batches
(as pandas DataFrames) through an actor pool: each actor holds one packed model, loaded once
in the actor, and runs its kernels on `threads_per_worker` threads, so that workers x threads
fits the cluster's CPUs. Each batch gains `pred_label` and one `prob_<label>` per class
(`pred_value` for a regression model), the very values `bibert predict --file` writes.
`bibert predict --file IN --out OUT.parquet --ray [ADDRESS]` is the same from the command line.
"""
from __future__ import annotations

import logging
import os
import time

from ..errors import BibertError
from ..serving.predictor import BatchPredictor
from . import check_columns, check_model, clear_error, positive, text_columns_of  # noqa: F401


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BibertError(f"scoring on Ray needs Ray Data ({exc.name} is missing): pip install 'bibert[ray]'") from None
    return ray


class RayPredictor(BatchPredictor):
    """The actor's callable: a BatchPredictor that loads its model when the actor starts, so
    that a worker that cannot load it fails at once, with a message naming the host."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            self.engine
        except BibertError as exc:
            raise BibertError(f"a Ray worker on {os.uname().nodename} could not load the packed model: {exc}") from None
        except Exception as exc:  # an OSError, a missing native library: one line, not a traceback
            raise BibertError(f"a Ray worker on {os.uname().nodename} could not load the packed model "
                              f"{self.model}: {type(exc).__name__}: {exc}") from None


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (starting a local one if none)."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))


def plan(cpus: int, workers: int | None, threads_per_worker: int | None) -> tuple[int, int]:
    """(actors, kernel threads per actor): by default one actor per CPU with one thread each;
    given one of the two, the other fills the CPUs; actors x threads never exceeds them."""
    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if value is not None:
            positive(name, value)
    if workers is None:
        threads = threads_per_worker or 1
        workers = max(1, cpus // threads)
    else:
        threads = threads_per_worker or max(1, cpus // workers)
    if workers * threads > cpus:
        raise BibertError(f"{workers} workers x {threads} threads need {workers * threads} CPUs and the Ray cluster "
                          f"has {cpus}: give fewer workers or threads_per_worker")
    return workers, threads


def predict(dataset, model, *, workers: int | None = None, batch_size: int = 1024,
            threads_per_worker: int | None = None, text_columns="text", max_length: int | None = None,
            forward_batch: int = 32, kernel: str | None = None):
    """`dataset` (a ray.data.Dataset) with the prediction columns added after its own: a lazy
    Dataset, run when consumed (write_parquet, iter_batches, take...).

    model: a packed model (file, save_pretrained folder or Hub repo id), checked here on the
    driver; the workers read the resolved file, so on a cluster it must be at the same path
    on every node (a shared file system). workers: actors, each with one model (default: the
    cluster's CPUs / threads_per_worker); threads_per_worker: kernel threads per actor
    (default: the CPUs / workers, at least 1); batch_size: rows per batch handed to an actor;
    text_columns: the text column, or the text and pair columns; max_length: tokens per input
    (default: the model's positions); forward_batch: most texts per forward (rows are sorted
    by length within a batch; results do not depend on it).

    Each actor reserves its threads' CPUs, so with workers x threads equal to the cluster's
    CPUs the tasks that read the data need none: read with `num_cpus=0` (as
    `bibert predict --ray` does), or leave a CPU free. An actor gets whole blocks: split a
    large file's few blocks with `dataset.repartition(target_num_rows_per_block=batch_size)`
    so that every actor has work."""
    info = check_model(model)
    return _map(dataset, info, workers=workers, batch_size=batch_size, threads_per_worker=threads_per_worker,
                text_columns=text_columns, max_length=max_length, forward_batch=forward_batch, kernel=kernel)


def _map(dataset, info, *, workers, batch_size, threads_per_worker, text_columns, max_length, forward_batch,
         kernel, cpus: int | None = None):
    ray = _ray()
    columns = text_columns_of(text_columns)
    positive("batch_size", batch_size)
    positive("forward_batch", forward_batch)
    schema = dataset.schema(fetch_if_missing=False)  # known without running the dataset, or checked by the workers
    if schema is not None:
        check_columns(list(schema.names), columns, "the dataset")
        clash = [c for c in info.prediction_columns if c in schema.names]
        if clash:
            raise BibertError(f"the dataset already has column(s) {', '.join(map(repr, clash))}, which the "
                              "predictions would overwrite; rename them")
    actors, threads = plan(cpus or cluster_cpus(), workers, threads_per_worker)
    return dataset.map_batches(
        RayPredictor,
        fn_constructor_kwargs=dict(model=info.path, threads=threads, max_length=max_length, text_columns=columns,
                                   batch_size=forward_batch, kernel=kernel),
        batch_size=batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads, zero_copy_batch=True)


# ---- the command line: bibert predict --file IN --out OUT.parquet --ray [ADDRESS] -------------


def input_files(spec: str) -> tuple[list[str], str]:
    """The files behind IN (a file, a folder or a glob) and their one format."""
    import glob

    from ..tables import INPUT_FORMATS

    if os.path.isdir(spec):
        found = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(spec) for f in fs
                       if os.path.splitext(f)[1].lower() in INPUT_FORMATS and not f.startswith((".", "_")))
        if not found:
            raise BibertError(f"the folder {spec} holds no .csv, .tsv, .jsonl or .parquet file")
    elif any(ch in spec for ch in "*?["):
        found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise BibertError(f"no file matches {spec}")
    else:
        from ..tables import TableReader

        TableReader(__import__("pathlib").Path(spec))  # the reader's own message for a missing or odd file
        found = [spec]
    formats = {INPUT_FORMATS.get(os.path.splitext(p)[1].lower()) for p in found}
    if None in formats:
        bad = next(p for p in found if os.path.splitext(p)[1].lower() not in INPUT_FORMATS)
        raise BibertError(f"{bad}: unsupported input format; give .csv, .tsv, .jsonl or .parquet files")
    if len(formats) > 1:
        raise BibertError(f"{spec} mixes formats ({', '.join(sorted(formats))}): score one format at a time")
    return found, formats.pop()


def read_dataset(files: list[str], fmt: str = "", rows_per_block: int = 1024):
    """A Ray Dataset of the files' rows, read as `bibert predict --file` reads them (its own
    reader, bibert.tables: CSV/TSV cells as text, JSONL values as parsed), one task per file
    that streams blocks of `rows_per_block` rows. The read tasks reserve no CPU, so an actor
    pool that fills the CPUs cannot starve them."""
    ray = _ray()
    items = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return items.map_batches(_read_files, fn_kwargs={"rows": rows_per_block}, batch_size=1, batch_format="pandas",
                             num_cpus=0)


def _read_files(batch, rows: int):
    import pandas as pd
    from pathlib import Path

    from ..tables import TableReader

    for path in batch["path"]:
        reader = TableReader(Path(path))
        columns = list(reader.columns) if reader.format != "jsonl" else None
        chunk = []
        for row in reader.rows(0, None):
            chunk.append(row.values)
            if len(chunk) == rows:
                yield pd.DataFrame(chunk, columns=columns)
                chunk = []
        if chunk:
            yield pd.DataFrame(chunk, columns=columns)


def predict_files(model, spec: str, out: str, text_column: str, pair_column: str | None = None,
                  id_column: str | None = None, *, address: str | None = None, workers: int | None = None,
                  threads: int | None = None, batch_size: int = 32, max_length: int | None = None,
                  overwrite: bool = False, progress: bool = True, kernel: str | None = None,
                  rows_per_batch: int = 1024) -> str:
    """Score every row of IN (a file, folder or glob) on Ray into OUT.parquet, in input order.
    Returns the summary line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not out.lower().endswith(".parquet"):
        raise BibertError(f"{out}: with --ray the output is parquet; name it OUT.parquet")
    if os.path.isdir(out):
        raise BibertError(f"the output {out} is a folder; give a file name, e.g. {os.path.join(out, 'scored.parquet')}")
    if os.path.exists(out) and not overwrite:
        raise BibertError(f"{out} exists: pass --overwrite to replace it (--resume is not available with --ray)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise BibertError(f"the output's folder {parent} does not exist; create it first")
    files, fmt = input_files(spec)
    if any(os.path.exists(out) and os.path.samefile(out, f) for f in files):
        raise BibertError(f"the output {out} is an input file; write the predictions to another file")
    info = check_model(model)

    ray = _ray()
    start = time.perf_counter()
    if not ray.is_initialized():
        connect(ray, address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # OUT in input order, as predict --file writes it
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    cpus = cluster_cpus()
    actors, per_actor = plan(cpus, workers, threads)
    ctx.target_max_block_size = 1 << 20  # a block per read chunk: every actor has work, even from one file
    ds = read_dataset(files, fmt, rows_per_batch)
    text_columns = [text_column] + ([pair_column] if pair_column else [])
    check_columns(_columns(files[0], fmt), text_columns + ([id_column] if id_column else []), files[0])
    if id_column:
        ds = ds.select_columns(list(dict.fromkeys([id_column] + text_columns)))
    scored = _map(ds, info, workers=actors, threads_per_worker=per_actor, text_columns=text_columns,
                  max_length=max_length, batch_size=rows_per_batch, forward_batch=batch_size, kernel=kernel,
                  cpus=cpus)
    if id_column:
        scored = scored.select_columns([id_column] + info.prediction_columns)
    tmp = out + ".partial"
    rows, writer, first = 0, None, None
    quiet = logging.getLogger("ray")  # a failure is reported once, below, not as the workers' tracebacks too
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        for table in scored.iter_batches(batch_format="pyarrow", batch_size=None):
            if first is None:
                first = time.perf_counter()
            if writer is None:
                schema_out = table.schema
                writer = pq.ParquetWriter(tmp, schema_out)
            elif table.schema != schema_out:
                table = table.cast(schema_out)
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:  # no rows: an empty file with the prediction columns
            writer = pq.ParquetWriter(tmp, pa.schema([(c, pa.string() if c == "pred_label" else pa.float64())
                                                      for c in info.prediction_columns]))
        writer.close()
        writer = None
        os.replace(tmp, out)
    except Exception as exc:
        err = clear_error(exc)
        if err is not None:
            raise err from None
        raise
    finally:
        quiet.setLevel(level)
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    seconds = time.perf_counter() - start
    return (f"wrote {rows} rows to {out} in {seconds:.1f} s ({rows / seconds if seconds else 0:.1f} rows/s) on Ray: "
            f"{actors} workers x {per_actor} threads of {cpus} CPUs, {len(files)} input file(s); first rows after "
            f"{(first or time.perf_counter()) - start:.1f} s")


def connect(ray, address: str | None) -> None:
    """Start a local Ray (no address) or join the cluster at `address`, with one clear error
    where it cannot be reached."""
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.init(address=address or None, **kwargs)
    except (ConnectionError, RuntimeError) as exc:  # ray raises these for an address it cannot reach or join
        if not address:
            raise BibertError(f"could not start a local Ray: {str(exc).splitlines()[0]}") from None
        auth = "authentication" in str(exc).lower() or "auth_token" in str(exc).lower()
        hint = ("the cluster asks for a token: set RAY_AUTH_MODE=token with the head's token in ~/.ray/auth_token "
                "or RAY_AUTH_TOKEN" if auth else
                "give the head's address as `ray start --head` printed it (HOST:PORT, the node's IP rather than "
                "127.0.0.1) and check that the cluster is up (`ray status` on the head)")
        raise BibertError(f"could not connect to the Ray cluster at {address}: {hint}") from None


def _columns(path: str, fmt: str) -> list[str]:
    """The columns of an input file, read on the driver (JSONL: the first object's keys)."""
    from pathlib import Path

    from ..tables import TableReader

    return list(TableReader(Path(path)).columns)
