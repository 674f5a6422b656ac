"""The LayerZero spec's README, run as its users run it (issue 20).

tests/data/seed_README.md is a verbatim copy of the README that specified LayerZero (the steering
repository's shared/seed/README.md; copied because CI has no ../shared). Its python and yaml code blocks
are extracted from that file at test time, never copied by hand: each python block runs in a fresh
runtime with the names it uses but never defines (PRELUDE), in a directory holding its yaml blocks as
the files they name (`# policy.yaml` -> policy.yaml); each yaml block is loaded verbatim as what it is.
A block that cannot run here is in SKIP with its reason; a statement that cannot run is in EXCLUDED.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import layerzero as lz
from layerzero.state import runtime

SEED = Path(__file__).parent / "data" / "seed_README.md"
SHARED_SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "README.md"  # beside a checkout
HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Block:
    id: str  # "Section > Subsection" of the block's heading
    lang: str
    code: str
    line: int  # of the opening fence, 1-based

    @property
    def filename(self) -> str | None:
        """`policy.yaml` for a block whose first line is `# policy.yaml`."""
        first = self.code.splitlines()[0].strip() if self.code.strip() else ""
        match = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)", first)
        return match.group(1) if match else None


def extract(text: str) -> list[Block]:
    """The python and yaml fenced blocks of a markdown text, each named by its headings."""
    out: list[Block] = []
    sections = {2: "", 3: ""}
    fence: tuple[str, int, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if fence is None:
            heading = re.match(r"(#{2,3}) (.+)", line)
            if heading:
                level = len(heading.group(1))
                sections[level] = heading.group(2).strip()
                if level == 2:
                    sections[3] = ""
            elif line.startswith("```"):
                fence = (line[3:].strip(), number, [])
        elif line.startswith("```"):
            lang, start, lines = fence
            if lang in ("python", "yaml"):
                name = " > ".join(s for s in (sections[2], sections[3]) if s)
                taken = sum(1 for b in out if b.id == name or b.id.startswith(name + " ("))
                out.append(Block(name if not taken else f"{name} ({taken + 1})", lang, "\n".join(lines) + "\n", start))
            fence = None
        else:
            fence[2].append(line)
    return out


BLOCKS = extract(SEED.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
YAML = [b for b in BLOCKS if b.lang == "yaml"]

# Blocks that cannot run on this machine, with the reason (the GPU machine runs what needs CUDA).
SKIP = {
    "Quick Start > Basic Usage": None if HAS_CUDA else "allocates its tensors with device='cuda' (no GPU here)",
    "Deployment > Monitoring": "pushes traces to an OTLP collector at http://collector:4317, which no test machine "
                               "has (OTelExporter is tested against a local collector: test_telemetry_exporters.py)",
}
# Statements left out of a block that otherwise runs as written.
EXCLUDED = {
    "API Reference > Operations Module": {
        "output = lz.paged_attention(q, k_cache, v_cache, page_table)":
            "the spec's call has no seq_lens; LayerZero needs each sequence's cached length (a page table does not "
            "say how full a sequence's last page is), so lz.paged_attention takes seq_lens",
    },
}
SLOW = {"Quick Start > Warmup (Prevent Latency Spikes)", "Deployment > Basic Deployment"}  # seconds of CPU attention


def _tokenizer() -> Any:
    """A byte-level tiktoken encoding: the README's `tokenizer_id="gpt2"` is registered as this (the real
    gpt2 files come from the network, which CI has not)."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(name="bytes", pat_str=r"""'s|'t| ?\w+| ?[^\s\w]+|\s+""", mergeable_ranks=ranks,
                             special_tokens={})


def prelude() -> dict[str, Any]:
    """The names the README's blocks use without defining them."""
    from layerzero.dispatch import kernel_registry

    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.float16 if HAS_CUDA else torch.float32
    q, k, v = (torch.randn(2, 128, 8, 64, device=device, dtype=dtype) for _ in range(3))
    registry = kernel_registry()
    lz.register_tokenizer("gpt2", _tokenizer())
    angles = torch.rand(128, 32, device=device) * 6.3  # (S, D/2) for x's 128 positions
    return {
        "torch": torch, "lz": lz, "q": q, "k": k, "v": v, "inputs": (q, k, v),
        "ctx": lz.explain("attention.causal", q, k, v).context,  # the SelectionContext of q, k, v
        "registry": registry, "backends": registry,
        "flash_attn_spec": registry.kernel("flash_attn.v2"),
        "sdpa_spec": registry.kernel("torch.sdpa_flash" if HAS_CUDA else "torch.sdpa_math"),
        "shapes": [(1, 128, 8, 64), (2, 256, 8, 64)],
        "x": torch.randn(2, 128, 8, 64, device=device, dtype=dtype), "weight": torch.ones(64, device=device, dtype=dtype),
        "bias": torch.zeros(64, device=device, dtype=dtype),
        "cos": torch.cat((angles, angles), -1).cos().to(dtype), "sin": torch.cat((angles, angles), -1).sin().to(dtype),
        "logits": torch.randn(4, 1000, device=device), "text": "Hello, LayerZero!",
    }


