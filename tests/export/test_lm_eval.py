"""The exported folder under lm-evaluation-harness's `hf` model type, with moe-lm's log-likelihoods (skipped when
lm-eval is not installed: `pip install -e ".[lm-eval]"`).

The lm-eval tasks are local: task YAMLs over a jsonl file written by the test, nothing from the hub.
"""

import json
import math

import pytest
import torch

from moe_lm.checkpoint import load_model
from moe_lm.eval.evaluate import make_dropless
from moe_lm.export.hf import export_hf
from tests.checkpoint.test_checkpoint import WORDS
from tests.export.test_hf_export import trained_runs

DOCS = [{"context": " ".join(WORDS[i:i + 4]), "choices": [WORDS[i + 4], "banana", f"{WORDS[i]} {WORDS[i]}"],
         "label": 0, "continuation": f" {WORDS[i + 4]}", "text": " ".join(WORDS[i:i + 8])} for i in range(5)]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second intra-op thread only adds waiting


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


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
