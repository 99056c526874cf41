"""One ``--device`` parser for rs-engine and rs-train (issue 18: rs-train refused ``cuda:1``, rs-engine took it)."""

from __future__ import annotations

import pytest
import torch

from rs_engine.device import resolve_device
from rs_engine.errors import InputError
from training.commands import device as train_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert train_device("cpu") == "cpu"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda1", "mps:0", ""])
def test_unknown_names_are_refused_by_both(spec):
    for parse in (resolve_device, train_device):
        with pytest.raises(InputError, match=r"must be auto, cpu, cuda or cuda:N"):
            parse(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_gpu_same_message_in_both(spec):
    messages = []
    for parse in (resolve_device, train_device):
        with pytest.raises(InputError) as err:
            parse(spec)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"--device {spec}: no CUDA GPU is available")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_index_beyond_the_count():
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == torch.device(f"cuda:{n - 1}")
    with pytest.raises(InputError, match="GPU"):
        resolve_device(f"cuda:{n}")
