import pytest
import torch


@pytest.fixture(autouse=True)
def no_tf32():
    """IEEE fp32 on both sides of a comparison (the Triton conv follows cudnn.allow_tf32 like eager does)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
