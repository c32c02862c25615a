"""How a decoder-only LM reads a prompt and writes a reply: the one chat/prompt format of every task that renders
prompts for a decoder (summarization and translation on a decoder, instruction tuning, preference tuning), and
the decoding settings of every generating task.

Two formats, settled from the backbone (`ChatFormat.settle`):
- the tokenizer's chat template (instruct models): a conversation's turns as the template renders them, each
  assistant reply followed by the template's end-of-turn token (the stop token);
- the base format (no template, or `chat_template: false`): one user turn as the prompt, then a newline, the
  reply and the stop token (eos).
A reply is tokenized alone after the text before it, as the model generates it; the loss is on the reply and its
stop token. For generation, prompts are padded on the left and stripped from the output, which stops at the
stop token.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from transformers import PretrainedConfig

from finetune.errors import InputError
from finetune.files import value_kind
from finetune.target_tokens import IGNORE
from finetune.task import task_option

OPTION = task_option("chat")  # (where messages name the options)
ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# The chat template is checked on this conversation at setup, before any data is read.
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Sure"}]


@dataclass
class GenerationSettings:
    """How text is generated for metrics and `predict` (greedy by default: fast and deterministic).

    Args:
        max_new_tokens: the most tokens generated per text.
        num_beams: beam search with this many beams (1: greedy or sampling).
        length_penalty: beam search: the exponent of the length that a beam's score is divided by.
        no_repeat_ngram_size: no n-gram of this size occurs twice in a generated text (0: no limit).
        do_sample: sample the next token instead of taking the likeliest.
        temperature: sampling: the softmax temperature.
        top_k: sampling: from the k likeliest tokens.
        top_p: sampling: from the smallest set of tokens whose probability reaches p.
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                  "do_sample": self.do_sample}
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


