"""transformers integration: tiny random-init models of each supported family, patched vs unpatched.

Nothing is downloaded: models come from configs, the tokenizer is trained here with `tokenizers`.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import layerzero as lz  # noqa: E402
from layerzero.integrations import transformers as lzt  # noqa: E402
from layerzero.state import runtime  # noqa: E402

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.2,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, extra config, reference attention implementation, LayerZero ops it must reach)
FAMILIES = {
    "llama": ("LlamaConfig", {}, "sdpa", {"attention", "norm.rms", "posenc.rope", "activation.swiglu"}),
    "mistral": ("MistralConfig", {"sliding_window": 4}, "sdpa",
                {"attention", "norm.rms", "posenc.rope", "activation.swiglu"}),
    "qwen2": ("Qwen2Config", {}, "sdpa", {"attention", "norm.rms", "posenc.rope", "activation.swiglu"}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "sdpa", {"attention", "norm.rms", "posenc.rope", "activation.swiglu"}),
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh",
                              "hidden_activation": "gelu_pytorch_tanh"}, "sdpa",
              {"attention", "norm.rms", "posenc.rope", "activation.geglu"}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 4, "attn_logit_softcapping": 1.5,
                                "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16,
                                "hidden_activation": "gelu_pytorch_tanh"}, "eager",
               {"attention", "norm.rms", "posenc.rope", "activation.geglu"}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5}, "sdpa",
             {"attention", "norm.rms", "posenc.rope", "activation.swiglu"}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 128,
                            "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}, "sdpa",
             {"attention", "norm.layer", "activation.gelu"}),
}


def make_model(family: str, attn: str | None = None, seed: int = 0) -> transformers.PreTrainedModel:
    config_name, extra, reference_attn, _ = FAMILIES[family]
    kwargs = extra if family == "gpt2" else {**COMMON, **extra}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn or reference_attn)
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    """Two prompts of 9 tokens, the second left-padded by 3."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def snapshot(model: torch.nn.Module) -> list[tuple[str, type, frozenset[str]]]:
    return [(name, type(m), frozenset(m.__dict__)) for name, m in model.named_modules()]


def ops_reached() -> set[str]:
    return {key[0] for key in runtime.plans.data}


def valid_logits(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return out[mask.bool()]  # padded query rows are not compared (they attend to nothing)


def generate(model: transformers.PreTrainedModel, inputs: dict[str, torch.Tensor], **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, output_logits=True, return_dict_in_generate=True, **kwargs)


def assert_same_generation(got, ref, greedy: bool, tol: float = 1e-4) -> None:
    """Two generate() runs of one model, `got` through LayerZero's kernels, `ref` through transformers'.

    Kernels may round differently, so bits are not compared: each step's logits agree within `tol`
    up to and including the first step whose tokens differ, and with greedy decoding such a token
    must be a near-tie of the reference's choice (its logit within rounding of the best one). With
    sampling or beams a different token fails the test: it needs a draw or beam score within
    rounding of a boundary (a chance of about 1e-5 per step at these logit differences).
    """
    start = ref.sequences.shape[1] - len(ref.logits)
    assert got.sequences.shape[1] - len(got.logits) == start
    for t, (g, r) in enumerate(zip(got.logits, ref.logits, strict=False)):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)
        g_tok, r_tok = got.sequences[:, start + t], ref.sequences[:, start + t]
        if not torch.equal(g_tok, r_tok):
            assert greedy, f"step {t}: tokens {g_tok.tolist()} != {r_tok.tolist()} without a greedy near-tie"
            rows = (g_tok != r_tok).nonzero().flatten()
            gap = r[rows, r_tok[rows]] - r[rows, g_tok[rows]]
            assert (gap.abs() <= 2 * tol * r[rows].abs().amax(-1).clamp_min(1.0)).all(), (t, gap)
            return
    assert torch.equal(got.sequences, ref.sequences)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_model_gives_the_same_logits_and_greedy_tokens(family: str):
    model = make_model(family)
    inputs = batch()
    before = snapshot(model)
    attn_before = model.config._attn_implementation
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = generate(model, inputs, max_new_tokens=6, do_sample=False)

    report = lzt.patch(model)
    assert model.config._attn_implementation == "layerzero"
    assert report.norms and report.mlps and (report.rope or family == "gpt2")
    with torch.no_grad():
        got = model(**inputs).logits
    tokens = generate(model, inputs, max_new_tokens=6, do_sample=False)
    assert ops_reached() >= FAMILIES[family][3]
    torch.testing.assert_close(valid_logits(got, inputs["attention_mask"]),
                               valid_logits(ref, inputs["attention_mask"]), rtol=1e-4, atol=1e-4)
    assert_same_generation(tokens, ref_tokens, greedy=True)

    lzt.unpatch(model)
    assert snapshot(model) == before
    assert model.config._attn_implementation == attn_before
    assert not lzt.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_softcap_and_sliding_window_reach_layerzero():
    model = make_model("gemma2")
    lzt.patch(model)
    with torch.no_grad():  # padded: every layer gets a mask (unmasked causal+softcap would compile flex on CPU)
        model(**batch())
    attention_keys = [k for k in runtime.plans.data if k[0] == "attention"]
    assert attention_keys and all(k[15] for k in attention_keys)  # softcap > 0 in every attention plan key
    assert all(k[11] is not None and k[11][1] == torch.bool for k in attention_keys)  # HF's bool masks


