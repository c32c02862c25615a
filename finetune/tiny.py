"""Tiny offline backbones for tests and the conformance kit: a randomly initialised 2-layer, 32-wide BERT, T5,
GPT-2, Llama (SmolLM2's shape, with its ChatML template) or Gemma 3 (Gemma 3 270M's shape: a base model, no chat
template) with a tokenizer trained on the test's own rows."""

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import torch

Architecture = Literal["bert", "t5", "gpt2", "llama", "gemma3"]
ARCHITECTURES = ("bert", "t5", "gpt2", "llama", "gemma3")
SPECIAL_TOKENS = {  # the first id is padding in both BERT and BPE styles
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "bpe": ["<pad>", "</s>", "<s>", "<unk>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],  # as SmolLM2-Instruct: no pad token of its own
    # Gemma 3's first ids, its turn markers and its byte-fallback tokens (ids 0-4, then 5-6, then 7-262)
    "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
              *(f"<0x{byte:02X}>" for byte in range(256))],
}
# SmolLM2-Instruct's ChatML template (with a shorter default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)



def tiny_tokenizer(path: Union[str, Path], corpus: Sequence[str], style: Architecture, vocab_size: int = 400) -> None:
    """Train a small tokenizer on `corpus` and save it: BERT-style WordPiece with [CLS]/[SEP] and
    sentence pairs, or byte-level BPE that appends `</s>` (T5 style), or not (GPT-2 style), or that
    has SmolLM2-Instruct's ChatML special tokens and chat template and no pad token (Llama style)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import GemmaTokenizer, PreTrainedTokenizerFast

    if style == "gemma3":
        # Gemma's own tokenizer class (BPE with byte fallback over text whose spaces are "▁", <bos> first) with a
        # vocabulary and merges trained here; the turn markers are special tokens, but there is no chat template.
        trainer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        trainer.normalizer = normalizers.Replace(" ", "\u2581")
        trainer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size + 256,
                                                                special_tokens=SPECIAL_TOKENS["gemma"]))
        trained = json.loads(trainer.to_str())["model"]
        GemmaTokenizer(vocab=trained["vocab"], merges=[tuple(merge) for merge in trained["merges"]],
                       extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                       add_bos_token=True).save_pretrained(path)
        return
    if style == "bert":
        # The vocabulary is built here, not trained: WordPieceTrainer's result varies from run to run.
        # Characters (alone and as `##` continuations) spell any word; the most frequent words are whole.
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        words = Counter(word for text in corpus
                        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
        chars = sorted({char for word in words for char in word})
        frequent = sorted(words, key=lambda word: (-words[word], word))
        vocab = [*SPECIAL_TOKENS["bert"], *chars, *(f"##{char}" for char in chars), *frequent]
        vocab = list(dict.fromkeys(vocab))[: max(vocab_size, 5 + 2 * len(chars))]
        tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
        tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
        tokenizer.decoder = decoders.WordPiece()
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        inputs = ["input_ids", "token_type_ids", "attention_mask"]
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]", model_input_names=inputs).save_pretrained(path)
        return
    chat = style == "llama"
    tokenizer = Tokenizer(models.BPE(unk_token=None if chat else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=not chat)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS["chatml" if chat else "bpe"], initial_alphabet=alphabet))
    if chat:
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE).save_pretrained(path)
        return
    if style == "t5":
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(path)


def tiny_backbone(path: Union[str, Path], architecture: Architecture, corpus: Sequence[str], width: int = 32) -> str:
    """A randomly initialised 2-layer, `width`-wide model with a tokenizer trained on `corpus`, saved like a
    pretrained model directory (safetensors): enough to run every code path of a task in seconds. (bitsandbytes
    quantizes in blocks of 64 inputs: a 4-bit Llama needs `width` 64.)"""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    tiny_tokenizer(path, corpus, architecture)
    vocab_size = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(0)
    if architecture == "bert":
        model = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=512, pad_token_id=0))
    elif architecture == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    elif architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=2, eos_token_id=1, pad_token_id=0))
    elif architecture == "gemma3":  # Gemma 3 270M's shape in miniature: one key/value head, sliding-window layers,
        # and its head size, which llama.cpp scales queries by (transformers by query_pre_attn_scalar: the same 256)
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=512,
            sliding_window=16,
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    else:  # SmolLM2's shape in miniature: grouped-query attention, tied embeddings, no pad token
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=None))
    model.save_pretrained(path)
    return str(path)


def texts_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every string in the rows, however nested (a tokenizer's training corpus)."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(list(rows))
    return found
