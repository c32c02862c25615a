"""The model a server hosts, in its one inference worker: the base model loaded once, each LoRA adapter beside it,
and the answers to /predict rows and chat requests, through the one predict path (`finetune.pipeline`)."""

import copy
import dataclasses
import json
import queue
import threading
from typing import Any, Iterator, Optional

from finetune.checkpointing import load_module
from finetune.errors import InputError
from finetune.pipeline import predict_rows
from finetune.precision import autocast
from finetune.serve.adapters import flag_of
from finetune.serve.checks import ChatWork

#: Rows of one /predict request are run in passes of at most this many features.
PASS_SIZE = 32


class Routed:
    """The model as a task's hooks call it, with keyword arguments added to every forward and generate call
    (PEFT's `adapter_names` for a batch of several adapters; a streamer), and each `generate` call recorded (the
    keyword arguments the task passed, the output): what a chat answer reports as its usage comes from there."""

    def __init__(self, model: Any, forward: dict[str, Any], generate: dict[str, Any]) -> None:
        self.model, self.forward_kwargs, self.generate_kwargs = model, forward, generate
        self.generated: list[tuple[dict[str, Any], Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs, **self.forward_kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        output = self.model.generate(*args, **kwargs, **self.forward_kwargs, **self.generate_kwargs)
        self.generated.append(({"input_ids": args[0], **kwargs} if args else kwargs, output))
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class Hosted:
    """The base model loaded once, every adapter beside it, and each adapter's task."""

    def __init__(self, adapters: list[tuple[str, str]], merge: bool = False, device: str = "cpu") -> None:
        import torch
        from peft import PeftModel

        from finetune.pipeline import settle_task

        (first, ckpt), others = adapters[0], adapters[1:]
        module = load_module(ckpt)
        self.tokenizer = module.tokenizer
        model = module.model
        self.tasks = {first: module.task}
        #: adapter -> PEFT's name of it
        self.peft_names = {first: "default"} if isinstance(model, PeftModel) else {}
        for number, (name, path) in enumerate(others, start=1):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            self.tasks[name] = settle_task(checkpoint["hyper_parameters"]["task"], module.backbone_config,
                                           self.tokenizer)
            self.peft_names[name] = f"adapter{number}"
            add_adapter(model, f"adapter{number}", checkpoint, name)
        if merge and isinstance(model, PeftModel):
            model = model.merge_and_unload()
            self.peft_names = {}
        self.model = model.to(device).eval()
        self.device = device
        self.compute_dtype = module.compute_dtype  # (the backbone's: the forward autocasts to it, as in training)

    def routed(self, adapters: list[str], **generate: Any) -> Routed:
        """The model for a batch whose rows are of these adapters."""
        if len(set(self.peft_names.values())) > 1:
            return Routed(self.model, {"adapter_names": [self.peft_names[a] for a in adapters]}, generate)
        return Routed(self.model, {}, generate)

    def groups(self, keys: list[Any]) -> list[list[int]]:
        """Indices of equal keys (adapters of equal task options, and decoding options): they share passes."""
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(i)
        return list(groups.values())

    def predict(self, items: list[tuple[str, dict]]) -> list[dict]:
        """[(adapter, row)] -> one prediction row each, exactly as `finetune predict` writes them."""
        results: list[Optional[dict]] = [None] * len(items)
        for members in self.groups([self.tasks[adapter].config() for adapter, _ in items]):
            adapters, rows = [items[i][0] for i in members], [items[i][1] for i in members]
            with autocast(self.device, self.compute_dtype):
                predictions = predict_rows(self.tasks[adapters[0]], self.model, self.tokenizer, rows, PASS_SIZE,
                                           self.device, lambda batch: self.routed([adapters[i] for i in batch]))
            for i, prediction in zip(members, predictions):
                results[i] = prediction
        return results  # type: ignore[return-value]

    def chat(self, works: list[ChatWork]) -> Iterator[list[dict]]:
        """Chat requests -> per step, one message per request: `{"content": delta}` while streaming, `{}` when it has
        nothing new, and last `{"content": rest, "finish_reason", "usage"}`. A reply's deltas joined are what
        `finetune predict` generates for its row (with the request's decoding options)."""
        keys = [[self.tasks[work.adapter].config(), work.generation] for work in works]
        for members in self.groups(keys):
            for messages in self.chat_group([works[i] for i in members]):
                out = [{} for _ in works]
                for i, message in zip(members, messages):
                    out[i] = message
                yield out

    def chat_group(self, works: list[ChatWork]) -> Iterator[list[dict]]:
        task = self.tasks[works[0].adapter]
        task = task.with_options(generation=dataclasses.replace(task.generation, **works[0].generation))
        steps: queue.Queue = queue.Queue()
        streamer = StepStreamer(steps) if any(w.stream for w in works) and task.generation.num_beams == 1 else None
        models: list[tuple[list[int], Routed]] = []  # (the batch's rows, its model): one batch of every request

        def model_for(rows: list[int]) -> Routed:
            models.append((rows, self.routed([works[i].adapter for i in rows],
                                             **({"streamer": streamer} if streamer else {}))))
            return models[-1][1]

        outcome: dict[str, Any] = {}

        def run() -> None:
            try:  # (autocast is per thread: entered in this one)
                with autocast(self.device, self.compute_dtype):
                    outcome["predictions"] = predict_rows(task, self.model, self.tokenizer, [w.row for w in works],
                                                          len(works), self.device, model_for)
            except BaseException as err:  # (raised again below, in the worker's loop, which answers 500)
                outcome["error"] = err
            finally:
                steps.put(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        tokens: list[list[int]] = [[] for _ in works]
        sent = ["" for _ in works]
        while (step := steps.get()) is not None:
            ((rows, _),) = models
            deltas: list[dict] = [{} for _ in works]
            for i, token in zip(rows, step):
                tokens[i].append(token)
                if works[i].stream:
                    text = self.tokenizer.decode(tokens[i], skip_special_tokens=True).strip()
                    if text.startswith(sent[i]) and not text.endswith("\ufffd") and text != sent[i]:
                        deltas[i], sent[i] = {"content": text[len(sent[i]):]}, text
            if any(deltas):
                yield deltas
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        ((rows, model),) = models
        last = [{} for _ in works]
        for j, (i, (prompt, completion, finish)) in enumerate(zip(rows, self.usage(model))):
            text = outcome["predictions"][i]["generated_text"]
            last[i] = {"content": text[len(sent[i]):] if text.startswith(sent[i]) else "", "finish_reason": finish,
                       "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}}
        yield last

    def usage(self, model: Routed) -> list[tuple[int, int, str]]:
        """(prompt tokens, completion tokens, finish reason) of each row of a batch, from its `generate` call: the
        tokens generated before the stop token, and "stop" when one ended the row, else "length" (it reached
        max_new_tokens)."""
        ((kwargs, output),) = model.generated
        mask = kwargs.get("attention_mask")
        prompts = mask.sum(dim=1).tolist() if mask is not None else [kwargs["input_ids"].shape[1]] * len(output)
        start = 1 if self.model.config.is_encoder_decoder else kwargs["input_ids"].shape[1]  # (decoder start token)
        stops = kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        stops = {stops} if isinstance(stops, int) else set(stops or ())
        usage = []
        for prompt, generated in zip(prompts, output[:, start:].tolist()):
            stop = next((n for n, token in enumerate(generated) if token in stops), None)
            usage.append((prompt, len(generated), "length") if stop is None else (prompt, stop, "stop"))
        return usage


class StepStreamer:
    """A transformers streamer (`put` / `end`) that queues each generation step's new tokens, one per row (the
    first `put`, the prompt, is skipped)."""

    def __init__(self, steps: queue.Queue) -> None:
        self.steps, self.prompt_seen = steps, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def add_adapter(model: Any, peft_name: str, checkpoint: dict, name: str) -> None:
    """Add a checkpoint's LoRA adapter (and its trained heads) to a PEFT model beside those it has."""
    settings = checkpoint["hyper_parameters"]["lora"]
    config = copy.deepcopy(model.peft_config["default"])
    config.r, config.lora_alpha, config.lora_dropout = settings["r"], settings["alpha"], settings["dropout"]
    config.use_dora, config.use_rslora = settings.get("use_dora", False), settings.get("use_rslora", False)
    if settings.get("target_modules") is not None:
        config.target_modules = settings["target_modules"]
    model.add_adapter(peft_name, config)
    saved = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    marker = f".{peft_name}."
    wanted = {key: key.replace(marker, ".default.") for key in model.state_dict() if marker in key}
    missing = sorted(source for source in wanted.values() if source not in saved)
    unused = sorted(set(saved) - set(wanted.values()))
    if missing or unused:
        raise InputError(f"{flag_of(name)}: its checkpoint does not fit the base model's adapter layout (missing: "
                         f"{missing[:3]}; unexpected: {unused[:3]}); were its LoRA settings (target_modules, "
                         "heads) another model's?")
    model.load_state_dict({key: saved[source] for key, source in wanted.items()}, strict=False)
