"""Translation fine-tune on Multi30k (en -> de) with an offline backbone: BLEU before/after, wall
time, and validation generation throughput (greedy vs. beam search 4).

The backbone is MiniLM warm-started as an encoder-decoder (benchmarks/make_minilm_seq2seq.py):
LoRA on the pretrained attention, the new cross-attention trained in full. Everything runs through
`finetune.cli.run`, the code path of the `finetune` command; the throughput is `finetune validate` of the
trained checkpoint, timed by the generation meter (validation loss, generation, decoding and metrics).

    python -m benchmarks.translation_multi30k --data ../shared/data/multi30k --train_size 4000 --epochs 2
"""

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.data import subset
from benchmarks.meter import GenerationMeter
from benchmarks.models import minilm_seq2seq
from benchmarks.results import figure_table, write_results
from benchmarks.systems import finetune_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/multi30k")
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--val_size", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="translation-bench-"))
    backbone = str(work / "minilm2minilm")
    minilm_seq2seq(backbone, cross_attention=False)
    train = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_size)
    val = subset(Path(args.data) / "validation.jsonl", work / "val.jsonl", args.val_size)
    common = [f"--model.backbone={backbone}", "--model.task=Translation", "--model.task.max_target_length=64",
              "--model.task.generation.max_new_tokens=48", "--model.lora.target_modules=[query,value]",
              f"--data.val_file={val}", f"--data.batch_size={args.batch_size}",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={work}", "--seed_everything=0"]

    before = finetune_cli.metrics(finetune_cli.run(["validate", *common]))
    start = time.perf_counter()
    cli = finetune_cli.run(["fit", *common, f"--data.train_file={train}", f"--trainer.max_epochs={args.epochs}",
                            "--model.optimizer.lr=0.001"])
    fit_seconds = time.perf_counter() - start
    after = finetune_cli.metrics(cli)
    ckpt = finetune_cli.last_checkpoint(cli)
    throughput = {}
    for name, beams in (("greedy", 1), ("beam4", 4)):
        meter = GenerationMeter()
        finetune_cli.run(["validate", *common, f"--ckpt_path={ckpt}", "--data.eval_batch_size=32",
                          f"--model.task.generation.num_beams={beams}", "--trainer.logger=false"], generation=meter)
        throughput[name] = round(meter.result()["sequences_per_s"], 1)
    results = {
        "train_sentences": args.train_size, "val_sentences": args.val_size, "epochs": args.epochs,
        "bleu_before": before["val/bleu"], "chrf_before": before["val/chrf"],
        "bleu_after": after["val/bleu"], "chrf_after": after["val/chrf"],
        "fit_wall_seconds": round(fit_seconds, 1), "generation_sequences_per_second": throughput,
    }
    print(figure_table(results))
    write_results("translation_multi30k", results)


if __name__ == "__main__":
    main()
