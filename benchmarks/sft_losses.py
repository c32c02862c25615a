"""Per-step training losses of short fixed-seed instruction-tuning fits on tiny backbones built here: conversations and
prompt rows on a tiny Llama (chat template), prompt rows on a tiny GPT-2 (the base format). A redesign that must
change no number runs this on both versions and compares the lists.

    python -m benchmarks.sft_losses [--code DIR] [--steps 5]

`--code DIR`: the finetune source tree to fit with (default: this one), e.g. a checkout of an earlier commit.
"""

import argparse
import csv
import tempfile
from pathlib import Path

from benchmarks.data import synthetic_conversations, synthetic_instruction_rows, write_jsonl
from benchmarks.harness import REPO
from benchmarks.results import publish
from benchmarks.systems.finetune_cli import run_command_in


def main() -> None:
    from finetune.tiny import tiny_backbone

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the finetune source tree to run (default: this one)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    code = args.code.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-sft-losses-"))
    rows = synthetic_instruction_rows(40)
    corpus = [text for row in rows for text in row.values()]
    backbones = {name: tiny_backbone(work / f"tiny-{name}", name, corpus) for name in ("llama", "gpt2")}
    files = {"messages": write_jsonl(work / "messages.jsonl", synthetic_conversations(40)),
             "prompt": write_jsonl(work / "prompt.jsonl", rows)}
    runs = {"messages (Llama, chat template)": ("llama", "messages"),
            "prompt (Llama, chat template)": ("llama", "prompt"), "prompt (GPT-2, base format)": ("gpt2", "prompt")}
    losses = {}
    for name, (backbone, data_format) in runs.items():
        root = work / name.split()[0] / backbone
        run_command_in(code, "fit", f"--model.backbone={backbones[backbone]}", "--model.task=InstructionTuning",
                       f"--model.task.format={data_format}", f"--data.train_file={files[data_format]}",
                       "--data.batch_size=4", f"--trainer.max_steps={args.steps}", "--seed_everything=0",
                       "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                       f"--trainer.default_root_dir={root}")
        (metrics,) = root.glob("version_*/metrics.csv")
        losses[name] = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    table = "\n".join(f"{name}: {', '.join(f'{loss:.7f}' for loss in values)}" for name, values in losses.items())
    publish("sft_losses", {"code": str(code), "losses": losses}, table)


if __name__ == "__main__":
    main()
