"""Per-model environments (EXECUTION_ENV_PATH: a venv directory and a packed .tar.gz) and
Python model configs that cannot load."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.python_backend_support import ENV_CONFIG, ENV_MODEL, write_python_model


def _make_venv(path: Path) -> Path:
    """A fresh venv. The base interpreter may lack numpy, so a .pth file lets this
    environment reach the test environment's packages (what a prepared env would hold)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, timeout=120)
    purelib = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    (Path(purelib) / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path


@pytest.mark.slow
def test_execution_env_path_venv_and_packed_env_and_broken_configs(
    tmp_path: Path, start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = _make_venv(tmp_path / "envs" / "venv")
    archive = tmp_path / "envs" / "packed.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(venv, arcname=".")
    repository = tmp_path / "repository"
    write_python_model(repository, "env_venv", ENV_MODEL, ENV_CONFIG % venv)
    # Triton's placeholder for the model's directory, resolved at load.
    write_python_model(repository, "env_packed", ENV_MODEL, ENV_CONFIG % "$$TRITON_MODEL_DIRECTORY/packed.tar.gz")
    archive.rename(repository / "env_packed" / "packed.tar.gz")
    write_python_model(repository, "env_missing", ENV_MODEL, ENV_CONFIG % (tmp_path / "nowhere"))
    write_python_model(repository, "no_io", ENV_MODEL, 'backend: "python"\n')
    write_python_model(repository, "bad_init", "class TritonPythonModel:\n    def initialize(self, args):\n"
                       "        raise RuntimeError('cannot find weights')\n", ENV_CONFIG.split("parameters")[0])
    write_python_model(repository, "no_class", "x = 1\n", ENV_CONFIG.split("parameters")[0])

    cache = tmp_path / "cache"
    monkeypatch.setenv("INFERSTACK_CACHE_DIR", str(cache))  # the server inherits it
    server = start_server(repository, "--no-strict-readiness")
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    x = httpclient.InferInput("X", [1], "FP32")
    x.set_data_from_numpy(np.ones(1, np.float32))

    prefix = client.infer("env_venv", [x]).as_numpy("PREFIX")[0].decode()
    assert Path(prefix) == venv
    packed_prefix = Path(client.infer("env_packed", [x]).as_numpy("PREFIX")[0].decode())
    assert packed_prefix.parent == cache / "python_envs"  # unpacked once into the cache
    assert (packed_prefix / "bin").is_dir()

    index = {row["name"]: row for row in httpx.post(f"{server.url}/v2/repository/index", json={}).json()}
    assert "EXECUTION_ENV_PATH" in index["env_missing"]["reason"] and "does not exist" in index["env_missing"]["reason"]
    assert "must declare its inputs and outputs" in index["no_io"]["reason"]
    assert "initialize failed" in index["bad_init"]["reason"] and "cannot find weights" in index["bad_init"]["reason"]
    assert "neither a TritonPythonModel" in index["no_class"]["reason"]
    for name in ("env_missing", "no_io", "bad_init", "no_class"):
        assert not client.is_model_ready(name)
