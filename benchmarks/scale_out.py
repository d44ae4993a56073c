"""Rows/s of one packed model on one file, on each engine: `bibert predict --file` (1 and 2
kernel threads), Ray Data with 1 and 2 actors (1 thread each) and Spark local[2]; start-up
stated apart from the steady rate.

    python benchmarks/scale_out.py                  # minilm shape, 20000 rows
    python benchmarks/scale_out.py --rows 5000 --engines file,ray

Model: a MiniLM-shaped packed 1-1-1 model with random weights (benchmarks/
batch_predict_throughput.py's build_model; throughput does not depend on the weights), 2
labels, the offline teacher's WordPiece tokenizer. Rows: Rotten Tomatoes snippets, one to
four per row (mixed lengths), written once to a CSV that every engine reads.

What each number is:
  predict --file   start-up: loading the packed model; steady: rows / the rest (read,
                   tokenize, run, write the CSV), FileSummary.seconds.
  Ray              each actor count runs twice, on the file's first tenth and on the whole
                   file (actors started anew each time), the driver writing the batches to
                   a parquet file as `bibert predict --ray` does; steady: the extra rows /
                   the extra time, so that the actors' start and model load cancel out (the
                   rows after the first batch over the time after it overstate the rate with
                   2 actors: the first batch arrives when both have worked for a while);
                   start-up: ray.init plus the short run's time less its rows at that rate.
  Spark            start-up: the session (JVM) plus the first job's extra time over the second
                   (Python workers start and load the model); steady: rows / the second job's
                   time. Each job reads the CSV (spark.read.csv, every column a string) and
                   writes the id and predictions as parquet, as a user's job would: nothing
                   is cached between the jobs.
Writes benchmarks/results/scale_out.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_predict_throughput import build_model, mixed_texts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_file(model: Path, src: Path, threads: int) -> dict:
    from bibert.packed import load_packed
    from bibert.serving import predict_file

    t = time.perf_counter()
    engine = load_packed(model, threads=threads)
    load = time.perf_counter() - t
    out = src.with_name(f"out_t{threads}.csv")
    summary = predict_file(engine, src, out, "text", progress=False, threads=threads, overwrite=True)
    return {"engine": f"predict --file, {threads} thread{'s' if threads > 1 else ''}", "startup_s": load,
            "steady_rows_per_s": summary.new_rows / summary.seconds, "rows": summary.new_rows,
            "total_s": load + summary.seconds}


def run_ray(model: Path, src: Path, actors: int, init_s: float) -> dict:
    import ray

    from bibert.integrations import check_model
    from bibert.integrations.ray import _map, read_dataset

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = 1 << 20
    info = check_model(model)
    ds = read_dataset([str(src)], "csv", 512)
    scored = _map(ds, info, workers=actors, batch_size=512, threads_per_worker=1, text_columns="text",
                  max_length=None, forward_batch=32, kernel=None, cpus=2)
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    first = first_rows = writer = None
    rows = 0
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
        if first is None:
            first, first_rows = time.perf_counter(), batch.num_rows
            writer = pq.ParquetWriter(src.with_name(f"ray_{actors}.parquet"), batch.schema)
        writer.write_table(batch.cast(writer.schema))
    writer.close()
    end = time.perf_counter()
    return {"engine": f"Ray Data, {actors} actor{'s' if actors > 1 else ''} x 1 thread", "startup_s": init_s + first - t0,
            "steady_rows_per_s": (rows - first_rows) / (end - first), "rows": rows, "total_s": end - t0,
            "first_batch_s": first - t0, "ray_init_s": init_s}


def run_spark(model: Path, src: Path, rows: int) -> list[dict]:
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from pyspark.sql import SparkSession

    from bibert.integrations.spark import predict_udf

    t = time.perf_counter()
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", "2g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    session_s = time.perf_counter() - t
    times = []
    out = src.with_name("spark_out")
    for _ in range(2):
        udf = predict_udf(model, batch_size=512)
        t = time.perf_counter()
        df = (spark.read.option("header", True).option("multiLine", True).option("escape", '"').csv(str(src))
              .repartition(2))
        df.withColumn("pred", udf("text")).select("id", "pred.*").write.mode("overwrite").parquet(str(out))
        times.append(time.perf_counter() - t)
    n = spark.read.parquet(str(out)).count()
    spark.stop()
    if n != rows:
        raise SystemExit(f"Spark wrote {n} rows of the file's {rows}: the CSV was read differently")
    return [{"engine": "Spark local[2], predict_batch_udf", "startup_s": session_s + times[0] - times[1],
             "steady_rows_per_s": n / times[1], "rows": n, "total_s": times[0], "session_s": session_s,
             "first_job_s": times[0], "second_job_s": times[1]}]


def write_rows(path: Path, texts: list[str]) -> Path:
    """The CSV every engine reads: an id and a text per row."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows((f"r{i}", t) for i, t in enumerate(texts))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--engines", default="file,ray,spark")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from bibert.packed.tuning import cpu_model

    engines = args.engines.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model("minilm", tmp)
        texts, source = mixed_texts(args.rows)
        src = write_rows(tmp / "rows.csv", texts)
        load_before = os.getloadavg()
        if "file" in engines:
            for threads in (1, 2):
                results.append(run_file(model, src, threads))
                print(results[-1], flush=True)
        if "ray" in engines:
            import ray

            t = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            init_s = time.perf_counter() - t
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            small = write_rows(tmp / "rows_small.csv", texts[:len(texts) // 10])  # start-up, differenced out
            for actors in (1, 2):
                short, full = run_ray(model, small, actors, init_s), run_ray(model, src, actors, init_s)
                # steady: the extra rows over the extra time of the whole file against its first tenth
                # (each run starts its actors anew, so start-up cancels); start-up: what is left
                steady = (full["rows"] - short["rows"]) / (full["total_s"] - short["total_s"])
                full.update(steady_rows_per_s=steady, first_batch_steady_rows_per_s=full["steady_rows_per_s"],
                            startup_s=init_s + short["total_s"] - short["rows"] / steady, short_run=short)
                results.append(full)
                print(results[-1], flush=True)
            ray.shutdown()
        if "spark" in engines:
            results += run_spark(model, src, len(texts))
            print(results[-1], flush=True)
        load_after = os.getloadavg()
    by = {r["engine"]: r for r in results}
    file2 = by.get("predict --file, 2 threads", {}).get("steady_rows_per_s")
    for r in results:
        r["vs_file_2_threads"] = r["steady_rows_per_s"] / file2 if file2 else None
    ray1 = by.get("Ray Data, 1 actor x 1 thread", {}).get("steady_rows_per_s")
    ray2 = by.get("Ray Data, 2 actors x 1 thread", {}).get("steady_rows_per_s")
    report = {"cpu": cpu_model(), "cpus": os.cpu_count(), "rows": args.rows, "texts": source, "model": "minilm 1-1-1",
              "load_average_before": load_before, "load_average_after": load_after, "results": results,
              "ray_2_over_1_actor": ray2 / ray1 if ray1 and ray2 else None}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale_out.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Scale-out: one packed model, one file, each engine\n",
             f"CPU: {report['cpu']} ({report['cpus']} cores, shared: load average {load_before[0]:.1f} before, "
             f"{load_after[0]:.1f} after). Model: MiniLM shape (6 x 384), 1-1-1, random weights. Rows: {args.rows} "
             f"({source}, one to four per row). `python benchmarks/scale_out.py`.\n",
             "| engine | start-up (s) | steady rows/s | vs predict --file, 2 threads | total (s) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        vs = f"{r['vs_file_2_threads']:.2f}x" if r["vs_file_2_threads"] else "-"
        lines.append(f"| {r['engine']} | {r['startup_s']:.1f} | {r['steady_rows_per_s']:.0f} | {vs} | "
                     f"{r['total_s']:.1f} |")
    if report["ray_2_over_1_actor"]:
        r1, r2 = by["Ray Data, 1 actor x 1 thread"], by["Ray Data, 2 actors x 1 thread"]
        lines.append(f"\nRay, 2 actors over 1 actor: steady {report['ray_2_over_1_actor']:.2f}x; whole runs, start-up "
                     f"included: {r1['total_s']:.1f} s against {r2['total_s']:.1f} s ({r1['total_s'] / r2['total_s']:.2f}x).")
    (RESULTS / "scale_out.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
