"""Accuracy against training time: how far a 1-1-1 student gets in a given number of CPU minutes.

The study (benchmarks/study.py) compares rows at one small budget (about 650 steps). This
script asks the question a user has: given N minutes of student training on this machine,
which recipe is most accurate? Each run is a `bibert distill` call from a teacher fine-tuned
on the whole train split, timed wall-clock from start to finished test score, with the CPU
named in the results.

Tasks and teachers (fine-tuned here once, 1 epoch, bf16 where the CPU has it; snli's with
length-grouped batches):
    snli              all 94,772 offline train pairs (the study's teacher saw 20,000)
    rotten_tomatoes   all 10,613 train snippets

Runs (`RUNS` below): a recipe (Elastic BiBERT, 1-1-2, 1-1-4, and methods beyond them) at a
number of optimizer steps of batch 32, length-grouped batches, max length 64, lr 5e-4. The
steps set the budget; the minutes are what the run took here.

Resumable: every finished run leaves results.json and is skipped on a rerun; an unfinished
one resumes from its last checkpoint. Two workers can share the plan (each run is claimed
with a lock):

    python benchmarks/budget.py --task snli --threads 1 & python benchmarks/budget.py --task rotten_tomatoes --threads 1
    python benchmarks/budget.py --report            # its section of docs/results.md, and docs/budget.png
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bibert.packed.tuning import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import _fmt, _results, claim, test_score  # noqa: E402  (the study's run lock, files and formats)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "budget"
DOCS = ROOT / "docs"
BATCH, MAX_LENGTH, LR, EVAL_EXAMPLES = 32, 64, 5e-4, 600
BEGIN, END = "<!-- budget -->", "<!-- /budget -->"  # the section of docs/results.md this script writes


@dataclass(frozen=True)
class Run:
    key: str  # folder name prefix; the seed is appended
    label: str
    bits: str
    attention: str
    distill: str
    steps: int
    activations: str = "sign"
    pred_weight: float = 1.0
    init_from: str | None = None  # key of a finished run (same task and seed) whose best/ starts this one
    seeds: tuple[int, ...] = (1,)
    extra: dict = field(default_factory=dict)


def _elastic(key, steps, seeds=(1,), **kw) -> Run:
    return Run(key, f"Elastic BiBERT 1-1-1, {steps} steps", "1-1-1", "bi-max", "dmd", steps, activations="elastic",
               pred_weight=5.0, seeds=seeds, **kw)


def _kbit(bits, steps, seeds=(1,)) -> Run:
    """The study's 1-1-k row (softmax attention, uniform k-bit activations, standard KD) at this budget."""
    return Run(f"w1a{bits[-1]}_s{steps}", f"{bits} (softmax, standard KD), {steps} steps", bits, "softmax", "standard",
               steps, seeds=seeds)


RUNS = {
    "snli": [
        _elastic("elastic_s2500", 2500, seeds=(1, 2, 3)),
        # progressive binarization (docs/method.md §7): activations harden over the first quarter of the steps
        Run("elastic_phasein25_s2500", "Elastic BiBERT + phase-in 0.25, 2500 steps", "1-1-1", "bi-max", "dmd", 2500,
            activations="elastic", pred_weight=5.0, extra={"phase_in": 0.25}),
        _kbit("1-1-2", 2500),
        _kbit("1-1-4", 2500),
        # multi-step with a fair budget: the 1-1-1 student starts from the trained 1-1-4 one, a full schedule each
        Run("elastic_from4_s2500", "Elastic BiBERT 1-1-1 from the trained 1-1-4 student, 2500 + 2500 steps", "1-1-1",
            "bi-max", "dmd", 2500, activations="elastic", pred_weight=5.0, init_from="w1a4_s2500"),
        # the same two stages within one run's budget: 1,000 steps of 1-1-4, then 1,500 of 1-1-1
        _kbit("1-1-4", 1000, seeds=(1, 2, 3)),
        Run("elastic_from4s1000_s1500", "Elastic BiBERT 1-1-1 from a 1000-step 1-1-4 student, 1000 + 1500 steps",
            "1-1-1", "bi-max", "dmd", 1500, activations="elastic", pred_weight=5.0, init_from="w1a4_s1000",
            seeds=(1, 2, 3)),
        # the budget a user has on the 2-core machine: 45 minutes on the clock with both cores, where a step takes
        # 0.63-0.82x its 1-thread time (benchmarks/train_threads.py): 55-72 one-thread minutes, 1,000 + 3,000 steps
        Run("elastic_from4s1000_s3000", "Elastic BiBERT 1-1-1 from a 1000-step 1-1-4 student, 1000 + 3000 steps",
            "1-1-1", "bi-max", "dmd", 3000, activations="elastic", pred_weight=5.0, init_from="w1a4_s1000",
            seeds=(1, 2, 3)),
    ],
    "rotten_tomatoes": [
        _elastic("elastic_s2500", 2500, seeds=(1, 2, 3)),
        _kbit("1-1-2", 2500),
        _kbit("1-1-4", 2500),
    ],
}


