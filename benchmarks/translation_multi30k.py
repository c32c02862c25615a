"""Translation fine-tune on Multi30k (en -> de) with an offline backbone: BLEU before/after, wall
time, and validation generation throughput (greedy vs. beam search 4).

The backbone is MiniLM warm-started as an encoder-decoder (benchmarks/make_minilm_seq2seq.py):
LoRA on the pretrained attention, the new cross-attention trained in full. Everything runs through
`finetune.cli.run`, the code path of the `finetune` command.

    python benchmarks/translation_multi30k.py --data ../shared/data/multi30k --train_size 4000 --epochs 2
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import subset

from finetune.cli import run
from finetune.data import DataModule
from finetune.module import FineTuneModule


def throughput(ckpt: str, val_file: str, beams: int) -> float:
    module = FineTuneModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    module.task.generation.num_beams = beams
    data = DataModule(val_file=val_file, batch_size=32)
    data.trainer = SimpleNamespace(lightning_module=module, global_rank=0, world_size=1, current_epoch=0)
    data.setup("validate")
    count, start = 0, time.perf_counter()
    for batch in data.val_dataloader():
        count += len(module.task.generate(module.model, batch, module.tokenizer))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="../shared/data/multi30k")
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--val_size", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="translation-bench-"))
    from make_minilm_seq2seq import main as build_backbone

    backbone = str(work / "minilm2minilm")
    build_backbone(backbone)
    train = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_size)
    val = subset(Path(args.data) / "validation.jsonl", work / "val.jsonl", args.val_size)
    common = [f"--model.backbone={backbone}", "--model.task=Translation", "--model.task.max_target_length=64",
              "--model.task.generation.max_new_tokens=48", "--model.lora.target_modules=[query,value]",
              f"--data.val_file={val}", f"--data.batch_size={args.batch_size}",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={work}", "--seed_everything=0"]

    before = run(["validate", *common]).trainer.callback_metrics
    start = time.perf_counter()
    cli = run(["fit", *common, f"--data.train_file={train}", f"--trainer.max_epochs={args.epochs}",
               "--model.optimizer.lr=0.001"])
    fit_seconds = time.perf_counter() - start
    after = cli.trainer.callback_metrics
    ckpt = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    greedy, beam4 = throughput(ckpt, val, 1), throughput(ckpt, val, 4)
    results = {
        "train_sentences": args.train_size, "val_sentences": args.val_size, "epochs": args.epochs,
        "bleu_before": float(before["val/bleu"]), "chrf_before": float(before["val/chrf"]),
        "bleu_after": float(after["val/bleu"]), "chrf_after": float(after["val/chrf"]),
        "fit_wall_seconds": round(fit_seconds, 1),
        "generation_sequences_per_second": {"greedy": round(greedy, 1), "beam4": round(beam4, 1)},
    }
    print("| figure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "translation_multi30k.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
