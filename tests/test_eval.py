import math

import torch
import torch.nn.functional as F
from conftest import tiny_model

from wisparse.eval.cache import ResultCache
from wisparse.eval.perplexity import perplexity
from wisparse.eval.report import markdown_table, write_results
from wisparse.eval.sparsity import SparsityMeter
from wisparse.sparsify import build_config, sparsify_, uniform_allocation


def test_perplexity_is_exp_of_mean_next_token_nll():
    model = tiny_model("llama")
    windows = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128), windows[:, 1:].reshape(-1))
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert math.isclose(result["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    assert result["tokens"] == 3 * 19 and result["sparsity"] == {}


def test_model_level_sparsity_is_weighted_by_parameter_count():
    model = tiny_model("llama")  # GQA: k/v are half the size of q
    sparsities = {n: (0.5 if n.endswith(("k_proj", "v_proj")) else 0.0) for n in
                  uniform_allocation(model, "wina", 0.0)}
    sparsify_(model, build_config(model, None, "wina", "topk", sparsities))
    with SparsityMeter(model) as meter, torch.no_grad():
        model(torch.randint(0, 128, (1, 16)))
    report = meter.report()
    numel = {n: model.get_submodule(n).weight.numel() for n in sparsities}
    expected = sum(numel[n] * s for n, s in sparsities.items()) / sum(numel.values())
    assert abs(report["model"] - expected) < 1e-6
    assert report["by_type"]["k_proj"] == 0.5 and report["by_type"]["q_proj"] == 0.0


def test_result_cache_resumes(tmp_path):
    cache = ResultCache(tmp_path / "c.jsonl")
    cache.put({"a": 1}, {"ppl": 3.0})
    assert ResultCache(tmp_path / "c.jsonl").get({"a": 1}) == {"ppl": 3.0}
    assert ResultCache(tmp_path / "c.jsonl").get({"a": 2}) is None


def test_report_files(tmp_path):
    rows = [{"method": "teal", "mode": "threshold", "allocation": "uniform", "sparsity_nominal": 0.5,
             "sparsity_realised": 0.498, "ppl": 33.1}]
    json_path, md_path = write_results(tmp_path / "r", {"device": "cpu"}, rows, "title")
    assert "| teal | threshold | uniform | 0.500 | 0.498 | 33.10 |" in md_path.read_text()
    assert markdown_table(rows).count("\n") == 2 and json_path.exists()


def test_table_rows_are_cached_and_wisparse_rows_get_a_development_perplexity(tmp_path, builtin, data_dir):
    import transformers

    from wisparse.eval.table import ppl_table

    _, tokenizer = builtin
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    runs = [("teal", "topk", 0.5), ("wisparse", "topk", 0.5)]
    common = dict(data_dir=data_dir, eval_windows=1, calib_windows=1, window_len=32, selection_windows=2,
                  alpha_search="global", dev_windows=1, progress=False, log=lambda line: None)
    cache = ResultCache(tmp_path / "rows.jsonl")
    teal, ours = ppl_table(model, tokenizer, runs, cache=cache, **common)
    assert "dev_ppl" not in teal and math.isfinite(ours["dev_ppl"]) and ours["dev_ppl"] != ours["ppl"]
    assert abs(ours["sparsity_realised"] - 0.5) < 0.02
    again = ppl_table(model, tokenizer, runs, cache=ResultCache(tmp_path / "rows.jsonl"), **common)
    assert again == [teal, ours]
