"""The model manager in process: reloads, the retired-version hand-over, failed loads,
repository snapshots, poll-mode scans and warmup samples (no server, no HTTP)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from inferstack._proto import model_config_pb2 as mc
from inferstack.core.errors import InvalidArgumentError, ModelLoadError, UnavailableError
from inferstack.core.types import InferenceRequest
from inferstack.repository import ModelConfigError, ModelRepository
from inferstack.repository.config import parse_config_text
from inferstack.serving import ModelManager, ModelState, ServerOptions
from inferstack.serving.warmup import build_samples
from inferstack.serving.watcher import RepositoryWatcher
from inferstack.testing import onnx_models

CONFIG = "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: %d }\n"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def manager_for(root: Path, mode: str = "explicit") -> ModelManager:
    return ModelManager(ServerOptions(model_repository=root, model_control_mode=mode, unload_timeout=30))


def request(model: str, version: str = "") -> InferenceRequest:
    return InferenceRequest(model_name=model, model_version=version,
                            inputs={"INPUT0": np.zeros((1, 4), dtype=np.float32)})


def answer(response) -> float:
    return float(response.outputs["OUTPUT0"][0, 0])


def test_a_request_that_resolved_a_retired_version_is_served_by_the_new_one(tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONFIG % 0)

    async def scenario():
        manager = manager_for(tmp_path)
        await manager.load("m")
        old = manager.get("m")
        (tmp_path / "m" / "config.pbtxt").write_text(CONFIG % 500)
        await manager.load("m")
        new = manager.get("m")
        assert new is not old and old.scheduler is None and old.state is ModelState.UNAVAILABLE
        # A transport looked the version up, then awaited the body while the reload
        # happened: the request still succeeds, on the version serving now.
        response = await old.infer(request("m"))
        assert answer(response) == 1.0
        assert new.stats.success.count == 1 and old.stats.success.count == 0
        # The same while the old version is still draining (scheduler closing).
        (tmp_path / "m" / "config.pbtxt").write_text(CONFIG % 700)
        reload = asyncio.ensure_future(manager.load("m"))
        while manager.get("m") is new:
            await asyncio.sleep(0.01)
        if new.scheduler is not None:
            assert new.scheduler.closing
        assert answer(await new.infer(request("m"))) == 1.0
        await reload
        # Nothing serves: the hand-over fails with the manager's own reason.
        current = manager.get("m")
        await manager.unload("m")
        with pytest.raises(UnavailableError):
            await current.infer(request("m"))
        await manager.shutdown()

    run(scenario())


def test_reload_keeps_versions_whose_files_did_not_change(tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONFIG % 0
                            + "version_policy { latest { num_versions: 2 } }\n")

    async def scenario():
        manager = manager_for(tmp_path)
        await manager.load("m")
        v1 = manager.get("m", "1")
        await manager.load("m")  # nothing changed
        assert manager.get("m", "1") is v1 and v1.scheduler is not None
        onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(2.0), versions=(2,))
        await manager.load("m")
        assert manager.get("m", "1") is v1  # untouched by the new version beside it
        assert answer(await manager.get("m").infer(request("m"))) == 2.0
        (tmp_path / "m" / "1" / "model.onnx").write_bytes(onnx_models.add_constant(3.0))
        await manager.load("m")
        assert manager.get("m", "1") is not v1 and v1.scheduler is None
        assert answer(await manager.get("m", "1").infer(request("m", "1"))) == 3.0
        await manager.shutdown()

    run(scenario())


def test_a_reloaded_version_never_answers_from_the_old_ones_cache(tmp_path: Path):
    from inferstack.serving.cache import LocalResponseCache

    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0),
                            CONFIG % 0 + "response_cache { enable: true }\n")

    async def scenario():
        manager = ModelManager(ServerOptions(model_repository=tmp_path, model_control_mode="explicit",
                                             response_cache=LocalResponseCache(1 << 20)))
        await manager.load("m")
        assert answer(await manager.get("m").infer(request("m"))) == 1.0
        assert answer(await manager.get("m").infer(request("m"))) == 1.0  # a hit
        assert manager.get("m").stats.cache_hit.count == 1
        (tmp_path / "m" / "1" / "model.onnx").write_bytes(onnx_models.add_constant(4.0))
        await manager.load("m")  # same version number, new model file
        assert answer(await manager.get("m").infer(request("m"))) == 4.0
        await manager.shutdown()

    run(scenario())


def test_a_failed_new_version_leaves_the_old_one_serving(tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONFIG % 0)

    async def scenario():
        manager = manager_for(tmp_path)
        await manager.load("m")
        v1 = manager.get("m")
        onnx_models.write_model(tmp_path, "m", b"not onnx", versions=(2,))
        with pytest.raises(ModelLoadError, match="version 2"):
            await manager.load("m")
        # Policy "latest 1" selects only version 2, which failed: version 1 keeps serving.
        assert manager.get("m") is v1 and v1.scheduler is not None
        manager.startup_complete = True
        assert manager.server_ready()  # it still serves: a failed reload keeps it ready
        rows = {row["version"]: row for row in manager.index()}
        assert rows["1"]["state"] == "READY"
        assert rows["2"]["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in rows["2"]["reason"]
        # A broken config leaves it serving as well, and says so.
        (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: [")
        with pytest.raises(ModelLoadError, match="config.pbtxt"):
            await manager.load("m")
        assert manager.get("m") is v1
        assert "reload failed" in manager.index()[0]["reason"]
        await manager.shutdown()

    run(scenario())


def test_unicode_digit_versions_are_refused_not_crashing(tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONFIG % 0)
    (tmp_path / "m" / "\u00b2").mkdir()  # "²".isdigit() is True; int("²") raises

    async def scenario():
        manager = manager_for(tmp_path)
        await manager.load("m")
        for version in ("\u00b2", "\u0661", "-1", "1.0"):
            with pytest.raises(InvalidArgumentError):
                manager.get("m", version)
        with pytest.raises(InvalidArgumentError, match="invalid model name"):
            manager.get("../m")
        await manager.shutdown()

    run(scenario())


# -- snapshots and the watcher ------------------------------------------------------------------


def test_snapshot_sees_config_content_versions_and_files(tmp_path: Path):
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(1.0), CONFIG % 0)
    repository = ModelRepository(tmp_path)
    first = repository.snapshot("m")
    assert repository.snapshot("m") == first
    config = tmp_path / "m" / "config.pbtxt"
    stat = config.stat()
    config.write_text(CONFIG % 9)  # same size ...
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and same mtime
    second = repository.snapshot("m")
    assert second != first and second.version(1) == first.version(1)
    onnx_models.write_model(tmp_path, "m", onnx_models.add_constant(2.0), versions=(2,))
    third = repository.snapshot("m")
    assert third.version(2) is not None and third.version(1) == second.version(1)
    model_file = tmp_path / "m" / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    assert repository.snapshot("m").version(1) != third.version(1)
    (tmp_path / "m" / "warmup").mkdir()
    (tmp_path / "m" / "warmup" / "x").write_bytes(b"1234")
    assert repository.snapshot("m").shared != third.shared


def test_snapshot_never_walks_a_model_that_links_outside(tmp_path: Path):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    root.mkdir()
    onnx_models.write_model(outside, "real", onnx_models.add_constant(1.0))
    (root / "evil").symlink_to(outside / "real")
    snapshot = ModelRepository(root).snapshot("evil")
    assert snapshot.versions == () and "<outside>" in snapshot.shared[0]


def test_watcher_loads_reloads_and_unloads_only_what_changed(tmp_path: Path):
    onnx_models.write_model(tmp_path, "a", onnx_models.add_constant(1.0), CONFIG % 0)
    onnx_models.write_model(tmp_path, "b", onnx_models.add_constant(2.0), CONFIG % 0)

    async def scenario():
        manager = manager_for(tmp_path, "poll")
        watcher = RepositoryWatcher(manager, interval=3600)
        await watcher.baseline()
        await manager.load_startup_models()
        a, b = manager.get("a"), manager.get("b")
        await watcher.poll_once()
        assert manager.get("a") is a and manager.get("b") is b  # nothing changed
        (tmp_path / "a" / "config.pbtxt").write_text(CONFIG % 100)
        onnx_models.write_model(tmp_path, "c", onnx_models.add_constant(3.0), CONFIG % 0)
        await watcher.poll_once()
        assert manager.get("a") is not a and manager.get("b") is b
        assert answer(await manager.get("c").infer(request("c"))) == 3.0
        import shutil

        shutil.rmtree(tmp_path / "b")
        await watcher.poll_once()
        with pytest.raises(UnavailableError):
            manager.get("b")
        assert b.scheduler is None
        # A broken config is not retried every scan, and what served keeps serving.
        a2 = manager.get("a")
        (tmp_path / "a" / "config.pbtxt").write_text("max_batch_size: [")
        await watcher.poll_once()
        assert manager.get("a") is a2
        await watcher.poll_once()
        assert watcher.scans == 5
        await manager.shutdown()

    run(scenario())


# -- warmup samples -------------------------------------------------------------------------------


def _warmup_config(text: str) -> mc.ModelConfig:
    return parse_config_text(text, "cfg")


def test_warmup_samples_follow_tritons_rules(tmp_path: Path):
    (tmp_path / "warmup").mkdir()
    row = np.arange(4, dtype=np.float32)
    (tmp_path / "warmup" / "row.bin").write_bytes(row.tobytes() + b"extra is fine")
    config = _warmup_config("""
