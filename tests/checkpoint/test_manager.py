"""Committed step directories: marker last, `latest` pointer, keep-last-k, crash leftovers ignored."""

from __future__ import annotations

import pytest
import torch

from ldmscale.checkpoint.io import load_safetensors, save_safetensors, torch_load_weights_only
from ldmscale.checkpoint.manager import COMMIT_MARKER, LATEST, CheckpointManager
from ldmscale.distributed.env import ProcessEnv


def _write_payload(value: int):
    def write(directory):
        (directory / "payload.txt").write_text(str(value))
    return write


def test_save_commits_and_points_latest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, penv=ProcessEnv())
    for step in (10, 20, 30):
        manager.save(step, _write_payload(step))
    assert manager.committed_steps() == [20, 30]  # keep-last-2 pruned step 10
    assert (tmp_path / LATEST).read_text().strip() == "step-00000030"
    latest = manager.latest()
    assert latest.name == "step-00000030" and (latest / "payload.txt").read_text() == "30"
    assert not list(tmp_path.glob("*.tmp"))


def test_folder_without_marker_is_ignored(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5, penv=ProcessEnv())
    manager.save(10, _write_payload(10))
    manager.save(20, _write_payload(20))
    # A crash after the rename but before the marker was synced, or a partial copy: no marker.
    (tmp_path / "step-00000020" / COMMIT_MARKER).unlink()
    assert manager.latest().name == "step-00000010"
    # A crash during the write leaves only the temporary folder, also never loaded.
    (tmp_path / "step-00000030.tmp").mkdir()
    (tmp_path / LATEST).write_text("step-00000030\n")
    assert manager.latest().name == "step-00000010"
    manager.remove_incomplete()
    assert not (tmp_path / "step-00000030.tmp").exists()


def test_newer_committed_folder_wins_over_stale_pointer(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5, penv=ProcessEnv())
    manager.save(10, _write_payload(10))
    manager.save(20, _write_payload(20))
    (tmp_path / LATEST).write_text("step-00000010\n")  # pointer update lost in a crash
    assert manager.latest().name == "step-00000020"


def test_empty_root_has_no_latest(tmp_path):
    assert CheckpointManager(tmp_path / "none", keep_last=1, penv=ProcessEnv()).latest() is None


def test_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    loaded = load_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(tensors[k], loaded[k]) for k in tensors)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": _Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        torch_load_weights_only(path)
    assert "this must never run" not in capsys.readouterr().out


def test_truncated_file_is_reported_as_such(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        torch_load_weights_only(path)
