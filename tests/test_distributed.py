"""A two-process CPU distillation under torchrun (gloo): it trains, only rank 0 writes,
and the metrics gathered across ranks equal a single-process evaluation."""
import json
import os
import signal
import subprocess
import sys

from transformers import AutoTokenizer

from bibert import BiBertForSequenceClassification
from bibert.batches import build_dataset
from bibert.data import load_examples
from bibert.evaluate import evaluate_model
from bibert.config import TrainConfig
from bibert.data import take_slice

from test_train import make_tiny_teacher


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_two_process_run(teacher_dir, tmp_path):
    teacher = make_tiny_teacher(tmp_path / "teacher", teacher_dir)
    out = tmp_path / "ddp"
    args = ["--teacher", teacher, "--task", "rotten_tomatoes", "--out", str(out), "--max-steps", "6",
            "--eval-every", "3", "--max-train-examples", "48", "--max-eval-examples", "17", "--batch-size", "4",
            "--max-length", "24", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "bibert.cli", "distill", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave the workers behind (they may sit in sessions of their own)
            for pid in [proc.pid] + _descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 6
    assert stdout.count('"world_size": 2') == 1  # only rank 0 reports
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 6]  # one writer
    # metrics gathered over 17 dev examples (uneven shards) = one process's evaluation
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    task = config.task
    dev = build_dataset(take_slice(load_examples(task, "dev"), 17, config.seed),
                        AutoTokenizer.from_pretrained(teacher), config.max_length, task)
    student = BiBertForSequenceClassification.from_pretrained(out / "last")
    assert evaluate_model(student, task, dev) == json.loads(lines[-1])["dev"]
