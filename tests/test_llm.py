"""Width pruning of language models: activation importances (wanda, flap with bias compensation),
and pruned Hugging Face models that generate, save and reload in a fresh process."""
import functools
import subprocess
import sys
import warnings

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def inputs(batch=4, length=16, seed=0):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def compile_llama(model, importance="flap", budget=0.6, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxprune.compile(model, budget, example_inputs={"input_ids": inputs(), "use_cache": False},
                               importance=importance, data=[inputs(seed=s) for s in range(1, 5)], **options)


@pytest.mark.parametrize("importance", ["wanda", "flap"])
def test_activation_importances_prune_heads_and_mlp_and_verify(importance):
    pruned = compile_llama(tiny_llama(), importance, budget=0.4, ignore=["*embed_tokens"])
    report = pruned.meta["fxprune"]
    assert report["verification"]["passed"]
    widths = {name: entry for name, entry in report["modules"].items()}
    assert len(widths["model.layers.0.mlp.down_proj"]["in"]) < 96          # intermediate channels went
    heads = [(len(widths[f"{a}.q_proj"]["out"]), len(widths[f"{a}.k_proj"]["out"]))
             for a in ("model.layers.0.self_attn", "model.layers.1.self_attn") if f"{a}.k_proj" in widths]
    # a key/value head (8 wide) goes with the 4 query heads that share it
    assert heads and all(k % 8 == 0 and q == 4 * k for q, k in heads)
    assert report["importance"]["calibration_batches"] == 4


def test_bias_compensation_adds_the_removed_inputs_mean_and_verifies_against_it():
    model = tiny_llama()
    compensated = compile_llama(model, "flap", bias_compensation=True, ignore=["*embed_tokens"])
    plain = compile_llama(model, "flap", ignore=["*embed_tokens"])
    layers = compensated.meta["fxprune"]["bias_compensation"]["layers"]
    assert "model.layers.0.mlp.down_proj" in layers and "bias_compensation" not in plain.meta["fxprune"]
    down = compensated.get_submodule("model.layers.0.mlp.down_proj")
    assert down.bias is not None and down.bias.abs().sum() > 0 and plain.get_submodule(
        "model.layers.0.mlp.down_proj").bias is None
    # same plan, different outputs: the shift is real, and verification (passed) checked it exactly
    assert compensated.meta["fxprune"]["modules"] == plain.meta["fxprune"]["modules"]
    ids = inputs()
    assert not torch.allclose(compensated(ids)["logits"], plain(ids)["logits"])


def test_pruned_llama_generates_saves_and_reloads_in_a_fresh_process(tmp_path):
    from fxprune.export.huggingface import load_pruned, save_pruned, to_huggingface
    model = tiny_llama()
    pruned = compile_llama(model, "wanda", bias_compensation=True)   # heads, MLP and the hidden size
    hf = to_huggingface(model, pruned)
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(hf(ids, use_cache=False).logits, pruned(ids)["logits"])
    assert hf.model.layers[0].mlp.down_proj.in_features < 96 and hf.model.embed_tokens.embedding_dim < 64
    prompt = ids[:1, :5]
    tokens = hf.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
    save_pruned(hf, str(tmp_path))
    assert load_pruned(str(tmp_path)).generate(prompt, max_new_tokens=8, do_sample=False).tolist() == tokens
    code = ("import torch; from fxprune.export.huggingface import load_pruned; "
            f"m = load_pruned({str(tmp_path)!r}); "
            f"print(m.generate(torch.tensor({prompt.tolist()}), max_new_tokens=8, do_sample=False).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == str(tokens)
    assert model.model.layers[0].mlp.down_proj.in_features == 96          # the user's model is untouched


def test_load_pruned_refuses_a_plain_checkpoint(tmp_path):
    from fxprune.export.huggingface import load_pruned
    tiny_llama().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="save_pruned"):
        load_pruned(str(tmp_path))


def test_bias_compensation_needs_calibration_data():
    with pytest.raises(fxprune.ConfigError, match="bias_compensation needs calibration data"):
        fxprune.compile(tiny_llama(), 0.6, example_inputs={"input_ids": inputs(), "use_cache": False},
                        bias_compensation=True)


class _CancellingHead(torch.nn.Module):
    """fc2's bias is large and fc3 takes the difference of its two outputs, so a float32 rounding of
    fc2's compensated bias is large against the output: what a trained LM's logits showed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2), torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.fc2.bias.fill_(3e4)
            self.fc3.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return self.fc3(self.fc2(torch.relu(self.fc1(x))))


def test_bias_compensation_is_verified_with_the_rounding_the_float32_bias_got():
    x = torch.randn(4, 8)
    data = [(torch.randn(4, 8) + 3.0, torch.zeros(4, 1)) for _ in range(4)]    # means far from zero
    pruned = fxprune.compile(_CancellingHead(), fxprune.Budget(params=0.6), example_inputs=(x,), importance="flap",
                             data=data, bias_compensation=True, round_to=1, ignore=["fc2"])
    assert pruned.meta["fxprune"]["verification"]["passed"]
    assert pruned.fc2.in_features < 16


def test_bias_compensation_takes_a_number_of_calibration_batches():
    x = torch.randn(4, 8)
    data = [(torch.randn(4, 8) + 3.0 * k, torch.zeros(4, 1)) for k in range(4)]    # each batch a different mean
    compile_with = functools.partial(fxprune.compile, _CancellingHead(), fxprune.Budget(params=0.6), example_inputs=(x,),
                                     importance="flap", data=data, round_to=1, ignore=["fc2"])
    first, every = compile_with(bias_compensation=1), compile_with(bias_compensation=4)
    assert first.meta["fxprune"]["verification"]["passed"] and every.meta["fxprune"]["verification"]["passed"]
    assert not torch.equal(first.fc2.bias, every.fc2.bias)     # the means of 1 and of 4 batches differ
    with pytest.raises(fxprune.ConfigError, match="bias_compensation"):
        compile_with(bias_compensation=0)


class _ConstantChannels(torch.nn.Module):
    """fc1's first 8 outputs ignore the input (zero weight rows, bias 2): constant channels with a mean
    and no fluctuation, the case FLAP's compensation restores exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[:8] = 0
            self.fc1.bias[:8] = 2.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_bias_compensation_restores_constant_channels_exactly_and_reports_their_mean_share():
    model = _ConstantChannels()
    data = [(torch.randn(16, 8), torch.zeros(16, 4)) for _ in range(4)]
    compile_with = functools.partial(fxprune.compile, model, fxprune.Budget(params=0.75), example_inputs=(data[0][0],),
                                     importance="flap", data=data, round_to=1)
    compensated, plain = compile_with(bias_compensation=True), compile_with()
    assert compensated.fc2.in_features == plain.fc2.in_features <= 12    # flap removed the constant channels
    share = compensated.meta["fxprune"]["bias_compensation"]["removed_inputs_mean_share"]["fc2"]
    assert share == pytest.approx(1.0)          # all they carried was their mean
    x = torch.randn(32, 8)                      # inputs compensation never saw
    torch.testing.assert_close(compensated(x), model(x))
    assert not torch.allclose(plain(x), model(x), atol=1e-3)
