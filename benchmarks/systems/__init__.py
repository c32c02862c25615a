"""The systems the benchmarks compare, each written once: `finetune_cli` (finetune itself, in process or as the
`finetune` command, and `finetune serve`), `hand_loop` (PyTorch + PEFT, no framework), `hf_trainer` (Hugging Face
`Trainer` and `Seq2SeqTrainer`), `trl` (TRL's `SFTTrainer`), `generate_loop` (`model.generate` on batches) and
`pipeline` (transformers `pipeline` calls). Every one reports to the same meters (`benchmarks.meter`)."""