max_batch_size: 8
model_warmup [
  { name: "zeros" batch_size: 3 count: 2 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } },
  { name: "random" batch_size: 1 inputs { key: "A" value: { data_type: TYPE_INT32 dims: [ 2, 2 ] random_data: true } } },
  { name: "file" batch_size: 2 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "row.bin" } } },
  { name: "text" batch_size: 1 inputs { key: "S" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } } },
  { name: "skipped" batch_size: 0 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } }
]
""")
    samples = {s.name: s for s in build_samples(config, tmp_path, "m")}
    assert set(samples) == {"zeros", "random", "file", "text"}
    assert samples["zeros"].inputs["A"].shape == (3, 4) and samples["zeros"].count == 2
    assert not samples["zeros"].inputs["A"].any()
    assert samples["random"].inputs["A"].dtype == np.int32 and samples["random"].count == 1
    np.testing.assert_array_equal(samples["file"].inputs["A"], np.stack([row, row]))
    assert samples["text"].inputs["S"].tolist() == [[b"", b""]]


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ('batch_size: 9 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }',
         "exceeds max_batch_size 8"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ -1 ] zero_data: true } }',
         "must all be specified"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] } }',
         "set one of zero_data"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "short.bin" } }',
         "needs 16 bytes"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "missing.bin" } }',
         "not found"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "../config.pbtxt" } }',
         "inside the model's warmup/ folder"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "/etc/passwd" } }',
         "inside the model's warmup/ folder"),
        ('batch_size: 1 inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "link.bin" } }',
         "inside the model's warmup/ folder"),
        ("batch_size: 1", "no inputs"),
    ],
)
def test_bad_warmup_samples_name_the_sample(tmp_path: Path, sample: str, message: str):
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "short.bin").write_bytes(b"\0" * 8)
    (tmp_path / "config.pbtxt").write_text("secret")
    (tmp_path / "warmup" / "link.bin").symlink_to(tmp_path / "config.pbtxt")
    config = _warmup_config(f'max_batch_size: 8 model_warmup [ {{ name: "w1" {sample} }} ]')
    with pytest.raises(ModelConfigError, match=message) as caught:
        build_samples(config, tmp_path, "model 'm'")
    assert "warmup sample 'w1'" in str(caught.value)


def test_warmup_runs_on_every_instance_and_a_bad_sample_fails_the_load(tmp_path: Path):
    warmup = ('model_warmup [ { name: "w" batch_size: 2 count: 3 inputs { key: "INPUT0" '
              'value: { data_type: TYPE_FP32 dims: [ %d ] zero_data: true } } } ]\n')
    onnx_models.write_model(tmp_path, "good", onnx_models.add_constant(1.0),
                            CONFIG % 0 + "instance_group [ { count: 2 } ]\n" + warmup % 4)
    onnx_models.write_model(tmp_path, "bad", onnx_models.add_constant(1.0), CONFIG % 0 + warmup % 3)

    async def scenario():
        manager = manager_for(tmp_path)
        await manager.load("good")
        good = manager.get("good")
        assert good.warmup_seconds > 0 and good.load_seconds >= good.warmup_seconds
        assert good.stats.success.count == 0  # warmup is not traffic
        with pytest.raises(ModelLoadError, match="warmup sample 'w' is invalid") as caught:
            await manager.load("bad")
        assert "shape [2, 3]" in str(caught.value)
        (row,) = [r for r in manager.index() if r["name"] == "bad"]
        assert row["state"] == "UNAVAILABLE" and "warmup" in row["reason"]
        await manager.shutdown()

    run(scenario())