# Earlier runs of benchmarks/study.py at its short budget, shown beside these (wall-clock only; their snli
# teacher saw 20,000 pairs and scores 77.5, the rotten_tomatoes one has this script's recipe in fp32, 79.9)
STUDY = ROOT / "benchmarks" / "results" / "study"
STUDY_ROWS = {  # family label: (study row key, seeds)
    "Elastic BiBERT 1-1-1": ("elastic_bimax_bf16_pred5", (1, 2, 3)),
    "1-1-2 (softmax, standard KD)": ("w1a2", (1,)),
    "1-1-2 (softmax, standard KD), 3x the study's epochs": ("w1a2_x3", (1,)),
    "1-1-4 (softmax, standard KD)": ("w1a4", (1,)),
}


def teacher(task: str) -> Path:
    """The task's teacher, fine-tuned on the whole train split (trained here if missing)."""
    from bibert.data import teacher_path
    from bibert.train import finetune

    out = RESULTS / task / "teacher"
    with claim(out, wait=True):
        if not (_results(out) and (out / "best").is_dir()):
            print(f"== {task}: teacher", flush=True)
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
            res = finetune(str(teacher_path()), task, out, resume=True, epochs=1.0, max_length=MAX_LENGTH,
                           batch_size=BATCH, max_eval_examples=EVAL_EXAMPLES, eval_test=True, seed=0,
                           group_by_length=task == "snli", precision="auto")
            _stamp(out, res, t0, cpu0)
    return out / "best"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


CLOCK = "clock.json"  # a run's time up to its last checkpoint, over every process that trained it


def _clock(out: Path) -> tuple[dict, Callable]:
    """The time earlier (interrupted) processes spent on this run up to its last checkpoint,
    and a training hook that writes the total so far at each checkpoint: a resumed run then
    counts the minutes of every process that trained it, less the steps redone after a kill."""
    from bibert.checkpoint import write_json

    try:
        before = json.loads((out / CLOCK).read_text())
    except (OSError, ValueError):
        before = {"wall_seconds": 0.0, "process_cpu_seconds": 0.0}
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    first = []  # the first step this process trained: a run resumed without a clock counts from there

    def hook(trainer):
        first[:] = first or [trainer.step - 1]
        if getattr(trainer, "_saved_step", None) == trainer.step:  # just checkpointed
            write_json(out / CLOCK, {"step": trainer.step, "from_step": before.get("from_step", first[0]),
                                     "wall_seconds": before["wall_seconds"] + time.perf_counter() - t0,
                                     "process_cpu_seconds": before["process_cpu_seconds"] + _cpu_seconds() - cpu0})
    return before, hook


