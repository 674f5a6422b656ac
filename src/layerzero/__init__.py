"""LayerZero: select and run the fastest correct kernel for each LLM inference op.

import layerzero as lz
out = lz.attention(q, k, v, is_causal=True)      # q, k, v in BSHD
print(lz.explain("attention", q, k, v, is_causal=True))
"""

from .backends.hub import HubLockError
from .capabilities import CanaryReport, canary, clear_descriptors, load_descriptors
from .context import SelectionContext
from .descriptors import DescriptorError
from .doctor import (
    DoctorReport,
    configure_health,
    configure_memory,
    disable_telemetry,
    doctor,
    enable_telemetry,
    health,
    readiness_check,
    start_metrics_server,
    telemetry,
)
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
from .monitor.health import BreakerState, HealthReport
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
    register_hub_kernels,
    register_kernel,
    select,
    validate,
    which,
)
from .state import reset
from .version import __version__

_watch_transformers()  # attn_implementation="layerzero" once transformers' attention registry loads

# Measured selection (lz.tune, lz.solve, ...) loads on first use: `import layerzero` stays light.
_PERF = {
    "perfdb": "tune",
    "record_trace": "tune",
    "save_trace": "tune",
    "tune": "tune",
    "solve": "solve",
    "compile": "solve",
    "CompiledPlans": "solve",
    "warmup": "warmup",
    "plan_block": "planner",
    "BlockPlanner": "planner",
    "BlockStep": "planner",
}


def __getattr__(name: str) -> object:
    if name in _PERF:
        import importlib

        return getattr(importlib.import_module(f".perf.{_PERF[name]}", __name__), name)
    raise AttributeError(f"module 'layerzero' has no attribute {name!r}")


# The documented API (README.md, docs/): lz.compile is left out, as `from layerzero import *` would
# shadow the builtin compile. Result types and helpers of these calls (DoctorReport, QuantizedTensor,
# awq_format, ...) stay importable as lz.<name> without being part of it.
__all__ = [
    # ops
    "alibi_slopes",
    "attention",
    "attention_varlen",
    "dequantize",
    "detokenize",
    "embedding",
    "fused_mlp",
    "geglu",
    "gelu",
    "group_norm",
    "layer_norm",
    "paged_attention",
    "quant_linear",
    "quantize",
    "register_prefix",
    "register_tokenizer",
    "rms_norm",
    "rope",
    "rope_cache",
    "rope_qk",
    "sample",
    "sample_greedy",
    "sample_topk",
    "sample_topp",
    "silu",
    "swiglu",
    "tokenize",
    "tokenize_batch",
    # selection: inspect and register
    "Backend",
    "ExecutionPlan",
    "KernelSpec",
    "Reason",
    "Rejection",
    "SelectionContext",
    "SelectionReport",
    "dry_run",
    "explain",
    "list_backends",
    "list_kernels",
    "register_kernel",
    "reset",
    "select",
    "validate",
    "which",
    # policy
    "configure",
    "disabled",
    "enabled",
    "get_config",
    "get_locks",
    "load_config",
    "lock",
    "prefer",
    "unlock",
    "watch_policy",
    # measured selection, warm-up, solving
    "plan_block",
    "record_trace",
    "solve",
    "tune",
    "warmup",
    # runtime: health, telemetry, graphs, capabilities, isolation, hub
    "canary",
    "configure_memory",
    "doctor",
    "enable_telemetry",
    "health",
    "is_graph_safe",
    "isolate",
    "load_descriptors",
    "readiness_check",
    "register_hub_kernels",
    "start_metrics_server",
    "validate_graph_capture",
    "warmup_for_capture",
    # errors
    "BackendNotAvailableError",
    "CacheCorruptionError",
    "ConfigurationError",
    "CudaGraphUnsafeError",
    "DescriptorError",
    "HubLockError",
    "InvalidInputError",
    "KernelExecutionError",
    "LayerZeroError",
    "NoKernelFoundError",
    "PolicyValidationError",
    "RingBufferOverrun",
    "SelectionTimeoutError",
    "UnknownNameError",
]
