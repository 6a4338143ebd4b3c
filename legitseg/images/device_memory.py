"""Device memory running out, told apart from other errors, and given back.

Every stage that touches the GPU (decode, upload, the forward pass, postprocessing, layout
tuning) asks here, so one rule decides what counts as out of memory.
"""

from __future__ import annotations

import gc
import re

import torch

# How device memory running out reads when it is not a torch.OutOfMemoryError: the CUDA runtime's
# own text (cudaErrorMemoryAllocation), cuBLAS and cuDNN workspaces (CUBLAS_STATUS_ALLOC_FAILED,
# CUDNN_STATUS_ALLOC_FAILED), and nvJPEG through torchvision, which re-raises whatever the decoder
# hit as a RuntimeError ("Error while decoding JPEG images: ...") and prints nvJPEG's status as a
# number: 5 is NVJPEG_STATUS_ALLOCATOR_FAILURE; a stream synchronisation prints a cudaError_t, of
# which 2 is cudaErrorMemoryAllocation.
_OOM = re.compile(r"out of memory|_ALLOC_FAILED|NVJPEG_STATUS_ALLOCATOR_FAILURE"
                  r"|Failed to (?!synchronize)[a-z ]+: 5\b|Failed to synchronize CUDA stream: 2\b", re.IGNORECASE)


def free_memory(device: torch.device) -> None:
    """Give back what a failed batch held: its tensors are unreachable once the exception is gone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` means the device ran out of memory (by its type, else by its message)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and _OOM.search(str(err)) is not None
