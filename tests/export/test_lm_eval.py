"""Evaluation of a trained model: `moe-lm eval` (moe_lm/train/evaluate.py) for every router, and the exported folder
under lm-evaluation-harness's `hf` model type (skipped when lm-eval is not installed: `pip install -e ".[lm-eval]"`).

The lm-eval tasks are local: task YAMLs over a jsonl file written by the test, nothing from the hub.
"""

import json
import math

import pytest
import torch

from moe_lm.checkpoint import load_model
from moe_lm.export.hf import export_hf
from moe_lm.train.evaluate import evaluate, make_dropless, sweep, text_windows
from tests.checkpoint.test_checkpoint import WORDS
from tests.export.test_hf_export import ROUTERS, trained_runs

TEXT = "".join(" ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) + "\n" for i in range(30))
DOCS = [{"context": " ".join(WORDS[i:i + 4]), "choices": [WORDS[i + 4], "banana", f"{WORDS[i]} {WORDS[i]}"],
         "label": 0, "continuation": f" {WORDS[i + 4]}", "text": " ".join(WORDS[i:i + 8])} for i in range(5)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see test_hf_export.one_thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


# ---- moe-lm eval -------------------------------------------------------------------------------------------------

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


def test_eval_writes_into_the_run_folder_by_default(runs):
    report = evaluate(runs / "mpi" / "checkpoints", num_samples=1)  # a checkpoints folder: its run
    assert json.loads((runs / "mpi" / "eval.json").read_text())["loss"] == report["loss"]


def test_dropless_eval_on_a_text_file_is_the_loss_of_the_exported_model_on_that_text(runs, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    report = evaluate(runs / "grmoe", tmp_path, text=text, dropless=True)
    windows = text_windows(text, runs / "data" / "tokenizer", 32)
    assert report["samples"] == len(windows) > 1 and report["data"] == str(text) and report["dropless"]
    export_hf(runs / "grmoe", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        losses = [model(ids, labels=ids).loss for ids in (torch.from_numpy(windows.window(i))[None]
                                                          for i in range(len(windows)))]
    assert report["loss"] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-4)


def test_the_sweep_still_sweeps_grmoe_and_refuses_routers_without_knobs(runs, tmp_path):
    rows = sweep(runs / "grmoe", [1.0, 4.0], [0.0, 0.8], None, 2, tmp_path / "sweep")
    assert [(r["alpha"], r["tau"]) for r in rows] == [(1.0, 0.0), (4.0, 0.0), (1.0, 0.8), (4.0, 0.8)]
    assert {p.name for p in (tmp_path / "sweep").iterdir()} == {"sweep.csv", "sweep.json",
                                                                "ppl_vs_active_experts.png"}
    with pytest.raises(ValueError, match="no post-hoc knobs"):
        sweep(runs / "mpi", [1.0], [0.0], None, 2, tmp_path / "mpi_sweep")


# ---- lm-evaluation-harness ---------------------------------------------------------------------------------------

def write_tasks(folder):
    """Three local tasks over one jsonl: multiple choice (loglikelihood), generation, rolling perplexity."""
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\n")
    (folder / "choice.yaml").write_text(
        "task: moe_lm_choice\n" + source + "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    (folder / "generate.yaml").write_text(
        "task: moe_lm_generate\n" + source + "output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "rolling.yaml").write_text(
        "task: moe_lm_rolling\n" + source + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from moe-lm's own model, tokenized as lm-eval's `hf` model does."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_len = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(ids[:, :-1])[0].log_softmax(-1)[0]
    return sum(logprobs[t - 1, whole[t]].item() for t in range(context_len, len(whole)))


@pytest.mark.parametrize("router", ["softmax_topk", "grmoe"])  # a Mixtral export and a remote-code one
def test_the_exported_folder_runs_under_lm_eval_hf_with_moe_lm_loglikelihoods(runs, tmp_path, router):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    export_hf(runs / router, tmp_path / "hf")
    write_tasks(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
        tasks=["moe_lm_choice", "moe_lm_generate", "moe_lm_rolling"], device="cpu", batch_size=2,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    results = out["results"]
    assert 0 <= results["moe_lm_choice"]["acc,none"] <= 1
    assert 0 <= results["moe_lm_generate"]["exact_match,none"] <= 1
    assert math.isfinite(results["moe_lm_rolling"]["bits_per_byte,none"])

    model, _ = load_model(runs / router)
    make_dropless(model)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    for sample in out["samples"]["moe_lm_choice"]:  # arguments: the (context, " " + choice) requests lm-eval made
        expected = [continuation_loglikelihood(model, tokenizer, *request) for request in sample["arguments"]]
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(expected, abs=1e-4)


def test_cli_eval_writes_eval_json_for_any_router_and_sweeps_with_sweep(runs, tmp_path, capsys):
    from tests.export.test_hf_export import require_cli

    require_cli("eval", "--sweep")
    from moe_lm.cli import main

    main(["eval", str(runs / "softmax_topk"), "--samples", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "eval.json").read_text())["router"] == "softmax_topk"
    assert "eval.json" in capsys.readouterr().out
    main(["eval", str(runs / "grmoe"), "--sweep", "--alphas", "1", "--taus", "0", "--samples", "2",
          "--out", str(tmp_path / "sweep")])
    assert (tmp_path / "sweep" / "sweep.csv").read_text().count("\n") == 2
    with pytest.raises(SystemExit, match="no post-hoc knobs"):
        main(["eval", str(runs / "mpi"), "--sweep", "--samples", "1", "--out", str(tmp_path / "x")])
