"""`moe-lm generate` (moe_lm/generate.py): text from a run or an export, through the transformers export, streamed."""

import pytest
import torch

from moe_lm.checkpoint import CheckpointError
from moe_lm.export.hf import export_hf
from moe_lm.generate import generate, is_hf_folder
from tests.export.test_hf_export import trained_runs

PROMPT = "alpha beta gamma"  # words of the corpus the runs were trained on


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see test_hf_export.one_thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


def test_generate_from_a_run_streams_the_text_it_returns(runs, capsys):
    text = generate(runs / "mpi", PROMPT, max_new_tokens=12, temperature=0)
    streamed = capsys.readouterr().out
    assert streamed.startswith(PROMPT) and streamed.rstrip("\n").endswith(text)
    assert len(text) > 0


@pytest.mark.parametrize("router", ["softmax_topk", "grmoe"])  # a Mixtral export and a remote-code one
def test_generate_from_an_export_gives_the_text_of_its_run(runs, tmp_path, router):
    export_hf(runs / router, tmp_path / "hf")
    assert is_hf_folder(tmp_path / "hf") and not is_hf_folder(runs / router)
    from_run = generate(runs / router, PROMPT, max_new_tokens=10, temperature=0, stream=False)
    assert generate(tmp_path / "hf", PROMPT, max_new_tokens=10, temperature=0, stream=False) == from_run


def test_sampling_is_reproducible_with_a_seed_and_changes_with_it(runs, tmp_path):
    export_hf(runs / "grmoe", tmp_path / "hf")

    def sample(seed):
        return generate(tmp_path / "hf", PROMPT, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=seed,
                        stream=False)
    first = sample(0)
    assert sample(0) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_generate_says_why_it_cannot_read_a_folder_that_is_neither_a_run_nor_an_export(tmp_path):
    with pytest.raises(CheckpointError):
        generate(tmp_path, PROMPT, stream=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(tmp_path, PROMPT, top_p=0)


def test_cli_generate_streams_the_text(runs, capsys):
    from tests.export.test_hf_export import require_cli

    require_cli("generate", "--top-p")
    from moe_lm.cli import main

    main(["generate", str(runs / "grmoe"), "--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0.7",
          "--top-p", "0.9", "--seed", "3"])
    expected = generate(runs / "grmoe", PROMPT, max_new_tokens=6, temperature=0.7, top_p=0.9, seed=3, stream=False)
    assert capsys.readouterr().out.rstrip("\n") == PROMPT + expected