def _stamp(out: Path, res: dict, t0: float, cpu0: float = 0.0, before: dict | None = None) -> None:
    """results.json plus how long the run took (wall-clock and this process's CPU time, which
    other jobs on the machine do not inflate, with what earlier processes of a resumed run
    spent), on which CPU, beside what load."""
    from bibert.checkpoint import write_json

    before = before or {}
    res.update(wall_seconds=round(time.perf_counter() - t0 + before.get("wall_seconds", 0.0), 1), cpu=cpu_model(),
               cores=os.cpu_count(),
               process_cpu_seconds=round(_cpu_seconds() - cpu0 + before.get("process_cpu_seconds", 0.0), 1),
               threads=__import__("torch").get_num_threads(), load_average=list(os.getloadavg()))
    write_json(out / "results.json", res)


def run_one(task: str, run: Run, seed: int, teacher_dir: Path) -> dict | None:
    from bibert.config import QuantConfig
    from bibert.train import distill

    out = RESULTS / task / f"{run.key}_seed{seed}"
    if _results(out):
        return packed_check(task, out)
    init = None
    if run.init_from:
        init = RESULTS / task / f"{run.init_from}_seed{seed}" / "best"
        if not init.is_dir():
            print(f"-- {task}: {run.key} seed {seed} waits for {run.init_from}", flush=True)
            return None
    with claim(out, wait=False) as mine:
        if not mine or _results(out):
            return _results(out)
        print(f"== {task}: {run.label}, seed {seed}", flush=True)
        before, clock = _clock(out)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        res = distill(str(teacher_dir), task, out, quant=QuantConfig.from_bits(run.bits, run.attention, run.activations),
                      distill=run.distill, resume=True, max_steps=run.steps, lr=LR,
                      max_length=MAX_LENGTH, batch_size=BATCH, max_eval_examples=EVAL_EXAMPLES, eval_test=True,
                      seed=seed, group_by_length=True, precision="auto", pred_weight=run.pred_weight,
                      eval_every=max(1, run.steps // 8), init_from=str(init) if init else None, hooks=[clock],
                      **run.extra)
        _stamp(out, res, t0, cpu0, before)
        return packed_check(task, out)


def packed_check(task: str, out: Path) -> dict:
    """Exports a finished run's best student bit-packed and scores the packed model and the
    simulated student on the test split (once; the result is kept in results.json). The
    simulated student runs in padded batches of 64; its k-bit quantizers then see the whole
    batch, where the engine quantizes each sequence alone (docs/packed_format.md)."""
    from transformers import AutoTokenizer

    from bibert.checkpoint import write_json
    from bibert.data import load_examples
    from bibert.demo import packed_vs_student
    from bibert.modeling import BiBertForSequenceClassification
    from bibert.packed import export_packed, load_packed
    from bibert.tasks import get_task

    res = _results(out)
    if "packed" in res:
        return res
    student = BiBertForSequenceClassification.from_pretrained(out / "best").eval()
    path = out / "student.bibert"
    export_packed(out / "best", path)
    t = get_task(task)
    check = packed_vs_student(load_packed(path), student, AutoTokenizer.from_pretrained(out / "best"), t,
                              load_examples(t, "test"), MAX_LENGTH)
    res["packed"] = {**check, "file_bytes": path.stat().st_size}
    path.unlink()  # the check is what is kept; `bibert export` makes the file again from best/
    write_json(out / "results.json", res)
    print(f"   packed {100 * check['packed']:.2f} vs simulated {100 * check['student']:.2f}: "
          f"{100 * check['agreement']:.2f}% identical predictions", flush=True)
    return res


# ------------------------------------------------------------------------------ report

def collect() -> dict:
    table = {}
    for task, runs in RUNS.items():
        t = _results(RESULTS / task / "teacher")
        entry = {"teacher": t and {"score": test_score(t), "minutes": t["wall_seconds"] / 60, "cpu": t.get("cpu")}}
        for run in runs:
            done = {s: _results(RESULTS / task / f"{run.key}_seed{s}") for s in run.seeds}
            done = {s: r for s, r in done.items() if r}
            if done:
                # a run started from another one's student costs both: its minutes include that run's
                before = {s: _results(RESULTS / task / f"{run.init_from}_seed{s}") or {} for s in done} \
                    if run.init_from else {s: {} for s in done}
                entry[run.key] = {"label": run.label, "seeds": list(done), "scores": [test_score(r) for r in done.values()],
                                  "minutes": [(r["wall_seconds"] + before[s].get("wall_seconds", 0)) / 60
                                              for s, r in done.items()],
                                  "cpu_minutes": [(r.get("process_cpu_seconds", float("nan")) +
                                                   before[s].get("process_cpu_seconds", 0)) / 60 for s, r in done.items()],
                                  "packed": [r.get("packed") for r in done.values()],
                                  "cpus": sorted({r.get("cpu", "?") for r in done.values()}),
                                  "load": [r.get("load_average", [None])[0] for r in done.values()],
                                  "partial": [_undercounted(task, f"{run.key}_seed{s}") or bool(run.init_from) and
                                              _undercounted(task, f"{run.init_from}_seed{s}") for s in done]}
        study = {}
        for family, (key, seeds) in STUDY_ROWS.items():
            done = [r for r in (_results(STUDY / task / f"{key}_seed{s}") for s in seeds) if r]
            if done:
                study[family] = {"steps": done[0]["steps"], "scores": [test_score(r) for r in done],
                                 "minutes": [r.get("wall_seconds", r["train_seconds"]) / 60 for r in done]}
        entry["study"] = study
        table[task] = entry
    return table


def _undercounted(task: str, name: str) -> bool:
    """A run resumed before clock.json kept the time of every process that trained it: its clock
    starts after step 0, or (no clock, or one without its first step) its trainer's own count of
    step seconds (kept across resumes) leaves less than a minute for the dev evaluations and
    the test score within the last process's wall-clock, which a run in one process never does
    here (they take 2 to 5 minutes)."""
    r = _results(RESULTS / task / name) or {}
    try:
        clock = json.loads((RESULTS / task / name / CLOCK).read_text())
    except (OSError, ValueError):
        clock = {}
    if "from_step" in clock:
        return clock["from_step"] > 0
    return "train_seconds" in r and r["train_seconds"] > r["wall_seconds"] - 60


def write_report() -> Path:
    table = collect()
    lines = ["## Accuracy against student training time", "",
             "Generated by `python benchmarks/budget.py --report` from the runs under `benchmarks/results/budget/` "
             "(this section of docs/results.md only; `study.py --report` keeps it).",
             "Test accuracy (%) of each finished run; minutes are those of the whole `bibert distill` call "
             "(training, dev evaluations, the test score) on the CPU named, one torch thread per run: wall-clock "
             "(which other jobs on the machine inflate: the load average says how busy it was) and the run's own "
             "CPU time (which they do not). A run started from another run's student counts both runs' steps "
             "and minutes. Packed: the best student exported and run on the bitwise engine over the same test "
             "split. A 1-1-k student's simulated score comes from padded batches of 64, in which each k-bit "
             "quantizer's clip is taken over the whole batch, while the engine quantizes each sequence alone "
             "(docs/packed_format.md, \"Multi-bit activations\"); so the k-bit rows agree less often than the "
             "1-bit ones, and their packed score is the one a deployment gets.", ""]
    for task, entry in table.items():
        t = entry.get("teacher")
        lines += [f"### {task}", ""]
        if t:
            lines += [f"Teacher: all-MiniLM-L6-v2 fine-tuned on the whole train split, 1 epoch: "
                      f"**{t['score']:.1f}** test, {t['minutes']:.1f} min ({t['cpu']}).", ""]
        lines += ["| run | steps | seeds | test acc | packed test acc | packed = simulated | wall-clock minutes per run "
                  "| CPU minutes per run | load average at the end | CPU |", "|---|---|---|---|---|---|---|---|---|---|"]
        runs, partial = {r.key: r for r in RUNS[task]}, False
        steps = {k: f"{runs[r.init_from].steps} + {r.steps}" if r.init_from else str(r.steps) for k, r in runs.items()}
        for key, e in entry.items():
            if key in ("teacher", "study") or not e:
                continue
            load = ", ".join("-" if x is None else f"{x:.1f}" for x in e["load"])
            packed = [p for p in e["packed"] if p]
            packed_acc = _fmt([100 * p["packed"] for p in packed]) if packed else "-"
            agree = ", ".join(f"{100 * p['agreement']:.2f}%" for p in packed) or "-"
            mark = ["*" if p else "" for p in e["partial"]]
            partial = partial or any(e["partial"])
            lines.append(f"| {e['label']} | {steps[key]} | {', '.join(map(str, e['seeds']))} | {_fmt(e['scores'])} | "
                         f"{packed_acc} | {agree} | "
                         f"{', '.join(f'{m:.1f}{x}' for m, x in zip(e['minutes'], mark))} | "
                         f"{', '.join(f'{m:.1f}{x}' for m, x in zip(e['cpu_minutes'], mark))} | {load} | "
                         f"{', '.join(e['cpus'])} |")
        if partial:
            lines += ["", "\\* Resumed after an interruption before the time of every process was kept "
                          f"({CLOCK}): the minutes are those of the last process(es) only, an undercount."]
        if entry.get("study"):
            teacher = "a teacher fine-tuned on 20,000 pairs, 77.5" if task == "snli" else "the same teacher recipe in fp32, 79.9"
            lines += ["", f"The study's runs at its short budget (benchmarks/study.py; {teacher}; two runs sharing the "
                          "cores, wall-clock only):", "", "| run | steps | test acc | wall-clock minutes |", "|---|---|---|---|"]
            for family, e in entry["study"].items():
                lines.append(f"| {family} | {e['steps']} | {_fmt(e['scores'])} | "
                             f"{', '.join(f'{m:.1f}' for m in e['minutes'])} |")
        lines.append("")
    chart = plot(table)
    if chart:
        lines += [f"![accuracy against minutes]({chart.name})", ""]
    section = f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}\n"
    path = DOCS / "results.md"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text.split(BEGIN, 1)[0] + section + text.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path