@dataclass(frozen=True)
class ChatFormat:
    """How a decoder reads prompts and replies (`model.task.init_args.chat`).

    Args:
        chat_template: the tokenizer's chat template renders the conversation, the prompt as the user turn (None:
            when the tokenizer has a template, as instruct models do); false: the base format, `prompt + newline`,
            then the reply and the stop token; a Jinja template, or a file holding one: this template instead of
            the tokenizer's (to train a base model into a chat model; it is saved with the tokenizer on export).
        system_prompt: with a chat template, the system turn of conversations without one (None: the template's
            default, if it has one).
        stop_token: the token that ends a reply, inside the loss and where generation stops (None: from the
            backbone: the chat template's end-of-turn token, else eos).
    """

    chat_template: Union[bool, str, None] = None
    system_prompt: Optional[str] = None
    stop_token: Optional[str] = None

    # --- settled from the backbone -------------------------------------------------------------
    def settle(self, tokenizer: Any) -> "ChatFormat":
        """The format with the template and the stop token decided from a decoder's tokenizer, and checked (a
        template of the user's becomes the tokenizer's)."""
        if isinstance(self.chat_template, str):
            tokenizer.chat_template = template_text(self.chat_template)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        settled = dataclasses.replace(self, chat_template=has_template if self.chat_template is None
                                      else self.chat_template)
        if settled.chat_template and not has_template:
            raise InputError(f"{OPTION}.chat_template: the tokenizer of {tokenizer.name_or_path!r} has no chat "
                             "template (a base model); set chat_template: false")
        stop = self.stop_token or (settled.end_of_turn(tokenizer) if settled.chat_template else tokenizer.eos_token)
        if stop is None or tokenizer.convert_tokens_to_ids(stop) in (None, tokenizer.unk_token_id):
            raise InputError(f"{OPTION}.stop_token: {stop!r} is not a token of {tokenizer.name_or_path!r}; name the "
                             "token that ends a reply (e.g. its eos token)")
        settled = dataclasses.replace(settled, stop_token=stop)
        if settled.chat_template:
            settled.encode(PROBE, tokenizer)  # the template check, before any data
        return settled

    def end_of_turn(self, tokenizer: Any) -> str:
        """The special token that closes the assistant's turn in the chat template (`<|im_end|>` in ChatML,
        `<|eot_id|>` in Llama 3): the first special token after a reply the template renders."""
        prompt = self.prompt_text([{"role": "user", "content": "Hi"}], tokenizer)
        conversation = self.template(PROBE[:2], tokenizer)
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if conversation.startswith(prompt):
            after = tokenizer(conversation[len(prompt):], add_special_tokens=False)["input_ids"]
            found = next((i for i in after if i in special), None)
            if found is not None:
                return tokenizer.convert_ids_to_tokens(found)
        raise InputError(f"{OPTION}.stop_token: the chat template of {tokenizer.name_or_path!r} does not close the "
                         "assistant's turn with a special token; name the token that ends a reply")

    def stop_ids(self, tokenizer: Any) -> list[int]:
        """Where generation stops: the stop token, and eos."""
        return sorted({tokenizer.convert_tokens_to_ids(self.stop_token), tokenizer.eos_token_id} - {None})

    # --- rendering -----------------------------------------------------------------------------
    def template(self, messages: list[Message], tokenizer: Any, opened: bool = False) -> str:
        """The chat template's text of a conversation (with the system prompt), `opened`: with the assistant's
        turn opened after it."""
        if self.system_prompt is not None and [m["role"] for m in messages[:1]] != ["system"]:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=opened)

    def plain_prompt(self, messages: list[Message]) -> str:
        """The base format's prompt: the one user turn of a conversation (and its reply), then a newline."""
        if [m["role"] for m in messages] not in (["user"], ["user", "assistant"]):
            raise InputError(f"{OPTION}.chat_template: conversations of several turns are rendered with a chat "
                             "template, and the backbone has none or chat_template is false")
        return messages[0]["content"] + "\n"

    def prompt_text(self, messages: list[Message], tokenizer: Any) -> str:
        """A conversation with the assistant's turn opened: the text the model continues."""
        return self.template(messages, tokenizer, opened=True) if self.chat_template else self.plain_prompt(messages)

    def prompt_ids(self, conversations: list[list[Message]], tokenizer: Any) -> list[list[int]]:
        # (a chat template writes the special tokens it wants, e.g. bos; a plain prompt gets the tokenizer's)
        texts = [self.prompt_text(messages, tokenizer) for messages in conversations]
        return tokenizer(texts, add_special_tokens=not self.chat_template)["input_ids"]

    def reply_ids(self, reply: str, tokenizer: Any) -> list[int]:
        """A reply's tokens (tokenized alone, as the model generates them) and the stop token."""
        stop = tokenizer.convert_tokens_to_ids(self.stop_token)
        return tokenizer(reply, add_special_tokens=False)["input_ids"] + [stop]

    # --- encoding ------------------------------------------------------------------------------
    def turns(self, messages: list[Message], tokenizer: Any) -> Iterator[tuple[list[int], list[int]]]:
        """For each assistant reply of a conversation: (the tokens of the text before it since the previous
        reply, its `reply_ids`). With a template the text before a reply is its conversation so far with the
        assistant's turn opened, tokenized as `predict` tokenizes a prompt; the template must render the turns
        one after the other, each reply followed by the stop token (checked on every conversation)."""
        if not self.chat_template:
            prompt = tokenizer(self.plain_prompt(messages))["input_ids"]
            if messages[-1]["role"] == "assistant":
                yield prompt, self.reply_ids(messages[-1]["content"], tokenizer)
            return
        done = ""  # the conversation's text so far
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.template(messages[:turn], tokenizer, opened=True)
            reply = message["content"] + self.stop_token
            rendered = self.template(messages[:turn + 1], tokenizer)
            for found, expected in ((prompt[:len(done)], done), (rendered[:len(prompt + reply)], prompt + reply)):
                if found != expected:
                    first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
                    raise InputError(
                        f"{OPTION}.chat_template: the chat template of {tokenizer.name_or_path!r} does not render the "
                        f"conversation {first_user[:40]!r}... as its turns one after the other, each assistant reply "
                        f"followed by the stop token {self.stop_token!r}: at turn {turn + 1} it renders "
                        f"{difference(found, expected)}, so the loss would not be on the replies. Set {OPTION}."
                        "stop_token to the token that ends the template's assistant turn, or chat_template: false "
                        "(the base format, for rows of one prompt and one reply)")
            yield tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"], \
                self.reply_ids(message["content"], tokenizer)
            done = prompt + reply

    def encode(self, messages: list[Message], tokenizer: Any, train_on_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """A conversation's tokens and labels: every assistant reply and the stop token after it in the loss, the
        text between replies not (unless `train_on_prompt`)."""
        ids: list[int] = []
        labels: list[int] = []
        for before, reply in self.turns(messages, tokenizer):
            ids += before + reply
            labels += (before if train_on_prompt else [IGNORE] * len(before)) + reply
        return ids, labels

    def encode_reply(self, messages: list[Message], reply: str, tokenizer: Any) -> tuple[list[int], list[int]]:
        """(the prompt's tokens, the reply's with the stop token) of a conversation and the assistant's reply to it."""
        turns = list(self.turns([*messages, {"role": "assistant", "content": reply}], tokenizer))
        prompt = [token for before, earlier in turns[:-1] for token in before + earlier] + turns[-1][0]
        return prompt, turns[-1][1]

    # --- generation ----------------------------------------------------------------------------
    def generate(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any,
                 settings: GenerationSettings) -> list[str]:
        """The replies to a batch's prompts (`prompt_batch`), without the prompts and template tokens."""
        prompts = batch["prompt_ids"]
        with torch.inference_mode():
            output = model.generate(input_ids=prompts, attention_mask=batch["prompt_attention_mask"],
                                    **settings.generate_kwargs(), eos_token_id=self.stop_ids(tokenizer),
                                    pad_token_id=tokenizer.pad_token_id)
        return decoded_texts(output[:, prompts.shape[1]:], tokenizer)  # (generate returns prompt + continuation)


def template_text(template: str) -> str:
    """A chat template given as Jinja text, or as the path of a file holding it."""
    if "{" in template:
        return template
    path = Path(template).expanduser()
    if not path.is_file():
        raise InputError(f"{OPTION}.chat_template: {template!r} is neither a Jinja template nor a file holding one")
    return path.read_text(encoding="utf-8")


def conversation_problem(messages: Any, predicting: bool) -> Optional[str]:
    """What is wrong with a conversation (a list of {role, content} messages), or None. After an optional system
    turn a conversation starts with the user's turn (the first reply answers it; a chat template cannot render
    the conversation before a first reply of the assistant); no user or assistant message is empty."""
    if not isinstance(messages, list) or not messages:
        return (f"must hold a non-empty list of messages {{\"role\": ..., \"content\": ...}}, got "
                f"{value_kind(messages) or 'null'}: {messages!r:.60}")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") is None:
            return f"message {number} must be an object with a role and a content, got {message!r:.60}"
        if message["role"] not in ROLES:
            return f"message {number} has the role {message['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return (f"message {number} ({message['role']}) must have a string content, got "
                    f"{value_kind(message.get('content')) or 'null'}: {message.get('content')!r:.40}")
        if message["role"] != "system" and not message["content"].strip():
            return f"message {number} ({message['role']}) is empty ({message['content']!r})"
    roles = [message["role"] for message in messages]
    if predicting and "user" not in roles:
        return "has no user turn to reply to"
    if not predicting and "assistant" not in roles:
        return "has no assistant turn to train on"
    first = 1 if roles[0] == "system" else 0
    if roles[first] != "user":
        return (f"starts with the {roles[first]}'s turn (message {first + 1}); after an optional system turn a "
                "conversation starts with the user's")
    return None


