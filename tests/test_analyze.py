"""``inferstack analyze``: the grid, the choice of the best configuration, rendering candidate configs,
refusing to overwrite outputs, and two end-to-end runs of the command in a subprocess.

Bounded: the end-to-end runs use ``--quick``, 250 ms windows, 3 windows per level and concurrency 1,2
(or 1), about 10-20 s each on a 2-core machine. No assertion depends on how fast the machine is.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inferstack._proto import model_config_pb2 as mc
from inferstack.analyze import configs, runner
from inferstack.analyze.grid import (
    Candidate,
    GridError,
    build_grid,
    estimate_seconds,
    parse_int_list,
    thread_split,
)
from inferstack.analyze.results import ConfigResult, select_best
from inferstack.analyze.server import AnalyzeError
from inferstack.cli import app
from inferstack.perf.engine import LevelResult
from inferstack.repository.config import parse_config_text, validate_config
from inferstack.testing import onnx_models

RUN_TIMEOUT = 150  # seconds; a quick run takes 10-20


# --------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------


def test_default_grid_skips_combinations_that_mean_nothing():
    grid = build_grid(max_instances=4, batch_sizes=[1, 4, 8, 16], delays_us=[0, 100, 1000], batching=True, cores=2)
    assert len(grid) == len(set(grid)) == 4 * 14
    for c in grid:
        assert all(1 < p < c.max_batch_size for p in c.preferred)  # never >= max
        if c.preferred:
            assert c.delay_us > 0  # without a delay a preferred size only caps batches
        if c.max_batch_size == 1:
            assert c.delay_us is None and not c.preferred
    for n in (1, 2, 3, 4):
        mine = [c for c in grid if c.instances == n]
        assert [c for c in mine if c.max_batch_size == 1] == [Candidate(n, thread_split(n, 2), 1)]
        assert {c.max_batch_size for c in mine} == {1, 4, 8, 16}
        assert {c.delay_us for c in mine if c.max_batch_size == 8} == {0, 100, 1000}
        # by default one preferred size: the largest listed size below the max
        assert {c.preferred for c in mine if c.max_batch_size == 16} == {(), (8,)}
        assert {c.preferred for c in mine if c.max_batch_size == 4} == {()}
    assert {c.threads for c in grid if c.instances == 1} == {2}
    assert {c.threads for c in grid if c.instances == 4} == {1}  # never below one thread


def test_explicit_preferred_sizes_are_tried_only_below_the_max():
    grid = build_grid(max_instances=1, batch_sizes=[8], delays_us=[0, 500], batching=True, cores=4,
                      preferred=[2, 8, 32])
    assert grid == [Candidate(1, 4, 8, (), 0), Candidate(1, 4, 8, (), 500), Candidate(1, 4, 8, (2,), 500)]


def test_a_model_without_batching_gets_instance_counts_only():
    grid = build_grid(max_instances=3, batch_sizes=[1, 8], delays_us=[0, 100], batching=False, cores=6)
    assert grid == [Candidate(1, 6), Candidate(2, 3), Candidate(3, 2)]
    assert all(c.max_batch_size is None and c.delay_us is None for c in grid)


def test_quick_grid_is_small():
    grid = build_grid(max_instances=4, batch_sizes=[1, 4, 8, 16], delays_us=[0, 100, 1000], batching=True,
                      cores=2, quick=True)
    assert grid == [Candidate(1, 2, 16, (), 0), Candidate(1, 2, 16, (), 1000),
                    Candidate(2, 1, 16, (), 0), Candidate(2, 1, 16, (), 1000)]
    single = build_grid(max_instances=1, batch_sizes=[4], delays_us=[50], batching=True, cores=2, quick=True)
    assert single == [Candidate(1, 2, 4, (), 50)]


def test_thread_split():
    assert [thread_split(n, 16) for n in (1, 2, 3, 4, 32)] == [16, 8, 5, 4, 1]
    assert thread_split(1, 1) == 1


@pytest.mark.parametrize("text", ["", "1,,2", "a", "1.5", "0", "-3"])
def test_bad_lists_are_clear_errors(text):
    with pytest.raises(GridError, match="--batch-sizes"):
        parse_int_list(text, "--batch-sizes", minimum=1)


def test_lists_are_sorted_and_deduplicated():
    assert parse_int_list(" 16, 1,4,4 ", "--batch-sizes", minimum=1) == [1, 4, 16]
    assert parse_int_list("0,100", "--delays-us", minimum=0) == [0, 100]


def test_estimate_covers_stable_and_unstable_levels():
    low, high = estimate_seconds(10, 3, interval_s=1.0, max_trials=5, reload_s=1.0)
    assert low == pytest.approx(10 * (1 + 3 * 3.1))
    assert high == pytest.approx(10 * (1 + 3 * 5.1))
    assert estimate_seconds(1, 1, 1.0, max_trials=2, reload_s=0)[0] == pytest.approx(2.1)


# --------------------------------------------------------------------------------------
# Best configuration under the budget
# --------------------------------------------------------------------------------------


def _level(concurrency: int, throughput: float, p99_ms: float, *, errors: int = 0, status: str = "stable",
           completed: int = 100) -> LevelResult:
    return LevelResult(
        mode="concurrency", value=concurrency, batch_size=1, status=status, windows=[], measured_windows=3,
        duration_s=1.0, sent=completed + errors, completed=completed, errors=errors, throughput=throughput,
        request_throughput=throughput, send_rate=throughput, late=0, avg_send_delay_us=None,
        latency_us={"avg": p99_ms * 500, "p50": p99_ms * 500, "p99": p99_ms * 1e3}, percentile=99.0,
        first_error=None, server=None, total_sent=completed, total_completed=completed, total_errors=errors,
        server_total=None,
    )


def _result(cid: str, instances: int, *levels: LevelResult) -> ConfigResult:
    return ConfigResult(cid, Candidate(instances, 1, 8, (), 0, original=cid == "original"), "", list(levels))


def test_best_is_the_highest_throughput_within_the_budget():
    results = [
        _result("original", 1, _level(1, 1000, 2), _level(4, 2000, 9)),
        _result("c01", 2, _level(1, 1500, 3), _level(4, 5000, 25)),  # fastest, but over the budget
        _result("c02", 3, _level(1, 1200, 2), _level(4, 3000, 15)),
        _result("c03", 4, _level(4, 9000, 1, errors=3)),  # errors never count
        _result("c04", 4, _level(4, 9000, 1, status="failed", completed=0)),
    ]
    selection = select_best(results, budget_ms=20)
    assert selection.best.result.id == "c02" and selection.best.level.value == 4
    assert selection.qualifying == 5
    assert selection.lowest_latency.result.id == "c02"  # 2 ms like the original, with more throughput
    assert select_best(results, budget_ms=25).best.result.id == "c01"  # p99 == budget qualifies
    assert selection.as_dict()["best"]["config"] == "c02"


def test_ties_prefer_lower_latency_then_fewer_instances():
    results = [_result("c01", 4, _level(1, 1000, 5)), _result("c02", 2, _level(1, 1000, 5)),
               _result("c03", 1, _level(1, 1000, 6))]
    assert select_best(results, budget_ms=10).best.result.id == "c02"


def test_when_nothing_qualifies_the_lowest_latency_point_is_reported():
    results = [_result("original", 1, _level(1, 1000, 30)), _result("c01", 2, _level(1, 800, 21), _level(2, 900, 40))]
    selection = select_best(results, budget_ms=20)
    assert selection.best is None and selection.qualifying == 0
    assert selection.lowest_latency.result.id == "c01" and selection.lowest_latency.level.value == 1
    assert selection.as_dict()["best"] is None
    empty = select_best([_result("c01", 1, _level(1, 0, 1, status="failed", completed=0))], budget_ms=20)
    assert empty.best is None and empty.lowest_latency is None


# --------------------------------------------------------------------------------------
# Rendering candidate configs
# --------------------------------------------------------------------------------------

ORIGINAL = """
# The example MLP, with everything analyze must keep.
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching {
  preferred_batch_size: [ 32 ]
  max_queue_delay_microseconds: 2000
  default_queue_policy { max_queue_size: 99 }
}
instance_group [ { count: 3 kind: KIND_CPU }, { count: 1 kind: KIND_CPU } ]
parameters { key: "inter_op_thread_count" value: { string_value: "1" } }
model_warmup [ { name: "w" batch_size: 32 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 64 ] zero_data: true } } } ]
"""


def _original() -> mc.ModelConfig:
    return parse_config_text(ORIGINAL, "original")


def test_rendered_config_parses_and_keeps_everything_not_swept():
    original = _original()
    rendered = configs.render(original, Candidate(2, 1, 8, (4,), 100))
    text = configs.config_text(rendered, ["written by a test", "", "second line"])
    assert text.startswith("# written by a test\n#\n# second line\n")
    config = parse_config_text(text, "rendered")
    validate_config(config, "mlp", "rendered")
    assert list(config.input) == list(original.input) and list(config.output) == list(original.output)
    assert config.name == "mlp" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 99
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert config.parameters["inter_op_thread_count"].string_value == "1"
    assert config.model_warmup[0].batch_size == 8  # a larger warmup batch would fail the load
    assert original.max_batch_size == 64 and original.instance_group[0].count == 3  # not modified


def test_max_batch_size_1_drops_preferred_sizes_and_no_batching_leaves_batching_alone():
    config = configs.render(_original(), Candidate(1, 2, 1))
    validate_config(config, "mlp", "rendered")
    assert config.max_batch_size == 1 and not config.dynamic_batching.preferred_batch_size
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000  # irrelevant at 1, left as it was
    plain = parse_config_text('max_batch_size: 0\ninput [ { name: "X" data_type: TYPE_FP32 dims: [ 3 ] } ]', "p")
    config = configs.render(plain, Candidate(3, 1))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, mc.ModelInstanceGroup.KIND_CPU)]


def test_batching_candidates_add_dynamic_batching_to_a_config_without_it():
    empty = mc.ModelConfig()  # no config.pbtxt: auto-completed by the server
    config = parse_config_text(configs.config_text(configs.render(empty, Candidate(1, 2, 16, (), 0))), "r")
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    assert not config.input and not config.output


def test_the_original_candidate_renders_unchanged():
    original = _original()
    rendered = configs.render(original, Candidate(4, None, 64, (32,), 2000, original=True))
    assert configs.same_config(rendered, original)
    assert not configs.same_config(configs.render(original, Candidate(4, 1, 64, (32,), 2000)), original)


def test_original_candidate_is_described_from_the_effective_config():
    effective = {"max_batch_size": 64, "instance_group": [{"count": 2}, {"count": 0}],
                 "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": "100"},
                 "parameters": {"intra_op_thread_count": {"string_value": "3"}}}
    assert runner.original_candidate(effective) == Candidate(3, 3, 64, (8,), 100, original=True)
    assert runner.original_candidate({"max_batch_size": 0}) == Candidate(1, None, 0, (), None, original=True)


# --------------------------------------------------------------------------------------
# Never overwriting
# --------------------------------------------------------------------------------------


def test_write_refuses_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "out.pbtxt"
    path.write_text("mine")
    with pytest.raises(configs.OutputExistsError, match="already exists.*--overwrite"):
        configs.check_writable(path, False, "--output-config")
    with pytest.raises(configs.OutputExistsError, match="already exists"):
        configs.write_text(path, "new", overwrite=False)
    assert path.read_text() == "mine"
    configs.check_writable(path, True, "--output-config")
    configs.write_text(path, "new", overwrite=True)
    assert path.read_text() == "new"
    configs.write_text(tmp_path / "sub" / "fresh.pbtxt", "x", overwrite=False)
    assert (tmp_path / "sub" / "fresh.pbtxt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pbtxt", "sub"]  # no temporary files left


def _mlp_repository(root: Path) -> Path:
    onnx_models.write_model(root, "mlp", onnx_models.mlp(), ORIGINAL.replace("count: 3", "count: 1")
                            .replace("{ count: 1 kind: KIND_CPU }, ", ""))
    return root


def test_cli_refuses_an_existing_output_before_starting_anything(tmp_path, monkeypatch):
    repository = _mlp_repository(tmp_path / "repo")
    existing = tmp_path / "mlp.analyzed.config.pbtxt"
    existing.write_text("keep me")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = CliRunner().invoke(app, ["analyze", "-m", "mlp", "--repository", str(repository)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--overwrite" in result.output
    assert existing.read_text() == "keep me"
    assert not list((tmp_path / "tmp").glob("inferstack-analyze-*"))  # no temporary repository was made
    result = CliRunner().invoke(app, ["analyze", "-m", "nope", "--repository", str(repository),
                                      "--output-config", str(tmp_path / "other.pbtxt")])
    assert result.exit_code == 1 and "not a directory of the repository" in result.output


def test_plot_without_matplotlib_is_refused_up_front(tmp_path, monkeypatch):
    repository = _mlp_repository(tmp_path / "repo")
    monkeypatch.setattr(runner.perf_report, "plot_available", lambda: False)
    settings = runner.AnalyzeSettings(model="mlp", repository=repository, plot=tmp_path / "p.png",
                                      output_config=tmp_path / "o.pbtxt")
    with pytest.raises(AnalyzeError, match=r"matplotlib.*inferstack\[perf\]"):
        runner.check(settings)
    with pytest.raises(AnalyzeError, match="--delays-us"):
        runner.check(runner.AnalyzeSettings(model="mlp", repository=repository, delays_us="0,-1",
                                            output_config=tmp_path / "o.pbtxt"))


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def _fingerprint(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


def _analyze(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmpdir), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "inferstack", "analyze", *args], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie not yet reaped by anyone is gone too; /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_end_to_end_quick_run_writes_a_config_and_leaves_the_repository_alone(tmp_path):
    repository = _mlp_repository(tmp_path / "repo")
    before = _fingerprint(repository)
    result = _analyze(tmp_path, "-m", "mlp", "--repository", str(repository), "--quick", "--concurrency", "1,2",
                      "--measurement-interval", "250", "--max-trials", "3", "--latency-budget-ms", "10000",
                      "--json", "results.json", "--plot", "summary.png")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    written = tmp_path / "mlp.analyzed.config.pbtxt"
    assert written.is_file(), output
    text = written.read_text()
    assert text.startswith("# Written by inferstack analyze")
    config = parse_config_text(text, str(written))
    validate_config(config, "mlp", str(written))
    original = parse_config_text((repository / "mlp" / "config.pbtxt").read_text(), "original")
    assert list(config.input) == list(original.input) and list(config.output) == list(original.output)
    assert config.model_warmup and config.parameters["inter_op_thread_count"].string_value == "1"
    assert "Best under p99" in output and "c04" in output and "original" in output
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    document = json.loads((tmp_path / "results.json").read_text())
    assert document["complete"] is True and document["model"]["batching"] is True
    ids = [c["id"] for c in document["configs"]]
    assert ids == ["original", "c01", "c02", "c03", "c04"]
    for entry in document["configs"]:
        assert entry["load_error"] is None
        assert [lv["value"] for lv in entry["levels"]] == [1, 2]
        assert all(lv["completed"] > 0 for lv in entry["levels"])
    assert {(c["instances"], c["max_batch_size"], c["max_queue_delay_microseconds"])
            for c in document["configs"][1:]} == {(1, 16, 0), (1, 16, 1000), (2, 16, 0), (2, 16, 1000)}
    best = document["selection"]["best"]
    assert best is not None and document["output_config"].endswith("mlp.analyzed.config.pbtxt")

    assert _fingerprint(repository) == before  # the user's repository is untouched
    assert not list((tmp_path / "tmp").glob("inferstack-analyze-*"))  # the temporary repository is gone
    assert _process_gone(document["server"]["pid"])  # and so is the server

    again = _analyze(tmp_path, "-m", "mlp", "--repository", str(repository), "--quick")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert written.read_text() == text


def test_end_to_end_grpc_without_batching_and_an_impossible_budget(tmp_path):
    repository = tmp_path / "repo"
    onnx_models.write_model(repository, "nobatch", onnx_models.identity("FP32", [2, 3], batch=False), """
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]
""")
    before = _fingerprint(repository)
    result = _analyze(tmp_path, "-m", "nobatch", "--repository", str(repository), "--quick", "--protocol", "grpc",
                      "--concurrency", "1", "--measurement-interval", "250", "--max-trials", "3",
                      "--latency-budget-ms", "0.001", "--json", "results.json")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "No configuration kept p99 within 0.001 ms" in output and "Nothing written" in output
    assert "instance counts only" in output
    assert not (tmp_path / "nobatch.analyzed.config.pbtxt").exists()
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["model"]["batching"] is False
    assert [(c["instances"], c["max_batch_size"]) for c in document["configs"]] == [(1, 0), (1, None), (2, None)]
    assert all(lv["completed"] > 0 for c in document["configs"] for lv in c["levels"])
    assert document["selection"]["best"] is None and document["selection"]["lowest_latency"] is not None
    assert _fingerprint(repository) == before
    assert not list((tmp_path / "tmp").glob("inferstack-analyze-*"))
    assert _process_gone(document["server"]["pid"])


def test_temporary_repository_never_writes_through_to_the_users_files(tmp_path):
    from inferstack.analyze.server import TemporaryRepository

    model_dir = _mlp_repository(tmp_path / "repo") / "mlp"
    (model_dir / "warmup").mkdir()
    (model_dir / "warmup" / "sample.bin").write_bytes(b"\0" * 256)
    (tmp_path / "outside.txt").write_text("labels")
    (model_dir / "labels.txt").symlink_to(tmp_path / "outside.txt")  # would resolve outside a repository
    before = _fingerprint(tmp_path / "repo")
    config_before = (model_dir / "config.pbtxt").read_text()
    repo = TemporaryRepository(model_dir, "mlp")
    try:
        repo.populate()
        assert not (repo.model_dir / "config.pbtxt").exists()  # written by analyze, never copied
        assert (repo.model_dir / "1" / "model.onnx").read_bytes() == (model_dir / "1" / "model.onnx").read_bytes()
        assert (repo.model_dir / "warmup" / "sample.bin").stat().st_size == 256
        labels = repo.model_dir / "labels.txt"
        assert not labels.is_symlink() and labels.read_text() == "labels"  # a file inside the copy
        repo.write_config("max_batch_size: 4\n")
        repo.write_config("max_batch_size: 8\n")
        assert (repo.model_dir / "config.pbtxt").read_text() == "max_batch_size: 8\n"
    finally:
        repo.remove()
    assert not repo.base.exists()
    assert (model_dir / "config.pbtxt").read_text() == config_before
    assert _fingerprint(tmp_path / "repo") == before
