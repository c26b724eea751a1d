"""Loading never runs pickled code, and damaged files are reported as damaged."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldmscale.convert.deepspeed import consolidate
from ldmscale.convert.files import read_state_file, write_state_file


class _Exploit:
    """Unpickling this would run a shell command (the classic malicious-checkpoint payload)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": _Exploit(str(marker))}, path)
    refused = r"refusing to load .*model\.ckpt: its pickle asks for `(posix|os|nt)\.system`, which is code"
    with pytest.raises(ValueError, match=refused):
        read_state_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_truncated_file_is_refused_as_truncated(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    write_state_file(state, path, global_step=5)
    assert all(torch.equal(v, state[k]) for k, v in read_state_file(path).items())  # intact, it reads back
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_state_file(path)


def test_a_lightning_checkpoint_with_callback_states_loads(tmp_path):
    """Early Lightning keyed callback states by the ModelCheckpoint class (SD 1.x releases): that global,
    and NumPy scores, are allowed as inert data; the weights are unwrapped from `state_dict`."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__)
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update({n: types.ModuleType(n) for n in names[:2]})
    sys.modules[module.__name__] = module
    try:
        torch.save({"state_dict": {"model.w": torch.ones(3)}, "global_step": 470000,
                    "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25)}}}, tmp_path / "sd.ckpt")
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    state = read_state_file(tmp_path / "sd.ckpt")
    assert list(state) == ["model.w"] and torch.equal(state["model.w"], torch.ones(3))


def test_non_tensor_entries_and_unknown_types_are_errors(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1), "note": "hello"}}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"non-tensor entries \['note'\]"):
        read_state_file(tmp_path / "a.ckpt")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "weights.data"))  # safetensors, recognised by its header
    assert list(read_state_file(tmp_path / "weights.data")) == ["w"]
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="unknown weight file type '.npz'"):
        read_state_file(tmp_path / "b.npz")


def test_a_truncated_deepspeed_shard_is_refused(tmp_path):
    """A rank's file cut short (a crashed copy) is named, not consolidated into wrong weights."""
    folder = tmp_path / "state"
    folder.mkdir()
    torch.save({"module": {"w": torch.zeros(4)}, "buffer_names": []}, folder / "mp_rank_00_model_states.pt")
    data = (folder / "mp_rank_00_model_states.pt").read_bytes()
    (folder / "mp_rank_00_model_states.pt").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="model_states.pt: not a readable torch checkpoint; it is truncated"):
        consolidate(folder)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"optim state files of ranks \[0\] are missing"):
        consolidate(folder)