def difference(found: str, expected: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    start = max(at - 20, 0)
    return f"{found[start:at + 30]!r} where {expected[start:at + 30]!r} was expected"


def require_decoder(config: PretrainedConfig, tokenizer: Any, training: str) -> None:
    """Refuse an encoder-decoder backbone for a task that trains a decoder-only LM (`training`: what it does)."""
    if config.is_encoder_decoder:
        raise InputError(f"model.backbone: {tokenizer.name_or_path!r} is an encoder-decoder model; {training} trains a "
                         "decoder-only (causal) LM, e.g. SmolLM2, Llama, Qwen or GPT-2")


def prompt_ends(prompts: list[list[int]], max_length: int) -> list[list[int]]:
    """Prompts longer than max_length keep their last tokens, where the reply starts (with a warning)."""
    long = sum(len(ids) > max_length for ids in prompts)
    if long:
        rank_zero_warn(f"{long} of {len(prompts)} prompts are longer than {task_option('max_length')}="
                       f"{max_length} tokens; they keep their last {max_length}")
    return [ids[-max_length:] for ids in prompts]


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    rows = [[value] * (longest - len(s)) + s if left else s + [value] * (longest - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


def prompt_batch(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts padded on the left, so that generation continues each from its last token."""
    return {"prompt_ids": pad(prompts, pad_id, left=True),
            "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, left=True)}


def sequence_batch(sequences: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences and their labels padded on the right (padding out of the loss)."""
    return {"input_ids": pad(sequences, pad_id), "attention_mask": pad([[1] * len(s) for s in sequences], 0),
            "labels": pad(labels, IGNORE)}


def decoded_texts(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    """Token rows as texts, without special tokens and surrounding whitespace."""
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


# --- prompts and completions of the tasks that score a decoder's replies (preference tuning, KTO, GRPO) ------
def completion_problem(value: Any) -> Optional[str]:
    """What is wrong with a `chosen` or `rejected` value, or None."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            return f"holds a message of the role {value[0].get('role')!r}; a completion is the assistant's reply"
        value = value[0].get("content")
    elif not isinstance(value, str):
        return (f"must hold the assistant's reply: a text, or a list of one {{\"role\": \"assistant\", \"content\": "
                f"...}} message; got {value_kind(value) or 'null'}: {value!r:.60}")
    if not isinstance(value, str) or not value.strip():
        return f"is an empty completion ({value!r:.40})"
    return None


def reply_text(value: Any) -> str:
    return value if isinstance(value, str) else value[0]["content"]


def prompt_problem(prompt: Any) -> Optional[str]:
    """What is wrong with a prompt (a text, or a conversation ending with a user turn), or None."""
    problem = None if isinstance(prompt, str) else conversation_problem(prompt, predicting=True)
    if problem is None and not isinstance(prompt, str) and prompt[-1]["role"] != "user":
        problem = "must end with a user turn (the completions are the reply to it)"
    return problem


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as a conversation: a text is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        [{"role": m["role"], "content": m["content"]} for m in prompt]


def fitted(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """A prompt and its completions cut to `max_length` tokens per sequence: the prompt keeps its end (at least half
    of max_length), each completion its start."""
    longest = max(len(c) for c in completions)
    prompt = prompt[-max(max_length - longest, max_length // 2):]
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions]
