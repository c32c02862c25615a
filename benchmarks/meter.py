"""The measurements every benchmark takes inside a measured process: the step meter (real, non-padding tokens/s
of training steps, their wall time, peak memory), the generation meter, the machine's matmul peak, and the
resident-memory sampler of a single step."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from benchmarks.harness import REPO, since_command_start

IGNORE = -100  # the label of a position outside the loss
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE_MB


def dir_size_mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


class StepMeter:
    """Training steps: `warmup` steps, then `timed` steps whose figures count, then `sync_steps` steps run (on a
    GPU) under `torch.cuda.set_sync_debug_mode("warn")`, each host-device sync warning counted.

    Every system tells it the same things: `begin_step()`, `record(batch)` for the batch of each training forward
    (one per step here: input_ids, and attention_mask, or position_ids for packed rows, and token labels when
    the loss is over tokens), `end_step(loss)`. Token counts stay tensors until the figures are asked for, and the
    device is synchronised only where the timed steps begin and end, so that measuring adds no host-device sync.
    """

    def __init__(self, warmup: int = 1, timed: int = 0, sync_steps: int = 0, pad_id: Optional[int] = None) -> None:
        import torch

        assert warmup >= 1, "the timed steps start at the end of a warm-up step"
        self.cuda = torch.cuda.is_available()
        self.warmup, self.timed, self.sync_steps = warmup, timed, sync_steps
        self.pad_id = pad_id  # (packed rows: their padding is found by the pad id)
        self.ends: list[float] = []
        self.batches: list[tuple[int, Any, int, Any]] = []  # (rows, real tokens, computed tokens, target tokens)
        self.losses: list[Any] = []
        self.first_step_s: Optional[float] = None
        self.catcher: Optional[warnings.catch_warnings] = None
        self.warnings: list[warnings.WarningMessage] = []

    def record(self, batch: dict[str, Any]) -> None:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
        computed = ids.numel()
        if mask is not None:
            real = mask.sum()
        elif "position_ids" in batch:
            real = computed - self.row_end_padding(ids, batch["position_ids"])
        else:
            real = computed
        targets = (labels[:, 1:] != IGNORE).sum() if labels is not None and labels.dim() == 2 else 0
        self.batches.append((ids.shape[0], real, computed, targets))

    def row_end_padding(self, ids: Any, positions: Any) -> int:
        """Padding of packed rows: the pad tokens that end a row, less the first of them if it continues an
        example (its end-of-turn token, which is also the pad token); padding restarts the position ids."""
        padding = 0
        for row, row_positions in zip(ids.tolist(), positions.tolist()):
            start = len(row)
            while start > 0 and row[start - 1] == self.pad_id:
                start -= 1
            if start < len(row) and row_positions[start] != 0:
                start += 1
            padding += len(row) - start
        return padding

    def begin_step(self) -> None:
        if len(self.ends) == self.warmup + self.timed and self.sync_steps and self.cuda:
            import torch

            self.catcher = warnings.catch_warnings(record=True)
            self.warnings = self.catcher.__enter__()
            warnings.simplefilter("always")  # (inside the catcher only: every occurrence, not once per line)
            torch.cuda.set_sync_debug_mode("warn")

    def end_step(self, loss: Any = None) -> None:
        step = len(self.ends)
        if step in (self.warmup - 1, self.warmup + self.timed - 1) and self.cuda:
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if self.first_step_s is None:
            self.first_step_s = since_command_start()
        if loss is not None:
            self.losses.append(loss)
        if step == self.warmup + self.timed + self.sync_steps - 1 and self.catcher is not None:
            import torch

            torch.cuda.set_sync_debug_mode(0)
            self.catcher.__exit__(None, None, None)
            self.catcher = None

    def real_tokens(self) -> float:
        """The real tokens of every step so far."""
        return float(sum(b[1] for b in self.batches))

    def result(self, matmul_params: int = 0, head_params: int = 0) -> dict[str, Any]:
        """Figures over the timed steps. Model FLOP/s with `matmul_params`: 4 N per computed token (forward 2N +
        backward through the frozen weights 2N) plus 4 N_head per target token (an output layer needed at target
        positions only)."""
        end = self.warmup + self.timed
        assert len(self.ends) >= end and len(self.batches) >= end, (len(self.ends), len(self.batches), end)
        seconds = self.ends[end - 1] - self.ends[self.warmup - 1]
        timed = self.batches[self.warmup:end]
        rows, real, computed, targets = (float(sum(b[i] for b in timed)) for i in range(4))
        every = self.batches[:len(self.ends)]
        figures: dict[str, Any] = {
            "steps_timed": self.timed, "seconds": seconds, "step_ms": 1000 * seconds / self.timed,
            "samples_per_s": rows / seconds, "real_tokens_per_s": real / seconds,
            "padding_fraction": 1 - real / computed, "startup_to_first_step_s": self.first_step_s,
            "computed_tokens_per_step": statistics.mean(b[2] for b in every),
            "target_tokens_per_step": statistics.mean(float(b[3]) for b in every), "peak_rss_mb": peak_rss_mb(),
        }
        if matmul_params:
            flops = 4 * matmul_params * computed + 4 * head_params * targets
            figures.update(gflops_per_s=flops / seconds / 1e9, matmul_params=matmul_params)
        if self.losses:
            losses = [float(loss) for loss in self.losses]
            figures.update(last_loss=losses[-1], mean_loss=statistics.mean(losses), losses=losses)
        if self.cuda:
            import torch

            figures.update(peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                           gpu=torch.cuda.get_device_name(0))
        if self.cuda and self.sync_steps:
            syncs = [w for w in self.warnings if "synchroniz" in str(w.message)]
            sites = Counter(f"{Path(w.filename).relative_to(REPO) if w.filename.startswith(str(REPO)) else w.filename}"
                            f":{w.lineno}" for w in syncs)
            figures.update(syncs_per_step=len(syncs) / self.sync_steps, sync_sites=dict(sites.most_common(8)))
        return figures


def matmul_weights(model: Any) -> tuple[int, int]:
    """(the weights of the linear layers every token goes through: the backbone's, not a pooler's, which runs
    once per sequence, nor LoRA's, ~1% of them; the output layer's, which a causal LM needs per target token)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    per_token = sum(m.weight.numel() for name, m in base.base_model.named_modules()
                    if isinstance(m, nn.Linear) and "lora_" not in name and "pooler" not in name)
    head = base.get_output_embeddings()
    return per_token, head.weight.numel() if head is not None else 0