@pytest.mark.parametrize("mode", ["beam", "sample", "static", "static_beam"])
def test_generate_modes_match(mode: str):
    model = make_model("llama")
    inputs = batch()
    kwargs = {"beam": dict(num_beams=3, do_sample=False), "sample": dict(do_sample=True, top_k=20, temperature=0.9),
              "static": dict(do_sample=False, cache_implementation="static"),
              "static_beam": dict(num_beams=2, do_sample=False, cache_implementation="static")}[mode]

    def run():
        torch.manual_seed(123)
        return generate(model, inputs, max_new_tokens=5, **kwargs)

    ref = run()
    lzt.patch(model)
    assert_same_generation(run(), ref, greedy=mode == "static")
    assert "attention" in ops_reached()
    lzt.unpatch(model)


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    model = make_model("qwen2")
    inputs = batch()
    with torch.no_grad():
        ref = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="layerzero").eval()
    assert loaded.config._attn_implementation == "layerzero"
    with torch.no_grad():
        got = loaded(**inputs).logits
    assert "attention" in ops_reached()
    mask = inputs["attention_mask"]
    torch.testing.assert_close(valid_logits(got, mask), valid_logits(ref, mask), rtol=1e-5, atol=1e-5)
    loaded.set_attn_implementation("sdpa")
    assert loaded.config._attn_implementation == "sdpa"
    loaded.set_attn_implementation("layerzero")
    assert loaded.config._attn_implementation == "layerzero"


_FROM_CONFIG_AFTER_IMPORT = """
import sys
{before}
import layerzero as lz
from layerzero.state import runtime
assert "layerzero.integrations.transformers" not in sys.modules or {loaded}
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="layerzero").eval()
ids = torch.tensor([[1, 5, 9, 3]])
with torch.no_grad():
    got = model(ids).logits
    model.set_attn_implementation("sdpa")
    want = model(ids).logits
torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
print(sorted(key[0] for key in runtime.plans.data), type(sys.meta_path[0]).__name__)
"""


@pytest.mark.parametrize("before", ["", "import transformers", "import transformers.modeling_utils"],
                         ids=["layerzero_first", "transformers_package_first", "transformers_models_first"])
