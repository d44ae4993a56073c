"""`bibert export` (student folder -> packed 1-bit file), `bibert predict` (packed file ->
labels, for texts or a whole file) and `bibert serve` (packed file behind HTTP)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

PREVIEW = 60  # characters of each text shown beside its prediction


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the packed model of a BiBERT student (1-bit weights)",
        description="Pack a student folder with 1-bit weights and embeddings (bits 1-1-1, or 1-1-2 / 1-1-4 with "
        "k-bit activations; attention bi, or bi-max of Elastic BiBERT) into one file: sign bits for every "
        "binarized weight and the word embedding, per-row scales, full-precision side parameters, config, "
        "tokenizer, format version and SHA-256 checksum (docs/packed_format.md). Refuses a student whose folder "
        "differs from its manifest or whose weights hold NaN or Inf. Prints the size against the student's "
        "fp32 safetensors.",
    )
    p.add_argument("--model", required=True, metavar="STUDENT_DIR", help="folder written by save_pretrained")
    p.add_argument("--out", required=True, metavar="PATH", help="packed file to write (e.g. model.bibert)")
    p.add_argument("--side-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the full-precision parts and scales: float32 computes exactly what the "
                   "student computes; float16 is smaller (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer files from DIR instead of STUDENT_DIR")
    hub = p.add_argument_group("sharing (docs/serving.md, \"The Hugging Face Hub\")")
    hub.add_argument("--save-pretrained", metavar="DIR", help="also write DIR as a Hub repository folder: the "
                     "packed file, config.json and a model card with the run's task, teacher, scores and the "
                     "speed measured here; `bibert predict --model DIR` reads it")
    hub.add_argument("--push-to-hub", metavar="REPO", help="also upload that folder to the Hugging Face Hub repo "
                     "REPO (user/name, created if missing; needs `hf auth login` or HF_TOKEN, and huggingface_hub)")
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser(
        "predict",
        help="classify texts with a packed model on the bitwise engine",
        description="Run a packed model (bibert export) with the native XOR/popcount kernels, on texts given "
        "here (prints one line per text: label and class scores) or on every row of a file (--file, --out): "
        "streamed in constant memory, run in batches of similar length, written in input order with the "
        "label and class probabilities, resumable (--resume).",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="packed model file")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text(s) to classify")
    p.add_argument("--pair", action="append", metavar="TEXT",
                   help="second segment of a sentence pair; give one --pair per TEXT")
    p.add_argument("--threads", type=int, help="kernel threads (default: BIBERT_THREADS or all cores)")
    p.add_argument("--kernel", choices=["auto", "avx512", "avx2", "portable"],
                   help="force a kernel family (default: BIBERT_KERNEL or auto)")
    p.add_argument("--max-length", type=int, help="truncate inputs to this many tokens")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    f = p.add_argument_group("a whole file")
    f.add_argument("--file", metavar="IN", help="input rows: .csv, .tsv, .jsonl or .parquet")
    f.add_argument("--text-column", metavar="C", help="column of IN holding the text")
    f.add_argument("--text-pair-column", metavar="C2", help="column holding the second segment of a pair")
    f.add_argument("--id-column", metavar="ID", help="write only this column of IN before the predictions "
                   "(default: every column of IN)")
    f.add_argument("--out", metavar="OUT", help="output file, .csv or .jsonl: the input's columns (or the id), "
                   "pred_label and prob_<label> per class (pred_value for regression)")
    mode = f.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an OUT left by an interrupted run (checked "
                      "to come from the same input, model and options)")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    f.add_argument("--batch-size", type=int, default=32, help="texts per forward (default: %(default)s)")
    f.add_argument("--window", type=int, default=2048, help="rows sorted by length together, then written in "
                   "input order; memory grows with it (default: %(default)s)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("past one process (docs/serving.md, \"Ray Data\")")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="score on Ray Data (pip install "
                   "'bibert[ray]'): IN may then be a file, a folder or a glob of .csv/.tsv/.jsonl/.parquet files, "
                   "and OUT is one .parquet file in input order; ADDRESS is a running cluster's (e.g. auto, "
                   "ray://head:10001), without it a local Ray starts on this machine's CPUs")
    r.add_argument("--workers", type=int, help="with --ray: actors, each holding one model (default: the "
                   "cluster's CPUs / --threads)")
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser(
        "serve",
        help="serve a packed model over HTTP (needs the serve extra)",
        description="HTTP server for a packed model (Starlette + uvicorn; pip install 'bibert[serve]'). "
        "GET /health: model name, labels, kernel. POST /predict with {\"texts\": [...], \"pairs\": [...]} "
        "(pairs optional): {\"labels\": [...], \"scores\": [[...], ...]} in input order. Concurrent requests "
        "are batched together on one engine thread per process; SIGTERM finishes the requests in flight.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="packed model file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--workers", type=int, default=1, help="processes, forked after the model is loaded and "
                   "sharing it (default: %(default)s)")
    p.add_argument("--threads", type=int, help="kernel threads per process (default: BIBERT_THREADS, else the "
                   "cores divided among the workers)")
    p.add_argument("--kernel", choices=["auto", "avx512", "avx2", "portable"],
                   help="force a kernel family (default: BIBERT_KERNEL or auto)")
    p.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default: the model's "
                   "positions)")
    p.add_argument("--max-batch", type=int, default=64, help="most texts run together (default: %(default)s); "
                   "1 turns batching of concurrent requests off")
    p.add_argument("--batch-window-ms", type=float, default=1.0, help="how long a batch waits for more requests "
                   "when the engine is idle (default: %(default)s)")
    p.add_argument("--max-texts", type=int, default=256, help="most texts in one request; more: 413 "
                   "(default: %(default)s)")
    p.add_argument("--max-text-chars", type=int, default=100_000, help="most characters per text, checked before "
                   "tokenizing; more: 413 (default: %(default)s)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="largest request body in KiB; larger: 413 "
                   "(default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body; slower: "
                   "408 (default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to receive a request's line and "
                   "headers, from the connection's start or the previous response; slower: 408, or closed if "
                   "nothing came (default: %(default)s)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle connection stays open "
                   "after a response (default: %(default)s)")
    p.add_argument("--max-header-kb", type=int, default=64, help="largest request line and headers in KiB; "
                   "larger: 431 (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=1000, help="open connections per worker; more: 503 "
                   "(default: %(default)s)")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in "
                   "flight; those left are answered 503 (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=run_serve)


def run_export(args: argparse.Namespace) -> int:
    from ..errors import BibertError
    from ..packed import export_packed

    if args.private and not args.push_to_hub:
        raise BibertError("--private applies to --push-to-hub only: add --push-to-hub REPO, or leave --private out")
    report = export_packed(args.model, args.out, side_dtype=args.side_dtype, tokenizer_dir=args.tokenizer)
    print(report)
    if args.save_pretrained or args.push_to_hub:
        from .. import hub
        from ..packed import load_packed

        model, info = load_packed(args.out), hub.provenance(args.model)
        if args.save_pretrained:
            print(f"wrote {hub.save_pretrained(model, args.save_pretrained, info=info, repo_id=args.push_to_hub)}: "
                  f"{hub.MODEL_FILE}, {hub.CONFIG_FILE}, {hub.CARD_FILE}")
        if args.push_to_hub:
            print(f"uploaded to {hub.push_to_hub(model, args.push_to_hub, info=info, private=args.private or None)}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from ..errors import BibertError
    from ..packed import load_packed

    if args.file or args.out:
        if args.texts or args.pair or args.json:
            raise BibertError("give texts to classify, or --file IN --out OUT, not both (--pair and --json are "
                              "for texts)")
        missing = [flag for flag, v in (("--file", args.file), ("--out", args.out),
                                        ("--text-column", args.text_column)) if not v]
        if missing:
            raise BibertError(f"a file prediction needs {' and '.join(missing)}")
        if args.ray is not None:
            return _predict_on_ray(args)
        if args.workers is not None:
            raise BibertError("--workers applies to --ray only: add --ray, or set --threads")
        from ..serving import predict_file

        summary = predict_file(args.model, args.file, args.out, args.text_column, args.text_pair_column,
                               args.id_column, batch_size=args.batch_size, window=args.window,
                               max_length=args.max_length, resume=args.resume, overwrite=args.overwrite,
                               progress=not args.no_progress, threads=args.threads, kernel=args.kernel)
        print(summary)
        return 0
    if not args.texts:
        raise BibertError("give text(s) to classify, or --file IN --text-column C --out OUT")
    model = load_packed(args.model, threads=args.threads, kernel=args.kernel)
    pred = model.predict(args.texts, pairs=args.pair, max_length=args.max_length)
    rows = []
    for text, label, score in zip(args.texts, pred.labels, pred.scores):
        scores = {model.labels[i]: float(s) for i, s in enumerate(score)} if score.ndim else {"value": float(score)}
        rows.append({"text": text, "label": label, "scores": scores})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:  # one text: its label and scores; several: each line names its text, shortened
            line = f"{r['label']}\t" + " ".join(f"{k}={v:.4f}" for k, v in r["scores"].items())
            text = r["text"] if len(r["text"]) <= PREVIEW else r["text"][:PREVIEW - 3] + "..."
            print(line + (f"\t{text}" if len(rows) > 1 else ""))
    return 0


def _predict_on_ray(args: argparse.Namespace) -> int:
    from ..errors import BibertError

    if args.resume:
        raise BibertError("--resume is not available with --ray: score into a new OUT.parquet (or --overwrite)")
    from ..integrations.ray import predict_files

    print(predict_files(args.model, args.file, args.out, args.text_column, args.text_pair_column, args.id_column,
                        address=args.ray or None, workers=args.workers, threads=args.threads,
                        batch_size=args.batch_size, max_length=args.max_length, overwrite=args.overwrite,
                        progress=not args.no_progress, kernel=args.kernel))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from ..errors import BibertError

    try:
        from ..serving.server import ConnectionLimits, ServeSettings, serve
    except ImportError as exc:
        raise BibertError(f"bibert serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'bibert[serve]'") from None
    settings = ServeSettings(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                             max_texts=args.max_texts, max_text_chars=args.max_text_chars,
                             max_body_bytes=args.max_body_kb * 1024, body_timeout_s=args.body_timeout,
                             max_length=args.max_length)
    limits = ConnectionLimits(header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                              max_head_bytes=args.max_header_kb * 1024, max_connections=args.max_connections)
    code = serve(args.model, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
                 kernel=args.kernel, settings=settings, graceful_timeout=args.graceful_timeout,
                 log_level=args.log_level, access_log=args.access_log, limits=limits)
    # every request is answered: end now, without the interpreter's teardown of torch and
    # transformers, which takes seconds on a busy machine (shutdown stays within --graceful-timeout)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
