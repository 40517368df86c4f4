"""`codec_calibration: auto` where vLLM runs the model (issue #17): the calibration is computed once per
model by a separate process from the model's folder, cached by the model's digest, computed by one instance
while the others wait, and the engine's cachegen tiers switch to it (uncalibrated or raw until then)."""

import dataclasses
import fcntl
import threading

import pytest
import torch

from kvshelf.assembly import autocalibration as auto
from kvshelf.assembly.engine import Owned, open_engine
from kvshelf.codecs import calibration as calib
from kvshelf.config import KVShelfConfig
from kvshelf.model import calibrate as calibrate_mod
from kvshelf.model.runner import ModelRunner
from tests.conftest import build_tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Gemma 3 saved as a Hugging Face folder, as vLLM would be given one."""
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    build_tiny_model("gemma3").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_calibration():
    runner = ModelRunner(build_tiny_model("gemma3"))
    ids = torch.randint(3, 250, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    return runner, calibrate_mod.calibrate(runner, ids)


def write_cached(cal, key, folder):
    """What the child leaves behind: the file, then the index naming it."""
    calib.save(cal, folder)
    (folder / f"auto-{key}.txt").write_text(cal.digest)


@pytest.mark.slow  # a real child process: Python, torch and a tiny calibration (~10-20 s)
def test_the_child_process_computes_the_calibration_once_and_every_instance_reads_it(model_dir, tmp_path):
    key = auto.cache_key("files:tiny")
    got = []
    job = auto.AutoCalibration(model_dir, key, got.append, threads=1, folder=tmp_path, poll_s=0.1).start()
    assert job.done.wait(600), "the calibration process did not finish"
    job.stop()
    assert job.error is None and len(got) == 1
    cal = got[0]
    assert cal.layout == (4, 2, 16)  # the tiny model's (layers, KV heads, head dim)
    assert auto.cached(key, tmp_path).digest == cal.digest
    # A second instance finds it at once, with no process started.
    again = []
    second = auto.AutoCalibration("/no/such/model", key, again.append, folder=tmp_path).start()
    assert second.done.is_set() and again[0].digest == cal.digest and second._proc is None
    # Another model's key has nothing yet.
    assert auto.cached(auto.cache_key("files:other"), tmp_path) is None


def in_process(monkeypatch):
    """The child's work in this process (fast): flock conflicts between two opens of the lock file here too."""
    monkeypatch.setattr(
        auto.AutoCalibration, "_child", lambda self: auto.compute(self.model_dir, self.key, self.folder)
    )


