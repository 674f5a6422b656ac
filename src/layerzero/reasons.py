"""Why a kernel was rejected: stable codes (used in logs, policy reports, tests) and messages."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Reason(str, Enum):
    """A rejection reason. The value is the stable code; `.message` is for people."""

    message: str

    def __new__(cls, code: str, message: str) -> Reason:
        obj = str.__new__(cls, code)
        obj._value_ = code
        obj.message = message
        return obj

    def __str__(self) -> str:
        return self.value

    # availability and health
    BACKEND_NOT_INSTALLED = ("BACKEND_NOT_INSTALLED", "the backend library is not installed")
    BACKEND_IMPORT_FAILED = ("BACKEND_IMPORT_FAILED", "the backend library failed to import")
    BACKEND_VERSION_UNSUPPORTED = ("BACKEND_VERSION_UNSUPPORTED", "the installed version is not supported")
    BACKEND_BROKEN = (
        "BACKEND_BROKEN",
        "a tiny call of the backend raised or differed from the reference on this device",
    )
    BACKEND_UNPROBED = (
        "BACKEND_UNPROBED",
        "the backend is not verified on this device yet, and probes cannot run "
        "during CUDA graph capture or torch.compile tracing",
    )
    BACKEND_UNHEALTHY = ("BACKEND_UNHEALTHY", "the backend's circuit breaker is open after failures")
    KERNEL_UNHEALTHY = ("KERNEL_UNHEALTHY", "the kernel's circuit breaker is open after failures")
    # platform and device
    PLATFORM_MISMATCH = ("PLATFORM_MISMATCH", "the kernel does not run on this device type")
    SM_TOO_OLD = ("SM_TOO_OLD", "the GPU's compute capability is below the kernel's minimum")
    SM_TOO_NEW = ("SM_TOO_NEW", "the GPU's compute capability is above the kernel's maximum")
    GPU_GENERATION_UNSUPPORTED = ("GPU_GENERATION_UNSUPPORTED", "the kernel does not support this GPU generation")
    CPU_ISA_UNSUPPORTED = ("CPU_ISA_UNSUPPORTED", "the CPU lacks an instruction set the kernel needs")
    # dtypes and quantization
    DTYPE_UNSUPPORTED = ("DTYPE_UNSUPPORTED", "the kernel does not support this dtype")
    QUANT_FORMAT_UNSUPPORTED = ("QUANT_FORMAT_UNSUPPORTED", "the kernel does not support this quantization format")
    FP8_NEEDS_SM89 = ("FP8_NEEDS_SM89", "fp8 needs compute capability 8.9 or newer")
    # shapes
    HEAD_DIM_TOO_LARGE = ("HEAD_DIM_TOO_LARGE", "head_dim is above the kernel's maximum")
    HEAD_DIM_TOO_SMALL = ("HEAD_DIM_TOO_SMALL", "head_dim is below the kernel's minimum")
    HEAD_DIM_ALIGNMENT = ("HEAD_DIM_ALIGNMENT", "head_dim is not a multiple the kernel needs")
    HEAD_DIM_UNSUPPORTED = ("HEAD_DIM_UNSUPPORTED", "head_dim is not one of the kernel's compiled sizes")
    HEAD_DIM_V_MISMATCH = ("HEAD_DIM_V_MISMATCH", "value head_dim differs from query/key head_dim")
    SEQ_LEN_TOO_LONG = ("SEQ_LEN_TOO_LONG", "the sequence is longer than the kernel supports")
    SEQ_LEN_TOO_SHORT = ("SEQ_LEN_TOO_SHORT", "the sequence is shorter than the kernel supports")
    BATCH_TOO_LARGE = ("BATCH_TOO_LARGE", "the batch is larger than the kernel supports")
    HIDDEN_SIZE_TOO_LARGE = ("HIDDEN_SIZE_TOO_LARGE", "the hidden size is above the kernel's maximum")
    GQA_UNSUPPORTED = ("GQA_UNSUPPORTED", "the kernel needs as many key/value heads as query heads")
    # layout and memory
    WORKSPACE_TOO_LARGE = ("WORKSPACE_TOO_LARGE", "the kernel's workspace exceeds the free-memory headroom")
    # attention semantics
    CAUSAL_UNSUPPORTED = ("CAUSAL_UNSUPPORTED", "the kernel has no causal mode")
    NON_CAUSAL_UNSUPPORTED = ("NON_CAUSAL_UNSUPPORTED", "the kernel runs only causal attention")
    CAUSAL_NON_SQUARE = ("CAUSAL_NON_SQUARE", "the kernel's causal mask needs seq_len_q == seq_len_k")
    MASK_UNSUPPORTED = ("MASK_UNSUPPORTED", "the kernel takes no attention mask")
    BOOL_MASK_UNSUPPORTED = ("BOOL_MASK_UNSUPPORTED", "the kernel takes no boolean mask")
    FLOAT_MASK_UNSUPPORTED = ("FLOAT_MASK_UNSUPPORTED", "the kernel takes no additive float mask")
    DROPOUT_UNSUPPORTED = ("DROPOUT_UNSUPPORTED", "the kernel has no dropout")
    WINDOW_UNSUPPORTED = ("WINDOW_UNSUPPORTED", "the kernel has no sliding-window attention")
    SOFTCAP_UNSUPPORTED = ("SOFTCAP_UNSUPPORTED", "the kernel has no logits soft-capping")
    ALIBI_UNSUPPORTED = ("ALIBI_UNSUPPORTED", "the kernel has no ALiBi bias")
    PAGE_SIZE_UNSUPPORTED = ("PAGE_SIZE_UNSUPPORTED", "the kernel does not support this page size")
    KV_LAYOUT_UNSUPPORTED = ("KV_LAYOUT_UNSUPPORTED", "the kernel does not support this KV-cache layout")
    BACKWARD_UNSUPPORTED = ("BACKWARD_UNSUPPORTED", "inputs require grad and the kernel has no backward")
    # execution environment
    NOT_GRAPH_SAFE = ("NOT_GRAPH_SAFE", "the kernel cannot run under CUDA graph capture")
    NOT_DETERMINISTIC = ("NOT_DETERMINISTIC", "deterministic algorithms were requested and the kernel is not")
    NEEDS_JIT_COMPILE = ("NEEDS_JIT_COMPILE", "the kernel variant is not compiled yet and JIT on the hot path is off")
    TP_UNSUPPORTED = ("TP_UNSUPPORTED", "the kernel does not support this tensor-parallel setting")
    OP_UNSUPPORTED = ("OP_UNSUPPORTED", "the kernel does not implement this operation")
    # policy
    POLICY_DENIED = ("POLICY_DENIED", "a deny rule of the policy matched")
    POLICY_NOT_ALLOWED = ("POLICY_NOT_ALLOWED", "an allow list of the policy is in force and excludes it")
    POLICY_LOCKED_OTHER = ("POLICY_LOCKED_OTHER", "the policy locks this operation to another kernel")
    BACKEND_DISABLED = ("BACKEND_DISABLED", "the backend is disabled in this scope")
    # measurement
    PERF_INCORRECT = ("PERF_INCORRECT", "tuning found the kernel's output wrong for this shape")
    CUSTOM_CHECK_FAILED = ("CUSTOM_CHECK_FAILED", "a backend-specific check rejected the inputs")


class Rejection(NamedTuple):
    """One reason a kernel cannot run a call, with the concrete values behind it."""

    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail or self.reason.message}"
