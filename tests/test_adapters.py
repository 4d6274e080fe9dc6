import pytest
import torch
import transformers
from conftest import FAMILIES, tiny_model

from wisparse.calibration import BlockRunner
from wisparse.errors import WisparseError
from wisparse.models import adapter_for, supported_model_types


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_linear_projections_and_sites_share_inputs(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    names = adapter.projection_names(model)
    assert len(names) == 7 * model.config.num_hidden_layers
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().clone())) for n in names]
    model(torch.randint(0, 128, (1, 12)))
    for h in hooks:
        h.remove()
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    for site in adapter.sites:  # projections of one site read the very same activation
        first = inputs[f"{adapter.blocks_path}.0.{site.projections[0]}"]
        for p in site.projections[1:]:
            assert torch.equal(first, inputs[f"{adapter.blocks_path}.0.{p}"])


@pytest.mark.parametrize("family", FAMILIES)
def test_block_runner_and_adapter_logits_reproduce_the_model(family):
    model = tiny_model(family)
    windows = torch.randint(0, 128, (2, 40))
    runner = BlockRunner(model, windows)
    for index in range(len(runner.blocks)):
        runner.advance(index)
    adapter = adapter_for(model)
    with torch.no_grad():
        for window, hidden in zip(windows, runner.hidden):
            expected = model(input_ids=window[None], use_cache=False).logits
            torch.testing.assert_close(adapter.logits(model, hidden), expected, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_lists_supported_ones():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(WisparseError, match="unsupported architecture 'gpt2'") as err:
        adapter_for(model)
    for model_type in supported_model_types():
        assert model_type in str(err.value)
