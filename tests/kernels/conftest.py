import pytest
import torch


@pytest.fixture(autouse=True)
def no_tf32():
    """IEEE fp32 on both sides of a comparison (the Triton conv follows PyTorch's cuDNN TF32 setting like
    eager does). The current API where it exists: once it sets conv apart from rnn, the legacy flags raise."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if getattr(cudnn_conv, "fp32_precision", None) is not None and hasattr(matmul, "fp32_precision"):
        saved = cudnn_conv.fp32_precision, matmul.fp32_precision
        cudnn_conv.fp32_precision = matmul.fp32_precision = "ieee"
        yield
        cudnn_conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
