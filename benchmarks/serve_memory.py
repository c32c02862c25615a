"""`finetune serve` of an instruction-tuning checkpoint (conversations: /predict and the chat endpoint): how many
processes it runs and their resident memory together (summed over the server's process tree once GET /health
answers), on a tiny Llama trained here for two steps.

    python -m benchmarks.serve_memory [--code DIR]

`--code DIR`: the finetune source tree to fit and serve with (default: this one), e.g. a checkout of an earlier
commit, to compare versions on the same backbone and rows. (Resident memory summed over forked processes counts
their shared pages more than once: compare versions with each other, not with a machine's free memory.)
"""

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.data import synthetic_conversations, write_jsonl
from benchmarks.harness import REPO
from benchmarks.results import publish
from benchmarks.systems.finetune_cli import Server, run_command_in


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (/proc's parent links)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:  # (gone meanwhile)
                continue
    tree = [root]
    for pid in tree:
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


def resident_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            total_kb += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                             if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total_kb / 1024


def main() -> None:
    from finetune.tiny import tiny_backbone

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the finetune source tree to run (default: this one)")
    args = parser.parse_args()
    code = args.code.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-memory-"))
    corpus = [message["content"] for row in synthetic_conversations(32) for message in row["messages"]]
    backbone = tiny_backbone(work / "tiny-llama", "llama", corpus)
    # (conversations: the task then has a chat endpoint beside /predict)
    train = write_jsonl(work / "train.jsonl", synthetic_conversations(32))
    run_command_in(code, "fit", f"--model.backbone={backbone}", "--model.task=InstructionTuning",
                   f"--data.train_file={train}", "--trainer.max_steps=2", "--trainer.logger=false",
                   f"--trainer.default_root_dir={work}", "--trainer.enable_progress_bar=false")
    (checkpoint,) = work.glob("checkpoints/*.ckpt")
    server = Server([f"--ckpt_path={checkpoint}"], work / "serve.log", code=code)
    try:
        time.sleep(2)  # (the workers settle after /health first answers)
        pids = process_tree(server.process.pid)
        figures = {"processes": len(pids), "resident_mb": round(resident_mb(pids))}
    finally:
        server.stop()
    publish("serve_memory", {"code": str(code), **figures},
            f"finetune serve (instruction tuning, tiny Llama): {figures['processes']} processes, "
            f"{figures['resident_mb']} MB resident together")


if __name__ == "__main__":
    main()