def plot(table: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(table), figsize=(5.5 * len(table), 5.5), squeeze=False)
    for ax, (task, entry) in zip(axes[0], table.items()):
        groups: dict[str, list] = {}
        def color(family: str) -> str:  # one colour per recipe, whichever script ran it
            return next((c for prefix, c in (("Elastic", "C0"), ("1-1-2", "C1"), ("1-1-4", "C3")) if
                         family.startswith(prefix)), "C4")

        for family, e in entry.get("study", {}).items():
            pts = [(statistics.mean(e["minutes"]), statistics.mean(e["scores"]))]
            ax.plot(*zip(*pts), "s", mfc="none", color=color(family), label=f"{family}, study (n={len(e['scores'])})")
        for key, e in entry.items():
            if key in ("teacher", "study") or not e:
                continue
            family = e["label"].rsplit(",", 1)[0]
            for m, s in zip(e["minutes"], e["scores"]):
                groups.setdefault(family, []).append((m, s))
        for family, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color(family), label=family)
        if entry.get("teacher"):
            ax.axhline(entry["teacher"]["score"], color="grey", ls="--", label="teacher")
        ax.set_title(task)
        ax.set_xlabel("student training, wall-clock minutes")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
    fig.tight_layout()
    path = DOCS / "budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", choices=list(RUNS), help="task(s) to run (default: both)")
    p.add_argument("--runs", nargs="*", help="only these run keys")
    p.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    p.add_argument("--threads", type=int, help="torch threads of this worker (default: torch's choice)")
    p.add_argument("--report", action="store_true", help="only (re)write the section of docs/results.md")
    args = p.parse_args(argv)
    if not args.report:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        for task in args.task or list(RUNS):
            t = teacher(task)
            for run in RUNS[task]:
                if args.runs and run.key not in args.runs:
                    continue
                for seed in run.seeds:
                    if not args.seeds or seed in args.seeds:
                        run_one(task, run, seed, t)
    print(f"wrote {write_report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
