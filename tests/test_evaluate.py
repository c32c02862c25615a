"""`finetune evaluate` and BenchmarkEvaluation: lm-eval on a checkpoint's model with its adapter in memory, on a
backbone and on the exported merged model, during a fit, offline, and the errors of bad input."""

import csv
import json
import math
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, SHARED, WORDS, write_jsonl
from finetune.cli import main, run
from finetune.errors import InputError
from finetune.evaluate import Benchmarks, evaluate, metric_values
from finetune.export import export
from finetune.testing import processes_env

pytest.importorskip("lm_eval")

CONFIGS = str(REPO / "configs" / "lm_eval")
TASKS = ["piqa_local", "gsm8k_local"]
POSITIVE, NEGATIVE, NEUTRAL = (WORDS[k] for k in ("pos", "neg", "neu"))


def toy_benchmark_data(path):
    """PIQA and GSM8K files in the shared data's layout, in the tiny tokenizer's words."""
    piqa = [{"goal": f"{POSITIVE[i]} {POSITIVE[i + 1]}", "sol1": f"{NEUTRAL[i]} {NEGATIVE[i]}",
             "sol2": f"{POSITIVE[i + 2]} {NEUTRAL[i]}", "label": i % 2} for i in range(8)]
    gsm8k = [{"question": f"{NEUTRAL[i]} {POSITIVE[i]} {i}", "answer": f"{NEGATIVE[i]}\n#### {i}",
              "final_answer": str(i)} for i in range(10)]
    (path / "piqa").mkdir(parents=True)
    (path / "gsm8k").mkdir()
    write_jsonl(path / "piqa" / "validation.jsonl", piqa)
    write_jsonl(path / "gsm8k" / "train.jsonl", gsm8k[:6])
    write_jsonl(path / "gsm8k" / "validation.jsonl", gsm8k[6:])
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return toy_benchmark_data(tmp_path_factory.mktemp("benchmark-data"))


