"""Build an offline encoder-decoder backbone from the pretrained MiniLM (BERT2BERT warm start).

Cross-attention weights are left out of the saved checkpoint on purpose: `finetune` trains every
weight a checkpoint lacks in full (next to the LoRA adapter), so the new cross-attention learns
while the pretrained encoder and decoder get LoRA.

    python -m benchmarks.make_minilm_seq2seq /tmp/minilm2minilm
"""

import argparse

from benchmarks.models import minilm_seq2seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="minilm2minilm", help="the model directory to write")
    out = parser.parse_args().out
    saved = minilm_seq2seq(out, cross_attention=False)
    print(f"wrote {out}: {saved / 1e6:.1f}M pretrained parameters saved")


if __name__ == "__main__":
    main()
