"""Policy: file/env/code sources, every rule kind, conditions, precedence, validation, hot reload."""

from __future__ import annotations

import logging
import textwrap
import time

import pytest
import torch

import layerzero as lz
from layerzero.context import SelectionContext
from layerzero.policy.conditions import parse_condition, when_to_text
from layerzero.policy.loader import parse_policy_text
from layerzero.state import runtime

SEED_EXAMPLE = """\
version: "1.0"
locks:   [{operation: "attention.causal", backend: "flashinfer", condition: "sm >= 80 and batch_size >= 8"}]
allows:  [{operation: "attention.*", backends: ["flashinfer", "flash_attn"]}]
denies:  [{operation: "attention.*", backends: ["torch_sdpa"], condition: "batch_size > 1"}]
boosts:  [{operation: "attention.*", backend: "flashinfer", boost_factor: 2.0, condition: "seq_len > 2048"}]
"""


def torch_only() -> frozenset[str]:
    """Other engineers keep adding CPU kernels; these tests reason about torch's and the reference's."""
    runtime.ensure_loaded()
    runtime.disabled_backends = frozenset(b for b in runtime.registry.backends if b not in ("torch", "reference"))
    runtime.bump()
    return runtime.disabled_backends


@pytest.fixture(autouse=True)
def _torch_only():
    torch_only()


def qkv(batch: int = 1, seq: int = 8, heads: int = 2, dim: int = 16) -> tuple[torch.Tensor, ...]:
    q = torch.randn(batch, seq, heads, dim)
    return q, torch.randn_like(q), torch.randn_like(q)


def which(*args: torch.Tensor, **kwargs: object) -> str:
    return lz.which("attention", *args, **kwargs)