def trainable_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class GenerationMeter:
    """Times a system's generation (`start` to `stop`) and wraps its model's `generate` meanwhile: counts the
    sequences, and the tokens each generated up to and including its first stop token (not the padding after it).
    The stop tokens: the model's and tokenizer's end-of-sequence tokens and `stop_tokens`. With `seed`, torch's
    generator is seeded before the first call, so that sampling draws the same numbers in every system."""

    def __init__(self, stop_tokens: tuple[str, ...] = (), seed: Optional[int] = None) -> None:
        self.stop_tokens, self.seed = stop_tokens, seed
        self.sequences = self.tokens = 0
        self.stop_ids: list[int] = []
        self.began = self.ended = 0.0

    def start(self, model: Any, tokenizer: Any) -> None:
        import torch

        ends = model.generation_config.eos_token_id
        ids = {*(ends if isinstance(ends, list) else [ends]), tokenizer.eos_token_id,
               *tokenizer.convert_tokens_to_ids(list(self.stop_tokens))}
        self.stop_ids = sorted(i for i in ids if i is not None)
        original = model.generate
        # (a decoder-only model returns prompt + continuation; an encoder-decoder the decoder's start token first)
        encoder_decoder = model.config.is_encoder_decoder

        def generate(*args: Any, **kwargs: Any) -> Any:
            if self.seed is not None and not self.sequences:
                torch.manual_seed(self.seed)
            output = original(*args, **kwargs)
            new = output[:, 1 if encoder_decoder else kwargs["input_ids"].shape[1]:]
            stopped = torch.isin(new, torch.tensor(self.stop_ids, device=new.device))
            lengths = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1])
            self.sequences += len(new)
            self.tokens += int(lengths.sum())
            return output

        model.generate = generate
        self.began = time.perf_counter()

    def stop(self) -> None:
        self.ended = time.perf_counter()

    def result(self) -> dict[str, Any]:
        seconds = self.ended - self.began
        return {"seconds": seconds, "sequences": self.sequences, "generated_tokens": self.tokens,
                "sequences_per_s": self.sequences / seconds, "tokens_per_s": self.tokens / seconds,
                "tokens_per_sequence": self.tokens / max(self.sequences, 1), "peak_rss_mb": peak_rss_mb()}


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10, dtype: str = "float32") -> dict[str, Any]:
    """Dense matmul GFLOP/s of this machine in `dtype` with `threads` threads (best and median of `repeats`)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {"matmul_gflops_per_s": 2 * n**3 / min(times) / 1e9,
            "matmul_gflops_per_s_median": 2 * n**3 / statistics.median(times) / 1e9, "n": n}


class PeakSampler:
    """The highest resident memory seen every millisecond while it runs."""

    def __enter__(self) -> PeakSampler:
        self.peak, self.running = rss_mb(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_mb())
