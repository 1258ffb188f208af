"""python -m aaa_fast.study on a real Ray: an embedded local cluster running a grid with a
hot-start chain (a worker SIGKILLed mid-run: its task is retried and resumes), a two-node
cluster on loopback (runs land on both nodes), a driver SIGKILLed and restarted as two drivers
at once (Ray and the local pool: no run trained twice). Every final.json must equal the local
process pool's for the same grid. The local pool without Ray is covered by test_experiments."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import ENV

ray = pytest.importorskip("ray", reason="Ray is the study extra: pip install '.[study]'")
pytestmark = pytest.mark.slow

COMMON = ["--dataset", "fashion-mnist", "--arch", "small-cnn", "--batch-size", "16", "--steps", "1",
          "--num-meta", "50", "--meta-batch-size", "20", "--eval-steps", "2", "--eval-subset", "20",
          "--test-subset", "50", "--device", "cpu"]


@pytest.fixture
def ray_env(tmp_path):
    """Ray's processes for one test, found again by a marker in their environment and killed at
    the end (a SIGKILLed driver leaves Ray's agents behind; `ray stop` would kill any cluster)."""
    marker = str(tmp_path)
    short = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = dict(ENV, RAY_TMPDIR=short, AAA_FAST_TEST_RAY=marker, RAY_AUTH_MODE="token",
               RAY_USAGE_STATS_ENABLED="0", AAA_FAST_PROGRESS_SECONDS="2")
    yield env
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"AAA_FAST_TEST_RAY={marker}".encode() in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
    shutil.rmtree(short, ignore_errors=True)


def write_grid(path, out, data_dir, methods, seeds=(0,)):
    path.write_text(json.dumps({"out": str(out), "seeds": list(seeds), "common": [*COMMON, "--data-dir", data_dir],
                                "scenarios": {"flip": ["--label-noise", "flip2", "--noise-rate", "0.2"]},
                                "methods": methods}))
    return str(path)


def study(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "aaa_fast.study", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def finals(out):
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*/final.json"))}


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def train_process_of(run_dir) -> int:
    """The pid of the training process writing to run_dir."""
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "aaa_fast.train" in args and str(run_dir) in args:
            return int(pid)
    raise AssertionError(f"no training process for {run_dir}")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


METHODS = {"ERM": ["--method", "erm", "--epochs", "3"],
           "Hot": {"args": ["--method", "trades", "--epochs", "1"], "init_from": "ERM"}}


@pytest.fixture
def reference(tmp_path, data_dir, ray_env):
    """final.json of every run of the grid, from the local process pool."""
    config = write_grid(tmp_path / "ref.json", tmp_path / "ref", data_dir, METHODS, seeds=(0, 1))
    proc = study(["run", config, "--executor", "local", "--workers", "2"], ray_env)
    assert proc.wait(timeout=600) == 0, proc.stdout.read()
    return finals(tmp_path / "ref")


def test_embedded_cluster_runs_the_chain_and_retries_a_killed_worker(tmp_path, data_dir, ray_env, reference):
    config = write_grid(tmp_path / "g.json", tmp_path / "res", data_dir, METHODS, seeds=(0, 1))
    driver = study(["run", config, "--executor", "ray", "--num-cpus", "2"], ray_env)
    victim = tmp_path / "res" / "flip" / "ERM" / "seed0"
    wait_for(victim / "metrics.csv", driver)  # its first epoch is done
    os.kill(parent_of(train_process_of(victim)), signal.SIGKILL)  # the Ray worker running it
    log = driver.communicate(timeout=600)[0]
    assert driver.returncode == 0, log
    assert "4 to run" in log and "Ray on an embedded local cluster" in log
    assert "resuming" in (victim / "train.log").read_text()  # the retry continued from the checkpoint
    assert finals(tmp_path / "res") == reference
    hot = json.loads((tmp_path / "res" / "flip" / "Hot" / "seed0" / "run.json").read_text())["command"]
    assert hot[hot.index("--init") + 1] == str(victim / "checkpoint.pt")  # the stage keeps its checkpoint
    again = study(["run", config, "--executor", "ray"], ray_env)
    assert again.wait(timeout=120) == 0 and "0 to run" in again.stdout.read()
    status = study(["status", config], ray_env)
    assert status.wait(timeout=60) == 0 and "4 finished, 0 running, 0 started, 0 to run" in status.stdout.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster_on_loopback_runs_on_both_nodes(tmp_path, data_dir, ray_env):
    port = free_port()
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    for args in (["--head", "--port", str(port), "--include-dashboard", "false"], ["--address", f"127.0.0.1:{port}"]):
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "start", *args, *node], env=ray_env, capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
    config = write_grid(tmp_path / "g.json", tmp_path / "res", data_dir, {"ERM": ["--method", "erm", "--epochs", "2"]},
                        seeds=(0, 1))
    driver = study(["run", config, "--address", f"127.0.0.1:{port}"], ray_env)
    log = driver.communicate(timeout=600)[0]
    assert driver.returncode == 0, log
    assert f"the cluster at 127.0.0.1:{port}" in log
    nodes = {json.loads(p.read_text())["node"] for p in (tmp_path / "res").glob("*/*/seed*/run.json")}
    assert len(nodes) == 2  # one CPU per node: the two runs ran side by side, one on each


def test_killed_driver_restarted_as_two_drivers_trains_each_run_once(tmp_path, data_dir, ray_env, reference):
    config = write_grid(tmp_path / "g.json", tmp_path / "res", data_dir, METHODS, seeds=(0, 1))
    first = study(["run", config, "--executor", "ray", "--num-cpus", "2"], ray_env)
    wait_for(tmp_path / "res" / "flip" / "ERM" / "seed0" / "metrics.csv", first)
    first.kill()  # the embedded cluster goes with it; its runs get SIGTERM and checkpoint
    first.wait()
    both = [study(["run", config, "--executor", "ray", "--num-cpus", "2"], ray_env),
            study(["run", config, "--executor", "local", "--workers", "2"], ray_env)]
    logs = [d.communicate(timeout=600)[0] for d in both]
    assert [d.returncode for d in both] == [0, 0], logs
    assert finals(tmp_path / "res") == reference
    for log in (tmp_path / "res").glob("*/*/seed*/train.log"):
        text = log.read_text()
        assert text.count("starting the run") == 1, text  # never trained from scratch twice
        assert "in use by" not in text