def benchmarks(data_dir, **options):
    # (a random tiny model never writes "Question:", so it would generate lm-eval's 256 tokens for every answer)
    return Benchmarks(**{"tasks": TASKS, "include_path": CONFIGS, "data_dir": data_dir, "batch_size": 4,
                         "max_gen_toks": 24, **options})


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: nothing may download."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def trained(tiny_llama, data_dir, tmp_path_factory):
    """A 2-epoch LoRA instruction-tuning fit of the tiny Llama that runs PIQA at the end of every epoch."""
    root = tmp_path_factory.mktemp("fit")
    rows = [{"messages": [{"role": "user", "content": " ".join(POSITIVE[i:i + 3])},
                          {"role": "assistant", "content": " ".join(NEGATIVE[i:i + 3])}]} for i in range(6)]
    config = root / "benchmarks.yaml"
    config.write_text(json.dumps({"trainer": {"callbacks": [{
        "class_path": "finetune.benchmark_callback.BenchmarkEvaluation",
        "init_args": {"every_n_epochs": 1, "benchmarks": {"tasks": ["piqa_local"], "include_path": CONFIGS,
                                                          "data_dir": data_dir, "batch_size": 4}}}]}}))
    run(["fit", f"--config={config}", f"--model.backbone={tiny_llama}", "--model.task=InstructionTuning",
         f"--data.train_file={write_jsonl(root / 'train.jsonl', rows * 4)}", "--data.batch_size=8",
         "--model.optimizer.lr=0.02", "--trainer.max_epochs=2", f"--trainer.default_root_dir={root}",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0"])
    (run_dir,) = root.glob("version_*")
    (ckpt,) = run_dir.glob("checkpoints/*.ckpt")  # (after the last epoch)
    return run_dir, ckpt


def test_the_adapter_in_memory_gives_the_numbers_of_the_exported_merged_model(trained, tiny_llama, data_dir,
                                                                              tmp_path, no_network):
    run_dir, ckpt = trained
    adapter = evaluate(benchmarks(data_dir), ckpt_path=str(ckpt))
    assert json.loads((run_dir / "lm_eval" / f"{ckpt.stem}.json").read_text())["results"] == adapter["results"]
    export(str(ckpt), str(tmp_path / "export"), adapter=False)
    merged = evaluate(benchmarks(data_dir), backbone=str(tmp_path / "export" / "merged"),
                      output=str(tmp_path / "merged.json"))
    plain = evaluate(benchmarks(data_dir), backbone=tiny_llama)

    assert set(metric_values(adapter)) == {"eval/piqa_local/acc", "eval/piqa_local/acc_norm",
                                           "eval/gsm8k_local/exact_match/strict-match",
                                           "eval/gsm8k_local/exact_match/flexible-extract"}
    assert metric_values(adapter) == metric_values(merged)
    assert adapter["n-samples"]["piqa_local"] == {"original": 8, "effective": 8}
    # the same log-likelihood of every PIQA solution (to float32 rounding of W + BA), the same generated answers
    in_memory, exported, before = (
        [response[0][0] for sample in results["samples"]["piqa_local"] for response in sample["resps"]]
        for results in (adapter, merged, plain))
    assert in_memory == pytest.approx(exported, rel=1e-5, abs=1e-4)
    assert not in_memory == pytest.approx(before, rel=1e-3)  # (the adapter is in use)
    assert ([s["resps"] for s in adapter["samples"]["gsm8k_local"]]
            == [s["resps"] for s in merged["samples"]["gsm8k_local"]])


def test_benchmarks_during_a_fit_land_in_metrics_csv_with_the_numbers_of_finetune_evaluate(trained, data_dir):
    run_dir, ckpt = trained
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("eval/piqa_local/acc")]
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    assert all(0 <= float(row["eval/piqa_local/acc_norm"]) <= 1 for row in rows)
    # the last epoch's numbers are those of the checkpoint saved after it
    after = metric_values(evaluate(benchmarks(data_dir, tasks=["piqa_local"]),
                                   ckpt_path=str(ckpt), output=str(run_dir / "again.json")))
    assert float(rows[-1]["eval/piqa_local/acc"]) == pytest.approx(after["eval/piqa_local/acc"], abs=1e-6)
    assert float(rows[-1]["eval/piqa_local/acc_norm"]) == pytest.approx(after["eval/piqa_local/acc_norm"], abs=1e-6)


def test_bad_input_is_named(tiny_llama, data_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match=r"'piqa_locale' is not a task in .*lm_eval ls tasks"):
        benchmarks(data_dir, tasks="piqa_locale,gsm8k_local").check()
    partial = tmp_path / "partial"  # (PIQA's file, not GSM8K's)
    (partial / "piqa").mkdir(parents=True)
    shutil.copy(f"{data_dir}/piqa/validation.jsonl", partial / "piqa")
    with pytest.raises(InputError, match=r"tasks piqa_local, gsm8k_local: data file '.*/gsm8k/train.jsonl' does not"):
        benchmarks(str(partial)).check()
    with pytest.raises(InputError, match=r"read gsm8k/train.jsonl, gsm8k/validation.jsonl from a data directory"):
        benchmarks(None, tasks=["gsm8k_local"]).check()
    with pytest.raises(InputError, match="tasks: name at least one"):
        benchmarks(data_dir, tasks=[])
    with pytest.raises(InputError, match="include_path: 'nowhere' is not a directory"):
        benchmarks(data_dir, include_path="nowhere")
    with pytest.raises(InputError, match="fewshot_as_multiturn: needs apply_chat_template"):
        benchmarks(data_dir, fewshot_as_multiturn=True)
    with pytest.raises(InputError, match="--ckpt_path CKPT .* or --backbone NAME_OR_DIR"):
        evaluate(benchmarks(data_dir), ckpt_path="a.ckpt", backbone=tiny_llama)
    (tmp_path / "taken.json").write_text("{}")
    with pytest.raises(InputError, match="taken.json' exists"):
        evaluate(benchmarks(data_dir), backbone=tiny_llama, output=str(tmp_path / "taken.json"))
    assert (tmp_path / "taken.json").read_text() == "{}"

    with pytest.raises(SystemExit) as stopped:  # the command prints the message, not a traceback
        main(["evaluate", f"--backbone={tiny_llama}", "--tasks=piqa_local", f"--include_path={CONFIGS}",
              f"--data_dir={tmp_path}"])
    assert stopped.value.code == 2
    assert "piqa/validation.jsonl' does not exist" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # (as if not installed)
    with pytest.raises(InputError, match=r"needs lm-eval: pip install 'finetune\[eval\]'"):
        benchmarks(data_dir).check()


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "piqa").is_dir(), reason="needs ../shared/data")
def test_smollm2_piqa_equals_lm_evals_own_command_line_on_the_same_model_directory(smollm2, tmp_path):
    """SmolLM2-135M-Instruct on the first 40 rows of the shared PIQA: finetune evaluate and `lm_eval` agree."""
    path, _ = smollm2
    options = {"tasks": ["piqa_local"], "include_path": CONFIGS, "data_dir": str(SHARED / "data"), "limit": 40,
               "batch_size": 8}
    ours = metric_values(evaluate(Benchmarks(**options), backbone=path))
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={path},dtype=float32",
               "--tasks", "piqa_local", "--include_path", CONFIGS, "--metadata",
               json.dumps({"data_dir": str(SHARED / "data")}), "--limit", "40", "--batch_size", "8", "--device",
               "cpu", "--output_path", str(tmp_path / "lm_eval")]
    subprocess.run(command, check=True, capture_output=True)
    (written,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"]["piqa_local"]
    assert ours["eval/piqa_local/acc"] == theirs["acc,none"] and ours["eval/piqa_local/acc_norm"] == theirs[
        "acc_norm,none"]
    assert not math.isnan(ours["eval/piqa_local/acc"])


@pytest.mark.slow
def test_benchmarks_during_a_fit_in_two_processes_are_those_of_one(tiny_llama, data_dir, tmp_path):
    """DDP over gloo: the first process evaluates, every process logs its numbers; they are the checkpoint's."""
    rows = [{"messages": [{"role": "user", "content": " ".join(POSITIVE[i:i + 3])},
                          {"role": "assistant", "content": " ".join(NEGATIVE[i:i + 3])}]} for i in range(8)]
    config = tmp_path / "benchmarks.yaml"
    config.write_text(json.dumps({"trainer": {"callbacks": [{
        "class_path": "finetune.benchmark_callback.BenchmarkEvaluation",
        "init_args": {"benchmarks": {"tasks": ["piqa_local"], "include_path": CONFIGS, "data_dir": data_dir}}}]}}))
    env = processes_env(str(REPO))
    fit = subprocess.run(
        [sys.executable, "-m", "finetune", "fit", f"--config={config}", f"--model.backbone={tiny_llama}",
         "--model.task=InstructionTuning", f"--data.train_file={write_jsonl(tmp_path / 'train.jsonl', rows * 4)}",
         "--data.batch_size=4", "--model.optimizer.lr=0.02", "--trainer.max_epochs=2", "--trainer.accelerator=cpu",
         "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path}/two",
         "--trainer.enable_progress_bar=false", "--seed_everything=0"],
        env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (metrics,) = (tmp_path / "two").rglob("metrics.csv")
    logged = [row for row in csv.DictReader(metrics.open()) if row.get("eval/piqa_local/acc")]
    assert [int(row["epoch"]) for row in logged] == [0, 1]
    (ckpt,) = (tmp_path / "two").rglob("*.ckpt")
    one = metric_values(evaluate(benchmarks(data_dir, tasks=["piqa_local"]), ckpt_path=str(ckpt),
                                 output=str(tmp_path / "one.json")))
    for name in ("eval/piqa_local/acc", "eval/piqa_local/acc_norm"):
        assert float(logged[-1][name]) == pytest.approx(one[name], abs=1e-6), name