def source_of(block: Block) -> str:
    code = block.code
    for statement in EXCLUDED.get(block.id, {}):
        assert statement in code, f"{block.id}: the excluded statement is no longer in the README: {statement}"
        code = code.replace(statement, "pass  # excluded: see EXCLUDED")
    return code


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding the README's yaml blocks as the files they name."""
    for block in YAML:
        if block.filename:
            (tmp_path / block.filename).write_text(block.code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERZERO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def run(block: Block) -> dict[str, Any]:
    namespace = prelude()
    exec(compile(source_of(block), f"seed_README.md:{block.line} ({block.id})", "exec"), namespace)  # noqa: S102
    return namespace


# ---- what each block must have done (a block that ran but did nothing fails here)


def _which(ns: dict[str, Any]) -> str:
    return lz.which("attention.causal", ns["q"], ns["k"], ns["v"])


def check_why(ns):
    assert ns["report"].op == "attention.causal" and ns["report"].selected_kernel == _which(ns)
    assert ns["output"].shape == ns["q"].shape


def check_basic_usage(ns):
    assert ns["output"].shape == (2, 1024, 32, 128) and ns["output"].is_cuda


def check_explainability(ns):
    assert ns["report"].selected_kernel == _which(ns) and isinstance(ns["report"].score, float)
    assert all(isinstance(r, lz.Reason) for reasons in ns["report"].rejection_reasons.values() for r in reasons)


def check_policy_control(ns):
    config = lz.get_config()
    assert {"operation": "attention.causal", "kernels": ["flashinfer.decode"], "source": "code"} in config["locks"]
    assert any(r["backends"] == ["flashinfer"] for r in config["prefer"])
    assert "torch.sdpa_math" in config["disabled_backends"]  # the statement took effect and stays
    assert not _which(ns).startswith("torch.sdpa_")
    assert config["sources"]["file"] == "policy.yaml" and len(config["boosts"]) == 1


def check_warmup(ns):
    assert len(runtime.plans) >= 2  # both shapes' plans are cached


def check_static(ns):
    q, k, v = ns["inputs"]
    torch.testing.assert_close(ns["result"], lz.attention(q, k, v, is_causal=True), rtol=1e-3, atol=1e-3)
    assert ns["dispatcher"].kernels("attention.causal")[-1] == ns["sdpa_spec"].id


def check_dynamic(ns):
    q, k, v = ns["inputs"]
    torch.testing.assert_close(ns["result"], lz.attention(q, k, v, is_causal=True))


def check_hot_reload(ns):
    assert runtime.policy_watcher is ns["dispatcher"].watcher and runtime.policy_watcher.running
    assert [r["operation"] for r in lz.get_config()["locks"]] == ["attention.*", "attention.*"]


def check_programmatic(ns):
    config = lz.get_config()
    assert all(r["source"] != "code" for r in config["locks"])  # lock, then unlock
    assert any(r["backends"] == ["flashinfer"] and r["priority"] == 100 for r in config["prefer"])
    assert "torch.sdpa_math" in config["disabled_backends"] and config["sources"]["file"] == "policy.yaml"


def check_operations(ns):
    assert ns["output"].shape == ns["x"].shape  # the last one: lz.rope
    assert ns["tokens"] and all(isinstance(t, int) for t in ns["tokens"])  # the last one: lz.tokenize
    assert ns["text"] == "Hello, LayerZero!"  # detokenize(tokenize(text)) is the text again


def check_inspection(ns):
    assert isinstance(ns["kernel"], lz.ExecutionPlan) and ns["kernel"].kernel_id == ns["kernel_id"]
    assert ns["report"].selected_kernel == ns["kernel_id"]
    assert ns["kernels"] and all(any(op.startswith("attention.") for op in k.ops) for k in ns["kernels"])
    assert ns["is_valid"] is True and ns["reasons"] == []


def check_system(ns):
    assert ns["ready"] is True and ns["issues"] == []
    assert [p.shape[:2] for p in ns["plan"].plans[:2]] == [(1, 128), (2, 256)]
    assert isinstance(ns["result"], lz.SelectionReport) and ns["result"].selected_kernel == _which(ns)


def check_deployment(ns):
    # four shapes selected and warmed (loading the policy afterwards drops those plans, as any policy change does)
    assert sum(runtime.telemetry.counted().selections.values()) >= 4
    assert lz.get_config()["sources"]["file"] == "production_policy.yaml"


CHECKS = {
    "Why LayerZero?": check_why,
    "Quick Start > Basic Usage": check_basic_usage,
    "Quick Start > Explainability": check_explainability,
    "Quick Start > Policy Control": check_policy_control,
    "Quick Start > Warmup (Prevent Latency Spikes)": check_warmup,
    "Dispatch Modes > Static Dispatch (Zero Overhead)": check_static,
    "Dispatch Modes > Dynamic Dispatch (~100-500ns)": check_dynamic,
    "Dispatch Modes > Hot-Reload Dispatch (Development)": check_hot_reload,
    "Policy System > Programmatic Control": check_programmatic,
    "API Reference > Operations Module": check_operations,
    "API Reference > Inspection Module": check_inspection,
    "API Reference > System Module": check_system,
    "Deployment > Basic Deployment": check_deployment,
    "Deployment > Monitoring": None,
}


def test_the_copy_is_the_seed_readme():
    if not SHARED_SEED.is_file():
        pytest.skip("the steering repository's shared/seed/README.md is not beside this checkout (CI)")
    assert SEED.read_bytes() == SHARED_SEED.read_bytes(), "tests/data/seed_README.md differs from shared/seed"


def test_every_python_block_is_run_or_skipped_with_a_reason():
    assert [b.id for b in PYTHON] == list(CHECKS)  # a new or renamed block must be added here
    assert set(SKIP) <= set(CHECKS) and set(EXCLUDED) <= set(CHECKS)
    assert sum(1 for reason in SKIP.values() if reason) <= 2  # keep the list small


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs_as_written(block, workdir, request):
    if SKIP.get(block.id):
        pytest.skip(SKIP[block.id])
    if block.id in SLOW:
        request.applymarker(pytest.mark.slow)
    namespace = run(block)
    CHECKS[block.id](namespace)


def test_yaml_blocks_are_the_three_files_the_python_blocks_use():
    assert [b.filename for b in YAML] == ["dispatch_config.yaml", "policy.yaml", "production_policy.yaml"]


def test_dispatch_config_block_loads_verbatim(workdir):
    from layerzero.dispatch import load_dispatch_config

    policy = load_dispatch_config("dispatch_config.yaml")
    assert [(r.operation, r.target, r.condition_text) for r in policy.locks] == [
        ("attention.*", "flashinfer.prefill", "batch_size > 32"), ("attention.*", "flash_attn", "")]


def test_policy_block_loads_verbatim(workdir):
    config = lz.configure("policy.yaml")
    assert [r["operation"] for r in config["locks"]] == ["attention.causal"]
    assert config["locks"][0]["backends"] == ["flashinfer"] and config["locks"][0]["condition"] == "sm >= 80"
    assert config["allows"][0]["backends"] == ["flashinfer", "flash_attn", "xformers"]
    assert all(k.startswith("torch.sdpa_") for k in config["denies"][0]["kernels"])  # torch_sdpa
    assert config["boosts"][0]["boost_factor"] == 1.5


def test_production_policy_block_loads_verbatim(workdir):
    config = lz.configure("production_policy.yaml")
    assert config["locks"][0]["condition"] == "sm >= 80 and batch_size >= 8"
    assert config["allows"][0]["backends"] == ["flashinfer", "flash_attn"]
    assert config["boosts"][0]["boost_factor"] == 2.0
    q = torch.randn(2, 16, 2, 16)
    assert lz.which("attention.causal", q, q, q)  # nothing the allow list names runs here: the reference does