def test_attn_implementation_layerzero_works_after_import_layerzero_alone(before: str):
    """What the README says: `import layerzero`, then attn_implementation="layerzero"; no other import."""
    import subprocess
    import sys

    code = _FROM_CONFIG_AFTER_IMPORT.format(before=before, loaded="modeling_utils" in before)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plans, first_finder = out.stdout.split()[:-1], out.stdout.split()[-1]
    assert plans == ["['attention']"]  # the model's attention ran through lz.attention
    assert first_finder != "_AfterImport"  # the one-shot import hook removed itself


def test_attention_function_matches_sdpa_for_hf_masks():
    """attention_forward vs transformers' own sdpa function: no mask, causal, bool and additive masks, GQA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 8, 16, generator=g), torch.randn(2, 2, 8, 16,
                                                                                                       generator=g)
    bool_mask = torch.rand(2, 1, 5, 8, generator=g) > 0.3
    bool_mask[..., 0] = True
    float_mask = torch.zeros(2, 1, 5, 8).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask, kk, vv in ((None, k, v), (None, k[:, :, :5], v[:, :, :5]), (bool_mask, k, v), (float_mask, k, v),
                         (None, k, v)):
        expected, _ = sdpa_attention_forward(module, q, kk, vv, mask, scaling=0.3)
        got, weights = lzt.attention_forward(module, q, kk, vv, mask, scaling=0.3)
        assert weights is None and got.is_contiguous() and got.shape == (2, 5, 4, 16)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    one, _ = lzt.attention_forward(module, q[:, :, :1], k, v, None)  # decode step: attends to every key
    expected, _ = sdpa_attention_forward(module, q[:, :, :1], k, v, None)
    torch.testing.assert_close(one, expected, rtol=1e-5, atol=1e-5)


def test_pipeline_with_a_locally_trained_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    corpus = ["the quick brown fox jumps over the lazy dog", "a kernel for every op on every machine",
              "layer zero picks the fastest kernel and says why"] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>",
                                                                                      "<unk>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>", unk_token="<unk>")
    model = make_model("llama")

    prompts = ["the quick brown fox", "a kernel for"]
    lzt.patch(model)
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    texts = [o[0]["generated_text"] for o in pipe(prompts, max_new_tokens=5, do_sample=False)]
    ids = [o[0]["generated_token_ids"] for o in pipe(prompts, max_new_tokens=5, do_sample=False, return_tensors=True)]
    assert "attention" in ops_reached()
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts, strict=True))
    # the pipeline generates what generate() does on the same patched model; generate() itself is
    # compared with transformers' kernels in test_patched_model_gives_the_same_logits_and_greedy_tokens
    for prompt, got in zip(prompts, ids, strict=True):
        with torch.no_grad():
            direct = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=5, do_sample=False)
        assert list(got) == direct[0].tolist()
    lzt.unpatch(model)


def test_patch_selected_parts_and_twice():
    model = make_model("llama")
    report = lzt.patch(model, attention=False, mlp=False)
    assert model.config._attn_implementation == "sdpa"
    assert report.mlps == [] and report.norms and report.rope
    assert lzt.patch(model) is report  # patching a patched model is a no-op
    lzt.unpatch(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_errors():
    with pytest.raises(lz.InvalidInputError, match="model: expected a transformers PreTrainedModel, got Linear"):
        lzt.patch(torch.nn.Linear(2, 2))
    with pytest.raises(lz.InvalidInputError, match="model: expected a model patched by"):
        lzt.unpatch(make_model("llama"))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(lz.InvalidInputError, match="s_aux: expected None"):
        lzt.attention_forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_patched_model_on_gpu_bf16(family: str):
    model = make_model(family).to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in batch().items()}
    with torch.no_grad():
        ref = model(**inputs).logits.float()
        lzt.patch(model)
        got = model(**inputs).logits.float()
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    mask = inputs["attention_mask"]
    torch.testing.assert_close(valid_logits(got, mask), valid_logits(ref, mask), rtol=5e-2, atol=5e-2)
    assert tokens.shape == (2, 17)
    lzt.unpatch(model)