def test_while_one_process_holds_the_lock_the_others_wait_for_its_file(tiny_calibration, tmp_path, monkeypatch):
    _, cal = tiny_calibration
    in_process(monkeypatch)
    model_dir = tmp_path / "model"  # never loaded: the lock is held
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    key = auto.cache_key("files:locked")
    with open(tmp_path / f"auto-{key}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert auto.compute("/no/such/model", key, tmp_path) == auto.BUSY  # never loads the model
        got = []
        job = auto.AutoCalibration(model_dir, key, got.append, folder=tmp_path, poll_s=0.1).start()
        assert not job.done.wait(0.5)  # its child found the lock held and exited: it polls
        write_cached(cal, key, tmp_path)  # the holder finishes
    assert job.done.wait(300)
    job.stop()
    assert job.error is None and got[0].digest == cal.digest


def test_a_failed_computation_is_reported_and_leaves_the_tiers_as_they_are(tmp_path, monkeypatch):
    job = auto.AutoCalibration(tmp_path / "not-a-model", auto.cache_key("x"), lambda c: None, folder=tmp_path)
    assert job.start().done.is_set() and "no config.json" in job.error  # no process started
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    in_process(monkeypatch)
    job = auto.AutoCalibration(broken, auto.cache_key("y"), lambda c: None, folder=tmp_path).start()
    assert job.done.wait(60)
    job.stop()
    assert job.calibration is None and job.error
    assert not (tmp_path / f"auto-{auto.cache_key('y')}.txt").exists()
    monkeypatch.setattr(auto.AutoCalibration, "_child", lambda self: 1)  # the child's exit status, reported
    job = auto.AutoCalibration(broken, auto.cache_key("z"), lambda c: None, folder=tmp_path).start()
    assert job.done.wait(60) and "status 1" in job.error


def test_a_half_written_or_damaged_calibration_is_never_used(tiny_calibration, tmp_path):
    _, cal = tiny_calibration
    key = auto.cache_key("files:damaged")
    calib.save(cal, tmp_path)
    assert auto.cached(key, tmp_path) is None  # the file without its index: not finished
    (tmp_path / f"auto-{key}.txt").write_text(cal.digest)
    assert auto.cached(key, tmp_path).digest == cal.digest
    path = tmp_path / f"{cal.digest}{calib.SUFFIX}"
    path.write_bytes(path.read_bytes()[:-100])  # cut short
    calib._registry.pop(cal.digest, None)
    assert auto.cached(key, tmp_path) is None


def test_a_tensor_parallel_rank_gets_the_part_of_its_kv_heads(tiny_calibration):
    runner, cal = tiny_calibration
    fp = runner.fingerprint()
    assert auto.shard(cal, fp) is cal
    rank1 = dataclasses.replace(fp, num_kv_heads=1, extra={**fp.extra, "tp": {"size": 2, "kv_heads": [1, 2]}})
    part = auto.shard(cal, rank1)
    assert part.layout == (4, 1, 16) and torch.equal(part.forward[:, :, 0], cal.forward[:, :, 1])
    assert part.digest == auto.shard(cal, rank1).digest != cal.digest  # every rank-1 instance names the same
    with pytest.raises(calib.CalibrationError):
        auto.shard(cal, dataclasses.replace(fp, head_dim=32))


@pytest.mark.parametrize("pending", ["uncalibrated", "raw"])
def test_engine_tiers_code_pending_then_switch_to_the_calibration(tiny_calibration, tmp_path, monkeypatch, pending):
    runner, cal = tiny_calibration
    model_dir = tmp_path / "model"  # never loaded: the child is replaced
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "cache"))
    config = KVShelfConfig(
        local_cpu=False,
        local_disk=str(tmp_path / "disk"),
        local_disk_codec="cachegen",
        codec_calibration_pending=pending,
        chunk_size=16,
    )
    fp = runner.fingerprint()
    owned = Owned.for_config(config)
    engine = open_engine(config, fp, owned=owned)  # as inside vLLM: no runner
    disk = engine.backend.tiers[0].backend
    started = threading.Event()
    monkeypatch.setattr(auto.AutoCalibration, "_child", lambda self: started.set() or auto.BUSY)
    try:
        job = auto.start(engine, config, fp, model_dir, owned)
        owned.jobs.append(job)
        assert started.wait(30) and not job.done.is_set()
        assert disk.codec.name == ("none" if pending == "raw" else "cachegen") and not disk.codec.params().get(
            "calibration"
        )
        ids = list(range(10, 42))
        buf = runner.new_kv(len(ids))
        runner.forward(ids, 0, buf)
        kv = buf.data.clone()
        assert engine.store(ids, kv) == len(ids)
        engine.backend.flush()
        assert engine.retrieve(ids).num_tokens == len(ids)
        write_cached(cal, auto.cache_key(fp.weights_digest), calib.default_dir())
        assert job.done.wait(30) and job.error is None
        assert disk.codec.name == "cachegen" and disk.codec.params()["calibration"] == cal.digest
        # Chunks of the previous codec are not found under the new one (a miss, never misread) ...
        assert engine.retrieve(ids) is None or engine.retrieve(ids).num_tokens == 0
        assert engine.store(ids, kv) == len(ids)
        engine.backend.flush()
        got = engine.retrieve(ids)
        assert got.num_tokens == len(ids)
        assert (got.kv - kv).abs().max() < 0.5 * kv.abs().max()  # ... and the calibrated ones decode
    finally:
        engine.close()
        owned.close()
    assert not [t for t in threading.enumerate() if t.name == "kvshelf-autocalibration"]


def test_config_keys_of_the_pending_codec():
    assert KVShelfConfig().codec_calibration_pending == "uncalibrated"
    with pytest.raises(ValueError, match="codec_calibration_pending"):
        KVShelfConfig(codec_calibration_pending="int8")


def test_an_existing_calibration_builds_the_tiers_calibrated_so_the_disk_scan_keeps_its_chunks(
    tiny_calibration, tmp_path, monkeypatch
):
    runner, cal = tiny_calibration
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path / "cache"))
    config = KVShelfConfig(
        local_cpu=False, local_disk=str(tmp_path / "disk"), local_disk_codec="cachegen", chunk_size=16
    )
    fp = runner.fingerprint()
    assert auto.existing(config, fp) is None
    write_cached(cal, auto.cache_key(fp.weights_digest, config.codec_calibration_tokens), calib.default_dir())
    ids = list(range(10, 42))
    buf = runner.new_kv(len(ids))
    runner.forward(ids, 0, buf)
    for _ in range(2):  # a second instance (a restart) finds the chunks the first stored
        owned = Owned.for_config(config)
        engine = open_engine(config, fp, owned=owned, auto_calibration=auto.existing(config, fp))
        try:
            assert engine.backend.tiers[0].backend.codec.params()["calibration"] == cal.digest
            if engine.retrieve(ids) is None or engine.retrieve(ids).num_tokens == 0:
                assert engine.store(ids, buf.data.clone()) == len(ids)
                engine.backend.flush()
            else:
                assert engine.retrieve(ids).num_tokens == len(ids)
                break
        finally:
            engine.close()
            owned.close()
    else:
        raise AssertionError("the restarted instance did not find the calibrated chunks")
    off = KVShelfConfig(local_cpu=False, local_disk=str(tmp_path / "d2"), local_disk_codec="int8")
    assert auto.existing(off, fp) is None  # no cachegen tier asks for it
