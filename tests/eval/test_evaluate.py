"""`moe-lm eval` (moe_lm/eval/evaluate.py): the perplexity of a trained checkpoint, for every router, on 3-step runs
(`trained_runs`, shared on disk with tests/export)."""

import json
import math

import pytest
import torch

from moe_lm.eval.evaluate import evaluate, text_windows
from moe_lm.export.hf import export_hf
from tests.export.test_hf_export import ROUTERS, trained_runs
from tests.checkpoint.test_checkpoint import WORDS

TEXT = "".join(" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) + "\n" for i in range(30))

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second intra-op thread only adds waiting


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


@pytest.mark.parametrize("router", ROUTERS)
def test_eval_gives_every_router_the_validation_loss_the_trainer_reported(runs, tmp_path, router):
    # the trainer's last validation: eval_batches=1 micro-batch of 2 sequences, the first of the split, with capacity
    report = evaluate(runs / router, tmp_path, num_samples=2, batch_size=2)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    summary = json.loads((runs / router / "summary.json").read_text())
    assert report["router"] == router and report["samples"] == 2 and report["tokens"] == 2 * 32
    assert report["loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert 1 <= report["active_experts"] <= 4
    assert 0 <= report["drop_frac"] < 1


def test_eval_writes_into_the_run_folder_by_default(runs):
    report = evaluate(runs / "mpi" / "checkpoints", num_samples=1)  # a checkpoints folder: its run
    assert json.loads((runs / "mpi" / "eval.json").read_text())["loss"] == report["loss"]


def test_dropless_eval_on_a_text_file_is_the_loss_of_the_exported_model_on_that_text(runs, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    report = evaluate(runs / "grmoe", tmp_path, text=text, dropless=True)
    windows = text_windows(text, runs / "data" / "tokenizer", 32)
    assert report["samples"] == len(windows) > 1 and report["data"] == str(text) and report["dropless"]
    assert report["drop_frac"] == 0
    export_hf(runs / "grmoe", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        losses = [model(ids, labels=ids).loss for ids in (torch.from_numpy(windows.window(i))[None]
                                                          for i in range(len(windows)))]
    assert report["loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-4)


def test_cli_eval_writes_eval_json_for_any_router(runs, tmp_path, capsys):
    from moe_lm.cli import main

    main(["eval", str(runs / "softmax_topk"), "--samples", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "eval.json").read_text())["router"] == "softmax_topk"
    assert "eval.json" in capsys.readouterr().out