def write(tmp_path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def ensure_backends(*names: str) -> None:
    """The seed example names backends that other modules may not declare yet: stub them."""
    runtime.ensure_loaded()
    for name in names:
        if name not in runtime.registry.backends and name not in runtime.registry.aliases:
            lz.register_backend(lz.Backend(name, (), module=f"{name}_not_installed"))


# ---- the seed example and each rule kind


def test_seed_readme_example_loads_verbatim_with_aliases(tmp_path):
    ensure_backends("flashinfer", "flash_attn")
    config = lz.configure(write(tmp_path, SEED_EXAMPLE))
    policy = runtime.policy
    assert [r.kind for r in policy.rules()] == ["lock", "allow", "deny", "boost"]
    # torch_sdpa names torch's SDPA kernels (not its norms)
    assert policy.denies[0].backends == () and "torch.sdpa_math" in policy.denies[0].kernels
    assert all(k.startswith("torch.sdpa_") for k in policy.denies[0].kernels)
    assert policy.locks[0].condition_text == "sm >= 80 and batch_size >= 8"
    assert policy.boosts[0].boost_factor == 2.0
    assert config["locks"][0]["source"].endswith("policy.yaml:2")
    # On this CPU nothing the allow list names can run: the reference still runs every call.
    q, k, v = qkv(batch=2)
    assert which(q, k, v) == "reference.attention"


def test_file_lock_by_kernel_and_explain_names_the_rule(tmp_path):
    lz.configure(write(tmp_path, """\
        locks:
          - operation: attention.full
            kernel: torch.sdpa_math
        """))
    q, k, v = qkv()
    assert which(q, k, v) == "torch.sdpa_math"
    report = lz.explain("attention", q, k, v)
    math = next(c for c in report.candidates if c.kernel_id == "torch.sdpa_math")
    assert any("policy.yaml:2" in r for r in math.rules)
    flash = next(c for c in report.candidates if c.kernel_id == "torch.sdpa_flash_cpu")
    assert lz.Reason.POLICY_LOCKED_OTHER in [r.reason for r in flash.rejections]


def test_allow_list_filters_and_reference_always_remains(tmp_path):
    lz.configure(write(tmp_path, """\
        allows:
          - {operation: "attention.*", kernels: [torch.sdpa_math]}
        """))
    q, k, v = qkv()
    assert which(q, k, v) == "torch.sdpa_math"
    report = lz.explain("attention", q, k, v)
    assert lz.Reason.POLICY_NOT_ALLOWED in report.rejection_reasons["torch.sdpa_flash_cpu"]
    assert "reference.attention" not in report.rejection_reasons
    assert any("allow" in r for c in report.candidates if c.kernel_id == "torch.sdpa_math" for r in c.rules)


def test_deny_with_condition(tmp_path):
    lz.configure(write(tmp_path, """\
        denies:
          - operation: "attention.*"
            kernels: [torch.sdpa_flash_cpu]
            condition: batch_size > 1
        """))
    assert which(*qkv(batch=1)) == "torch.sdpa_flash_cpu"
    assert which(*qkv(batch=2)) == "torch.sdpa_math"
    report = lz.explain("attention", *qkv(batch=2))
    assert report.rejection_reasons["torch.sdpa_flash_cpu"] == [lz.Reason.POLICY_DENIED]


def test_deny_never_removes_the_reference(tmp_path):
    lz.configure(write(tmp_path, 'denies: [{backends: [torch, reference]}]\n'))
    assert which(*qkv()) == "reference.attention"


def test_boost_multiplies_score_only_when_its_condition_holds(tmp_path):
    lz.configure(write(tmp_path, """\
        boosts:
          - {operation: "attention.*", kernel: torch.sdpa_math, boost_factor: 10, when: {seq_len: ">16"}}
        """))
    assert which(*qkv(seq=8)) == "torch.sdpa_flash_cpu"
    assert which(*qkv(seq=32)) == "torch.sdpa_math"
    report = lz.explain("attention", *qkv(seq=32))
    assert report.scores["torch.sdpa_math"] == pytest.approx(20 * 10 - 2.0)  # minus one layout transform


def test_prefer_rule_sets_priority(tmp_path):
    lz.configure(write(tmp_path, "prefer: [{kernel: torch.sdpa_math, priority: 90}]\n"))
    assert which(*qkv()) == "torch.sdpa_math"
    assert lz.explain("attention", *qkv()).scores["torch.sdpa_math"] == pytest.approx(90 - 2.0)


def test_when_head_dim_mapping(tmp_path):
    lz.configure(write(tmp_path, """\
        locks:
          - {operation: attention.full, kernel: torch.sdpa_math, when: {head_dim: ">=64", dtype: float32}}
        """))
    assert which(*qkv(dim=16)) == "torch.sdpa_flash_cpu"
    assert which(*qkv(dim=64)) == "torch.sdpa_math"


# ---- the condition language


CTX = SelectionContext(op="attention.causal", device_type="cuda", sm=90, dtype=torch.bfloat16, batch=8,
                       seq_len_q=1, seq_len_k=4096, num_heads=32, num_kv_heads=8, head_dim=128, head_dim_v=128,
                       layout="BSHD", is_causal=True, isa=frozenset({"avx2"}))


@pytest.mark.parametrize(("text", "expected"), [
    ("sm == 90", True), ("sm != 90", False), ("sm < 90", False), ("sm <= 90", True), ("sm > 80", True),
    ("sm >= 91", False), ("head_dim in [64, 128]", True), ("head_dim not in [64, 128]", False),
    ("sm >= 80 and batch_size >= 8", True), ("sm >= 100 or batch >= 16", False), ("not is_causal", False),
    ("64 <= head_dim <= 128", True), ("64 <= head_dim < 128", False), ("seq_len == 4096", True),
    ("gqa_ratio == 4", True), ("device == 'cuda'", True), ("dtype == 'bfloat16'", True),
    ("dtype == torch.bfloat16", True), ("dtype in [bf16, fp16]", True), ("dtype != float32", True),
    ("layout == BSHD", True), ("'avx2' in isa", True), ("'avx512f' not in isa", True),
    ("seq_len_q < seq_len_k", True), ("is_causal == true and (sm < 80 or head_dim == 128)", True),
    ("kv_layout == None", True), ("window == null", True), ("softcap > -1.5", True), ("is_causal", True),
])
def test_condition_operators(text, expected):
    assert parse_condition(text)(CTX) is expected


@pytest.mark.parametrize(("text", "message"), [
    ("hed_dim > 64", "unknown field 'hed_dim' at column 1; did you mean 'head_dim'"),
    ("sm is 90", "operator Is is not allowed"),
    ("sm + 1 > 80", "'sm + 1' is not allowed here"),
    ("__import__('os').system('x')", "is not a condition"),
    ("layout > 3", "'>' needs numbers; field 'layout' is str"),
    ("head_dim == 'big'", "field 'head_dim' is int, got 'big' (str)"),
    ("dtype == 'bf17'", "unknown dtype 'bf17'"),
    ("is_causal == 1", "field 'is_causal' is bool"),
    ("head_dim == [64]", "use 'in' for lists"),
    ("head_dim in 64", "a list of constants on the right"),
    ("1 < 2", "compares two constants"),
    ("sm >= 80 and", "invalid syntax"),
    ("head_dim", "is not a bool"),
    ("isa == 'avx2'", "is a set"),
    ("", "expected an expression"),
    ("x" * 2000, "at most 1000 characters"),
])
def test_condition_errors(text, message):
    with pytest.raises(lz.PolicyValidationError) as exc:
        parse_condition(text)
    assert message in str(exc.value)


def test_when_mapping_translates_operators_lists_and_values():
    text = when_to_text({"head_dim": ">=64", "dtype": "bfloat16", "num_heads": [16, 32], "is_causal": True,
                         "sm": "< 100", "layout": "!= BHSD"})
    assert text == ("head_dim >= 64 and dtype == 'bfloat16' and num_heads in [16, 32] and is_causal == True"
                    " and sm < 100 and layout != 'BHSD'")
    assert parse_condition(text)(CTX) is True


# ---- validation errors: file, line and the offending text


@pytest.mark.parametrize(("text", "line", "message"), [
    ("version: '1.0'\nlockz: []\n", 2, "unknown top-level key 'lockz'; did you mean 'locks'?"),
    ("version: '2.0'\n", 1, "unsupported version '2.0'"),
    ("locks:\n  - operation: attention.causal\n    kernel: torch.sdpa_mth\n", 3,
     "unknown kernel 'torch.sdpa_mth'; did you mean 'torch.sdpa_math'"),
    ("denies:\n  - backends: [torch, flashinferr]\n", 2, "unknown backend 'flashinferr'"),
    ("locks:\n  - operation: attention.causal\n    kernel: torch.sdpa_math\n    condition: hed_dim > 1\n", 4,
     "unknown field 'hed_dim'"),
    ("denies:\n  - backend: torch\n    condition: sm is 80\n", 3, "operator Is is not allowed"),
    ("boosts:\n  - backend: torch\n    boost_factor: two\n", 3, "expected a finite number, got 'two'"),
    ("boosts:\n  - backend: torch\n    boost_factor: -1\n", 3, "expected a number > 0"),
    ("boosts:\n  - backend: torch\n", 2, "needs boost_factor"),
    ("denies:\n  - backend: torch\n    when: {layout: 3}\n", 3, "field 'layout' is str, got 3"),
    ("denies:\n  - backend: torch\n    backnd: x\n", 3, "unknown key 'backnd'"),
    ("locks:\n  - operation: atention.causal\n    kernel: torch.sdpa_math\n", 2,
     "unknown operation 'atention.causal'; did you mean 'attention.causal'"),
    ("locks:\n  - operation: attention.causal\n    backend: torch\n    kernel: torch.sdpa_math\n", 2,
     "a lock names exactly one target"),
    ("locks:\n  - operation: norm.rms\n    kernel: torch.sdpa_math\n", 3,
     "kernel 'torch.sdpa_math' does not implement 'norm.rms'"),
    ("denies:\n  - backend: torch\n    condition: sm > 1\n    when: {sm: 2}\n", 4, "not both"),
    ("denies:\n  - operation: attention.*\n", 2, "needs a target"),
    ("denies: {backend: torch}\n", 1, "expected a list of rules"),
    ("denies:\n  - torch\n", 2, "expected a mapping"),
    ("strict_mode: maybe\n", 1, "expected true or false"),
    ("locks: [\n  {operation: x\n", 3, "not valid YAML"),
    ("version: '1.0'\nversion: '1.0'\n", 2, "duplicate key 'version'"),
    ("- just\n- a list\n", 1, "expected a mapping of"),
])
def test_validation_errors_name_file_line_and_text(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(lz.PolicyValidationError) as exc:
        lz.configure(path)
    err = exc.value
    assert message in str(err)
    assert err.line == line
    assert f"{path}:{line}:" in str(err)
    lines = text.splitlines()
    if line <= len(lines) and lines[line - 1].strip():
        assert err.text == lines[line - 1].strip()
        assert f"{line} | {lines[line - 1].strip()}" in str(err)
    assert not runtime.policy  # nothing was applied


def test_invalid_bytes_and_missing_file(tmp_path):
    runtime.ensure_loaded()
    with pytest.raises(lz.PolicyValidationError, match="undecodable bytes"):
        parse_policy_text(b"locks: \xff\xfe", runtime.registry, source="x.yaml")
    with pytest.raises(lz.PolicyValidationError, match="cannot read the policy file"):
        lz.configure(str(tmp_path / "missing.yaml"))


def test_empty_file_is_an_empty_policy(tmp_path):
    lz.configure(write(tmp_path, "# nothing yet\n"))
    assert not runtime.policy.rules()


# ---- environment, code and precedence


def test_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERZERO_LOCK", "attention.causal=torch.sdpa_math, norm.rms=reference.rms_norm")
    monkeypatch.setenv("LAYERZERO_DENY", "attention.full=torch.sdpa_flash_cpu")
    monkeypatch.setenv("LAYERZERO_ALLOW", "torch_sdpa")
    monkeypatch.setenv("LAYERZERO_PREFER", "attention.masked=torch.sdpa_math:95")
    monkeypatch.setenv("LAYERZERO_STRICT", "yes")
    config = lz.load_config()
    assert config["strict_mode"] is True
    assert lz.get_locks() == {"attention.causal": "torch.sdpa_math", "norm.rms": "reference.rms_norm"}
    assert which(*qkv(), is_causal=True) == "torch.sdpa_math"
    assert which(*qkv()) == "torch.sdpa_math"  # flash_cpu denied for attention.full
    q, k, v = qkv()
    assert which(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool)) == "torch.sdpa_math"
    assert "torch.sdpa_math" in config["allows"][0]["kernels"]  # torch_sdpa: torch's SDPA kernels
    assert "backends" not in config["allows"][0]
    assert config["sources"]["environment"]["LAYERZERO_STRICT"] == "yes"


def test_environment_is_read_when_the_runtime_loads(monkeypatch):
    monkeypatch.setenv("LAYERZERO_LOCK", "attention.full=torch.sdpa_math")
    lz.reset()
    torch_only()
    assert which(*qkv()) == "torch.sdpa_math"


@pytest.mark.parametrize(("var", "value", "message"), [
    ("LAYERZERO_LOCK", "attention.causal", "expected op=kernel"),
    ("LAYERZERO_LOCK", "attention.causal=torch.nope", "unknown kernel 'torch.nope'"),
    ("LAYERZERO_DENY", "nonesuch", "unknown backend or kernel 'nonesuch'"),
    ("LAYERZERO_ALLOW", "atention.*=torch", "unknown operation 'atention.*'"),
    ("LAYERZERO_PREFER", "torch:high", "expected a number after ':'"),
    ("LAYERZERO_STRICT", "sometimes", "expected 1/0, true/false"),
])
def test_environment_errors(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(lz.PolicyValidationError) as exc:
        lz.load_config()
    assert var in str(exc.value) and message in str(exc.value)


def test_policy_file_from_environment(monkeypatch, tmp_path):
    path = write(tmp_path, "locks: [{operation: attention.full, kernel: torch.sdpa_math}]\n")
    monkeypatch.setenv("LAYERZERO_POLICY", path)
    lz.load_config()
    assert which(*qkv()) == "torch.sdpa_math"


def test_precedence_code_over_env_over_file(monkeypatch, tmp_path):
    lz.configure(write(tmp_path, """\
        strict_mode: true
        locks: [{operation: attention.full, kernel: torch.sdpa_math}]
        allows: [{kernels: [torch.sdpa_flash_cpu]}]
        """))
    assert which(*qkv()) == "torch.sdpa_math"
    assert runtime.policy.strict is True
    monkeypatch.setenv("LAYERZERO_LOCK", "attention.full=torch.sdpa_flash_cpu")
    monkeypatch.setenv("LAYERZERO_STRICT", "0")
    monkeypatch.setenv("LAYERZERO_ALLOW", "torch.sdpa_math")
    lz.load_config()
    assert which(*qkv()) == "torch.sdpa_flash_cpu"  # env lock beats file lock
    assert runtime.policy.strict is False  # env strict beats file strict
    assert which(*qkv(), is_causal=True) == "torch.sdpa_math"  # env allow list replaces the file's
    lz.lock("attention.full", "torch.sdpa_math")
    assert which(*qkv()) == "torch.sdpa_math"  # code lock beats env lock
    lz.configure(strict_mode=True)
    assert runtime.policy.strict is True
    assert list(lz.get_locks().items())[0] == ("attention.full", "torch.sdpa_math")


def test_deny_of_a_higher_source_overrides_a_lower_lock(tmp_path):
    lz.configure(write(tmp_path, "locks: [{operation: attention.full, kernel: torch.sdpa_math}]\n"))
    lz.configure(deny=["torch.sdpa_math"])
    q, k, v = qkv()
    assert which(q, k, v) == "torch.sdpa_flash_cpu"
    assert lz.explain("attention", q, k, v).rejection_reasons["torch.sdpa_math"] == [lz.Reason.POLICY_DENIED]


def test_prefer_code_priority_beats_env(monkeypatch):
    monkeypatch.setenv("LAYERZERO_PREFER", "torch.sdpa_math:10")
    lz.load_config()
    lz.prefer("torch.sdpa_math", 100)
    assert lz.explain("attention", *qkv()).scores["torch.sdpa_math"] == pytest.approx(98.0)


# ---- code API


def test_lock_unlock_get_locks_and_errors():
    lz.lock("attention.*", "torch")  # a backend: any of its kernels that can run
    lz.lock("attention.full", "torch_sdpa.sdpa_math")  # alias in a kernel id
    assert lz.get_locks() == {"attention.full": "torch.sdpa_math", "attention.*": "torch"}
    assert which(*qkv()) == "torch.sdpa_math"
    assert lz.unlock("attention.full") is True
    assert lz.unlock("attention.full") is False
    assert which(*qkv()) == "torch.sdpa_flash_cpu"
    with pytest.raises(lz.UnknownNameError, match="did you mean 'torch.sdpa_math'"):
        lz.lock("attention.full", "torch.sdpa_mat")
    with pytest.raises(lz.PolicyValidationError, match="does not implement 'norm.rms'"):
        lz.lock("norm.rms", "torch.sdpa_math")
    with pytest.raises(lz.PolicyValidationError, match="unknown operation"):
        lz.lock("attn.full", "torch")


def test_unknown_names_in_a_policy_are_one_error_class_with_op_id_suggestions():
    errors = []
    for call in (lambda: lz.lock("attention", "torch"), lambda: lz.lock("attention.causal", "torhc"),
                 lambda: lz.lock("attention.causal", "torch.sdpa_mat")):
        with pytest.raises(lz.UnknownNameError) as raised:
            call()
        errors.append(raised.value)
    assert all(isinstance(e, lz.PolicyValidationError) for e in errors)  # and still a policy error
    assert str(errors[0]).startswith("unknown operation 'attention'; did you mean 'attention.causal', ")
    assert errors[0].close_matches[:2] == ["attention.causal", "attention.decode"]
    assert "unknown backend or kernel 'torhc'" in str(errors[1])


def test_unknown_names_in_files_and_environment_are_unknown_name_errors(tmp_path, monkeypatch):
    path = write(tmp_path, "locks:\n  - {operation: attention.causal, kernel: torch.sdpa_mth}\n")
    with pytest.raises(lz.UnknownNameError) as raised:
        lz.configure(path)
    assert isinstance(raised.value, lz.PolicyValidationError)
    assert str(raised.value).startswith(f"{path}:2: locks[0].kernel: unknown kernel 'torch.sdpa_mth'")
    monkeypatch.setenv("LAYERZERO_DENY", "atention.*=torch")
    with pytest.raises(lz.UnknownNameError, match="LAYERZERO_DENY: entry 'atention.\\*=torch': unknown operation"):
        lz.reset()
        runtime.ensure_loaded()


def test_conditional_code_lock():
    lz.lock("attention.full", "torch.sdpa_math", condition="batch_size >= 4")
    assert which(*qkv(batch=1)) == "torch.sdpa_flash_cpu"
    assert which(*qkv(batch=4)) == "torch.sdpa_math"


def test_lock_that_cannot_run_warns_once_and_adapts(caplog):
    lz.lock("attention.full", "torch.sdpa_flash")  # CUDA only
    with caplog.at_level(logging.WARNING, logger="layerzero"):
        assert which(*qkv()) == "torch.sdpa_flash_cpu"
        assert which(*qkv(seq=9)) == "torch.sdpa_flash_cpu"
    warnings = [r.getMessage() for r in caplog.records if "cannot run this call" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("lock attention.full -> torch.sdpa_flash [code] cannot run this call")


def test_strict_mode_raises_for_a_lock_that_cannot_run():
    lz.lock("attention.full", "torch.sdpa_flash")
    lz.configure(strict_mode=True)
    with pytest.raises(lz.NoKernelFoundError, match="cannot run these inputs") as raised:
        lz.attention(*qkv())
    report = raised.value.report
    # every kernel of the op, each with why it was not scored: the locked one's own reasons included
    assert all(c.rejections for c in report.candidates) and "not scored" not in str(raised.value)
    assert report.rejection_reasons["torch.sdpa_flash"][0] is lz.Reason.PLATFORM_MISMATCH
    assert report.rejection_reasons["torch.sdpa_flash_cpu"] == [lz.Reason.POLICY_LOCKED_OTHER]


def test_strict_mode_error_lists_why_no_accelerated_kernel_ran():
    lz.configure(strict_mode=True)
    x = torch.randn(12, 2, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(lz.NoKernelFoundError, match="only the reference can run attention.varlen") as raised:
        lz.attention_varlen(x, x, x, cu, cu, 7, 7)
    report = raised.value.report
    assert {c.kernel_id for c in report.candidates} == {s.id for s in runtime.registry.candidates("attention.varlen")}
    assert all(c.rejections for c in report.candidates if c.backend != "reference")
    assert "strict mode: the reference does not run" in str(raised.value)


def test_every_policy_change_bumps_the_generation(tmp_path):
    runtime.ensure_loaded()
    seen = [runtime.generation]

    def changed() -> None:
        assert runtime.generation > seen[-1]
        seen.append(runtime.generation)

    for change in (
        lambda: lz.lock("attention.full", "torch.sdpa_math"),
        lambda: lz.unlock("attention.full"),
        lambda: lz.prefer("torch").undo(),
        lambda: lz.configure(write(tmp_path, "denies: [{backend: torch}]\n")),
        lambda: lz.configure(strict_mode=False),
    ):
        change()
        changed()
    with lz.disabled("torch"):
        changed()
    changed()


def test_prefer_setting_and_context_manager_restore_on_exception():
    lz.prefer("torch.sdpa_math", 70)
    assert which(*qkv()) == "torch.sdpa_math"
    with pytest.raises(RuntimeError), lz.prefer("torch.sdpa_math", 10):
        assert which(*qkv()) == "torch.sdpa_flash_cpu"
        raise RuntimeError("boom")
    assert which(*qkv()) == "torch.sdpa_math"  # the replaced preference is back
    assert len(runtime.policy.prefers) == 1
    with pytest.raises(lz.PolicyValidationError, match="priority"):
        lz.prefer("torch", "high")  # type: ignore[arg-type]


def test_disabled_restores_on_exception_and_nests():
    baseline = runtime.disabled_backends
    with pytest.raises(ValueError), lz.disabled("torch_sdpa"):
        assert which(*qkv()) == "reference.attention"
        raise ValueError
    assert which(*qkv()) == "torch.sdpa_flash_cpu"
    assert runtime.disabled_backends == baseline
    with lz.disabled():  # reference-only mode
        assert which(*qkv()) == "reference.attention"
        assert lz.rms_norm(torch.randn(2, 8)).shape == (2, 8)
        with lz.disabled("torch"):
            pass
        assert "*" in runtime.disabled_backends
    assert runtime.disabled_backends == baseline
    with pytest.raises(lz.ConfigurationError, match="reference"):
        lz.disabled("reference")
    with pytest.raises(lz.UnknownNameError):
        lz.disabled("no_such_backend")


def test_configure_mapping_kwargs_and_get_config():
    config = lz.configure(
        {"version": "1.0", "boosts": [{"kernel": "torch.sdpa_math", "boost_factor": 5.0}]},
        allow={"attention.*": ["torch"]}, prefer={"torch.sdpa_flash_cpu": 61}, plan_cache_size=64,
        plan_cache_ttl_s=30,
    )
    assert config["boosts"][0]["source"] == "configure()"
    assert config["allows"][0] == {"operation": "attention.*", "backends": ["torch"], "source": "code"}
    assert config["prefer"][0]["priority"] == 61
    assert config["plan_cache"] == {"size": 64, "ttl_s": 30.0}
    assert which(*qkv()) == "torch.sdpa_math"  # 20 * 5 beats 61
    with pytest.raises(lz.PolicyValidationError, match="configure\\(\\): unknown top-level key"):
        lz.configure({"lockz": []})
    with pytest.raises(lz.ConfigurationError, match="watch=True needs"):
        lz.configure(watch=True)
    with pytest.raises(lz.ConfigurationError, match="maxsize"):
        lz.configure(plan_cache_size=1)


# ---- hot reload


def test_hot_reload_valid_then_invalid(tmp_path, caplog):
    path = write(tmp_path, "locks: [{operation: attention.full, kernel: torch.sdpa_math}]\n")
    watcher = lz.watch_policy(path, interval_s=3600)  # polled by hand below
    assert which(*qkv()) == "torch.sdpa_math"
    assert watcher.check() is False  # unchanged
    write(tmp_path, "locks: [{operation: attention.full, kernel: reference.attention}]\n")
    assert watcher.check() is True
    assert which(*qkv()) == "reference.attention"
    write(tmp_path, "locks: [{operation: attention.full, kernel: torch.sdpa_mth}]\n")
    with caplog.at_level(logging.ERROR, logger="layerzero"):
        assert watcher.check() is False
        assert watcher.check() is False  # logged once per bad version
    assert which(*qkv()) == "reference.attention"  # the old policy stays
    assert watcher.errors == 1 and "policy.yaml:1" in watcher.last_error
    assert sum("not reloaded" in r.message for r in caplog.records) == 1
    assert lz.get_config()["sources"]["watching"] == path
    watcher.stop()
    assert lz.get_config()["sources"]["watching"] is None


def test_hot_reload_thread_picks_up_a_change(tmp_path):
    path = write(tmp_path, "denies: [{kernel: torch.sdpa_flash_cpu}]\n")
    lz.configure(path, watch=True, interval_s=0.02)
    assert which(*qkv()) == "torch.sdpa_math"
    time.sleep(0.05)
    write(tmp_path, "denies: [{kernel: torch.sdpa_math}]\n")
    deadline = time.monotonic() + 10
    while which(*qkv()) != "torch.sdpa_flash_cpu" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert which(*qkv()) == "torch.sdpa_flash_cpu"
    watcher = runtime.policy_watcher
    lz.reset()  # stops the watcher
    assert not watcher.running


def test_watch_rejects_invalid_initial_file_and_interval(tmp_path):
    with pytest.raises(lz.PolicyValidationError):
        lz.watch_policy(write(tmp_path, "lockz: []\n"))
    with pytest.raises(lz.ConfigurationError, match="interval_s"):
        lz.watch_policy(write(tmp_path, ""), interval_s=0)
    assert runtime.policy_watcher is None
