"""LayerZero: select and run the fastest correct kernel for each LLM inference op.

    import layerzero as lz
    out = lz.attention(q, k, v, is_causal=True)      # q, k, v in BSHD
    print(lz.explain("attention", q, k, v, is_causal=True))
"""

from .backends.hub import HubLockError, register_hub_kernels
from .capabilities import CanaryReport, canary, clear_descriptors, load_descriptors
from .context import SelectionContext
from .descriptors import DescriptorError
from .doctor import DoctorReport, doctor, readiness_check
from .errors import (
    BackendNotAvailableError,
    CacheCorruptionError,
    ConfigurationError,
    CudaGraphUnsafeError,
    InvalidInputError,
    KernelExecutionError,
    LayerZeroError,
    NoKernelFoundError,
    PolicyValidationError,
    SelectionTimeoutError,
    UnknownNameError,
)
from .graphs import GraphValidation, is_graph_safe, validate_graph_capture, warmup_for_capture
from .integrations import watch_transformers as _watch_transformers
from .isolation import IsolatedBackend, isolate
from .kernel import Backend, KernelSpec
from .monitor.health import BreakerState, HealthReport, configure_health, health
from .monitor.memory import configure_memory
from .monitor.telemetry import disable_telemetry, enable_telemetry, start_metrics_server, telemetry
from .ops.activation import fused_mlp, geglu, gelu, silu, swiglu
from .ops.attention import attention, attention_varlen, paged_attention
from .ops.embedding import embedding
from .ops.norm import group_norm, layer_norm, rms_norm
from .ops.posenc import alibi_slopes, rope, rope_cache, rope_inv_freq, rope_qk
from .ops.quant import (
    PackedFormat,
    QuantFormat,
    QuantizedTensor,
    awq_format,
    dequantize,
    gptq_format,
    quant_linear,
    quantize,
)
from .ops.sampling import sample, sample_greedy, sample_topk, sample_topp
from .ops.tokenize import (
    BatchEncoding,
    PrefixCacheStats,
    Tokenizer,
    detokenize,
    get_tokenizer,
    prefix_cache,
    register_prefix,
    register_tokenizer,
    tokenize,
    tokenize_batch,
)
from .policy.config import (
    PolicyWatcher,
    configure,
    disabled,
    enabled,
    get_config,
    get_locks,
    load_config,
    lock,
    prefer,
    unlock,
    watch_policy,
)
from .reasons import Reason, Rejection
from .ringbuffer import RingBuffer, RingBufferOverrun
from .selection.engine import ExecutionPlan, SelectionReport
from .selection.inspect import (
    dry_run,
    explain,
    list_backends,
    list_kernels,
    register_backend,
    register_kernel,
    select,
    validate,
    which,
)
from .state import reset

__version__ = "0.1.0"
_watch_transformers()  # attn_implementation="layerzero" once transformers' attention registry loads

# Measured selection (lz.tune, lz.solve, ...) loads on first use: `import layerzero` stays light.
_PERF = {"perfdb": "tune", "record_trace": "tune", "save_trace": "tune", "tune": "tune", "solve": "solve",
         "compile": "solve", "CompiledPlans": "solve",
         "warmup": "warmup", "plan_block": "planner", "BlockPlanner": "planner", "BlockStep": "planner"}


def __getattr__(name: str) -> object:
    if name in _PERF:
        import importlib

        return getattr(importlib.import_module(f".perf.{_PERF[name]}", __name__), name)
    raise AttributeError(f"module 'layerzero' has no attribute {name!r}")

# lz.compile is left out: `from layerzero import *` would shadow the builtin compile.
__all__ = [
    "alibi_slopes", "fused_mlp", "geglu", "gelu", "rope", "rope_cache", "rope_inv_freq", "rope_qk", "silu", "swiglu",
    "perfdb", "record_trace", "save_trace", "solve", "CompiledPlans", "tune", "warmup", "BlockPlanner", "BlockStep", "plan_block",
    "PackedFormat", "QuantFormat", "QuantizedTensor", "awq_format", "dequantize", "embedding", "gptq_format",
    "quant_linear", "quantize", "sample", "sample_greedy", "sample_topk", "sample_topp",
    "BatchEncoding", "Tokenizer", "detokenize", "get_tokenizer", "register_tokenizer", "tokenize", "tokenize_batch",
    "PrefixCacheStats", "prefix_cache", "register_prefix",
    "PolicyWatcher", "configure", "disabled", "enabled", "get_config", "get_locks", "load_config", "lock", "prefer", "unlock",
    "watch_policy",
    "BreakerState", "DoctorReport", "GraphValidation", "HealthReport", "configure_health", "configure_memory",
    "disable_telemetry", "doctor", "enable_telemetry", "health", "is_graph_safe", "readiness_check",
    "start_metrics_server", "telemetry", "validate_graph_capture", "warmup_for_capture",
    "Backend", "BackendNotAvailableError", "CacheCorruptionError", "ConfigurationError", "CudaGraphUnsafeError",
    "ExecutionPlan", "InvalidInputError", "KernelExecutionError", "KernelSpec", "LayerZeroError",
    "NoKernelFoundError", "PolicyValidationError", "Reason", "Rejection", "SelectionContext", "SelectionReport",
    "SelectionTimeoutError", "UnknownNameError", "attention", "attention_varlen", "dry_run", "explain", "group_norm", "layer_norm", "paged_attention",
    "CanaryReport", "DescriptorError", "HubLockError", "IsolatedBackend", "RingBuffer", "RingBufferOverrun",
    "canary", "clear_descriptors", "isolate", "load_descriptors", "register_hub_kernels",
    "list_backends", "list_kernels", "register_backend", "register_kernel", "reset", "rms_norm", "select", "validate", "which",
]
